"""kernels.decode_linear (a decode batch's projection with the norm / SiLU prologue and the residual
epilogue fused) against float64 math on random inputs, Triton and the torch reference; the Triton
one also against the reference in the same dtype. Shapes that are not multiples of the tiles."""
import pytest
import torch

from kernel_cases import DEVICE_DTYPES, TOL, rel_err  # first: sets TRITON_INTERPRET on CPU
from kernels import reference


def impl(backend):
    if backend == "torch":
        return reference.decode_linear
    from kernels.projection import decode_linear_triton
    return decode_linear_triton


def want64(x, w, norm_w=None, eps=1e-5, silu=False, residual=None):
    """The same math in float64, no intermediate rounding."""
    a = x.double().cpu()
    if silu:
        g, u = a.chunk(2, dim=-1)
        a = g * torch.sigmoid(g) * u
    if norm_w is not None:
        a = norm_w.double().cpu() * a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + eps)
    y = a @ w.double().cpu().t()
    return y if residual is None else residual.double().cpu() + y


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("prologue", ["none", "norm", "silu"])
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_decode_linear(backend, device, dtype, prologue, add, rows):
    gen = torch.Generator().manual_seed(7 + rows)
    n, k = 96, 320  # neither a multiple of the tiles (64 x 256)
    kx = 2 * k if prologue == "silu" else k
    x = (torch.randn(rows, kx, generator=gen) * 2).to(device, dtype)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device, dtype)
    norm_w = (torch.rand(k, generator=gen) + 0.5).to(device, dtype) if prologue == "norm" else None
    res = torch.randn(rows, n, generator=gen).to(device, dtype) if add else None
    res0 = res.clone() if add else None
    x0 = x.clone()
    kw = dict(norm_weight=norm_w, eps=1e-5, silu_input=prologue == "silu")
    out = impl(backend)(x, w, residual=res, **kw)
    assert torch.equal(x, x0)  # the input is never written
    if add:
        assert out.data_ptr() == res.data_ptr()  # the residual stream, in place
    want = want64(x0, w, norm_w, silu=prologue == "silu", residual=res0)
    assert out.shape == (rows, n) and out.dtype == dtype
    assert rel_err(out, want) < 2 * TOL[dtype], rel_err(out, want)
    if backend == "triton":
        ref = reference.decode_linear(x0.clone(), w, residual=None if res0 is None else res0.clone(), **kw)
        assert rel_err(out, ref.double().cpu()) < TOL[dtype]


def test_decode_linear_refuses_what_it_does_not_take():
    from kernels.projection import decode_linear_triton
    w = torch.randn(64, 32)
    with pytest.raises(AssertionError, match="at most 32 rows"):
        decode_linear_triton(torch.randn(33, 32), w)
    with pytest.raises(AssertionError, match="columns"):
        decode_linear_triton(torch.randn(2, 32), w, silu_input=True)
