"""Fused RMSNorm (+ residual add), rotary and SiLU*up (Triton, and the torch reference the CPU
runs) against float64 math on random inputs; the Triton ones also against the reference."""
import pytest
import torch

from kernel_cases import DEVICE_DTYPES  # first: sets TRITON_INTERPRET on CPU
from kernels import reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def impl(backend, name):
    if backend == "torch":
        return getattr(reference, name)
    from kernels import fused
    return getattr(fused, f"{name}_triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(backend, device, dtype, with_residual):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 96, generator=gen) * 3).to(device, dtype)
    h = torch.randn(5, 96, generator=gen).to(device, dtype) if with_residual else None
    w = (torch.rand(96, generator=gen) + 0.5).to(device, dtype)
    x0 = x.clone()
    out = impl(backend, "rms_norm")(x, w, 1e-5, h)
    r = (x0.double() + h.double()).to(dtype) if with_residual else x0
    if with_residual:
        torch.testing.assert_close(x, r, rtol=0, atol=0)  # the residual stream, updated in place
    else:
        assert torch.equal(x, x0)
    rd = r.double()
    want = w.double() * (rd / torch.sqrt(rd.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(out.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
    if backend == "triton":
        x2 = x0.clone()
        torch.testing.assert_close(out, reference.rms_norm(x2, w, 1e-5, h), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_rotary(backend, device, dtype):
    gen = torch.Generator().manual_seed(2)
    t, heads, dim = 3, 4, 32
    x = torch.randn(t, heads, dim, generator=gen).to(device, dtype)
    angles = torch.rand(t, dim // 2, generator=gen).double() * 6.28
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    x0 = x.double()
    out = impl(backend, "rotary")(x, cos, sin)
    assert out.data_ptr() == x.data_ptr()  # in place
    x1, x2 = x0[..., : dim // 2], x0[..., dim // 2:]
    c, s = cos.double()[:, None], sin.double()[:, None]
    want = x0 * c + torch.cat([-x2, x1], -1) * s
    torch.testing.assert_close(x.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_silu_mul(backend, device, dtype):
    gen = torch.Generator().manual_seed(3)
    g = (torch.randn(3, 1500, generator=gen) * 4).to(device, dtype)  # two column tiles, the second partial
    u = torch.randn(3, 1500, generator=gen).to(device, dtype)
    out = impl(backend, "silu_mul")(g, u)
    gd = g.double()
    want = gd * torch.sigmoid(gd) * u.double()
    torch.testing.assert_close(out.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
