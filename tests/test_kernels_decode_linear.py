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


def test_gemv_tiles_follow_the_measured_shapes():
    """The plain GEMV's tiles where the H200 beat cuBLAS (Llama-3-8B: q|k|v, o, down, gate|up, the LM
    heads), None where cuBLAS is kept (undivided shapes)."""
    from kernels.projection import GEMV_MID, GEMV_NARROW, GEMV_WIDE, gemv_tiles
    assert gemv_tiles(4096, 4096) == GEMV_NARROW and gemv_tiles(4096, 14336) == GEMV_NARROW  # o, down
    assert gemv_tiles(28672, 4096) == GEMV_WIDE and gemv_tiles(128256, 4096) == GEMV_WIDE  # gate|up, LM head
    assert gemv_tiles(6144, 4096) == GEMV_MID  # q|k|v
    assert gemv_tiles(4096, 4000) is None and gemv_tiles(4080, 4096) is None and gemv_tiles(28672, 4000) is None


def _counting_gemv(monkeypatch):
    import kernels.projection as projection
    calls = []
    real = projection.decode_gemv_triton
    monkeypatch.setattr(projection, "decode_gemv_triton",
                        lambda x, w, tiles, **kw: calls.append(tiles) or real(x, w, tiles, **kw))
    return calls


def _triton_on_this_device(monkeypatch):
    """(device, calls): the Triton backend chosen, the GEMV's calls counted (CUDA if present)."""
    from kernel_cases import CUDA
    monkeypatch.setenv("LSA_KERNELS", "triton")
    return ("cuda" if CUDA else "cpu"), _counting_gemv(monkeypatch)


@pytest.mark.parametrize("device,dtype", [dd for dd in DEVICE_DTYPES if dd[1] != torch.float32])
@pytest.mark.parametrize("n,k", [(64, 1024), (16384, 256)], ids=["narrow", "wide"])
@pytest.mark.parametrize("rows", [1, 4])
def test_decode_gemv_against_float64(monkeypatch, device, dtype, n, k, rows):
    """kernels.decode_gemv runs the Triton GEMV (both tilings) on a decode batch and gives the
    product of float64 math on random inputs, within one rounding of the dtype."""
    import kernels
    monkeypatch.setenv("LSA_KERNELS", "triton")
    calls = _counting_gemv(monkeypatch)
    gen = torch.Generator().manual_seed(n + rows)
    linear = torch.nn.Linear(k, n, bias=False).to(device, dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * k ** -0.5)
    x = torch.randn(rows, k, generator=gen).to(device, dtype)
    out = kernels.decode_gemv(linear, x)
    assert len(calls) == 1 and out.shape == (rows, n) and out.dtype == dtype
    want = x.double().cpu() @ linear.weight.double().cpu().t()
    assert rel_err(out, want) < TOL[dtype], rel_err(out, want)


def test_decode_gemv_keeps_the_linear_where_it_does_not_apply(monkeypatch):
    """More rows than measured, fp32, a bias, an unmeasured shape, or the torch backend: the
    Linear itself (its exact output)."""
    import kernels
    device, calls = _triton_on_this_device(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    plain = torch.nn.Linear(1024, 64, bias=False).to(device, torch.float16)
    biased = torch.nn.Linear(1024, 64, bias=True).to(device, torch.float16)
    odd = torch.nn.Linear(1000, 64, bias=False).to(device, torch.float16)
    fp32 = torch.nn.Linear(1024, 64, bias=False).to(device)
    x = torch.randn(5, 1024, generator=gen).to(device, torch.float16)
    cases = [(plain, x), (fp32, x[:2].float()), (biased, x[:2]), (odd, torch.randn(2, 1000).to(device, torch.float16))]
    for linear, inp in cases:
        assert torch.equal(kernels.decode_gemv(linear, inp), linear(inp))
    monkeypatch.setenv("LSA_KERNELS", "torch")
    assert torch.equal(kernels.decode_gemv(plain, x[:2]), plain(x[:2]))
    assert calls == []


def glu64(x, weight):
    gate, up = (x.double().cpu() @ weight.double().cpu().t()).chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


@pytest.mark.parametrize("device,dtype", [dd for dd in DEVICE_DTYPES if dd[1] != torch.float32])
@pytest.mark.parametrize("n,k", [(128, 1024), (16384, 256)], ids=["narrow", "wide"])
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_gemv_glu_against_float64(monkeypatch, device, dtype, n, k, rows):
    """kernels.decode_gemv_glu: the gate|up GEMV ending with the SwiGLU gives float64's
    silu(x gate^T) * (x up^T) on random inputs, and the unfused pair's result (the GEMV, then
    silu_mul) within one rounding; one kernel, no [M, 2I] output."""
    import kernels
    monkeypatch.setenv("LSA_KERNELS", "triton")
    calls = _counting_gemv(monkeypatch)
    gen = torch.Generator().manual_seed(n + k + rows)
    linear = torch.nn.Linear(k, n, bias=False).to(device, dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 2 * k ** -0.5)
    x = torch.randn(rows, k, generator=gen).to(device, dtype)
    out = kernels.decode_gemv_glu(linear, x)
    assert len(calls) == 1 and out.shape == (rows, n // 2) and out.dtype == dtype
    assert rel_err(out, glu64(x, linear.weight)) < 2 * TOL[dtype], rel_err(out, glu64(x, linear.weight))
    unfused = kernels.silu_mul(*kernels.decode_gemv(linear, x).chunk(2, dim=-1))
    assert rel_err(out, unfused.double().cpu()) < TOL[dtype]


def test_decode_gemv_glu_keeps_the_linear_where_the_gemv_does_not_apply(monkeypatch):
    """Where decode_gemv keeps the Linear (too many rows, the torch backend, an unmeasured shape),
    decode_gemv_glu is the Linear then silu_mul, exactly; the GLU output takes no prologue."""
    import kernels
    from kernels.projection import decode_linear_triton
    device, calls = _triton_on_this_device(monkeypatch)
    gen = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(1024, 128, bias=False).to(device, torch.float16)
    odd = torch.nn.Linear(1000, 128, bias=False).to(device, torch.float16)
    x = torch.randn(6, 1024, generator=gen).to(device, torch.float16)
    for lin, inp in ((linear, x), (odd, torch.randn(2, 1000, generator=gen).to(device, torch.float16))):
        assert torch.equal(kernels.decode_gemv_glu(lin, inp), kernels.silu_mul(*lin(inp).chunk(2, dim=-1)))
    monkeypatch.setenv("LSA_KERNELS", "torch")
    assert torch.equal(kernels.decode_gemv_glu(linear, x[:2]), kernels.silu_mul(*linear(x[:2]).chunk(2, dim=-1)))
    assert calls == []
    with pytest.raises(AssertionError, match="plain projection"):
        decode_linear_triton(x[:2].float(), linear.weight.float(), residual=torch.zeros(2, 64), glu_output=True)


def rope64(y, cos, sin, head_dim, rot_cols):
    """kernels.rotary's math in float64 on the first rot_cols columns of y [M, N]."""
    y = y.clone()
    m, half = y.shape[0], head_dim // 2
    heads = y[:, :rot_cols].view(m, -1, head_dim)
    c, s_ = cos.double().cpu()[:, None], sin.double().cpu()[:, None]
    rotated = torch.cat([-heads[..., half:], heads[..., :half]], dim=-1)
    y[:, :rot_cols] = (heads * c + rotated * s_).reshape(m, rot_cols)
    return y


@pytest.mark.parametrize("device,dtype", [dd for dd in DEVICE_DTYPES if dd[1] != torch.float32])
@pytest.mark.parametrize("n,k,head_dim", [(1024, 512, 128), (6144, 256, 64)], ids=["narrow", "mid"])
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_gemv_rope_against_float64(monkeypatch, device, dtype, n, k, head_dim, rows):
    """kernels.decode_gemv_rope: the q|k|v GEMV ending with the rotary of its q and k heads (v's
    columns as they are) gives float64's projection then rotation on random inputs (random
    angles), and the unfused pair's (the GEMV, then kernels.rotary) within one rounding."""
    import kernels
    monkeypatch.setenv("LSA_KERNELS", "triton")
    calls = _counting_gemv(monkeypatch)
    gen = torch.Generator().manual_seed(n + k + rows)
    linear = torch.nn.Linear(k, n, bias=False).to(device, dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * k ** -0.5)
    x = torch.randn(rows, k, generator=gen).to(device, dtype)
    angles = torch.rand(rows, head_dim // 2, generator=gen) * 6.3
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(device, dtype)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(device, dtype)
    rot_cols = n - 2 * head_dim  # all heads but the last two (v's)
    out = kernels.decode_gemv_rope(linear, x, cos, sin, head_dim, rot_cols)
    assert len(calls) == 1 and out.shape == (rows, n) and out.dtype == dtype
    want = rope64(x.double().cpu() @ linear.weight.double().cpu().t(), cos, sin, head_dim, rot_cols)
    assert rel_err(out, want) < 2 * TOL[dtype], rel_err(out, want)
    assert rel_err(out[:, rot_cols:], want[:, rot_cols:]) < TOL[dtype]  # v's columns: not rotated
    unfused = kernels.decode_gemv(linear, x)
    kernels.rotary(unfused[:, :rot_cols].view(rows, -1, head_dim), cos, sin)
    assert rel_err(out, unfused.double().cpu()) < TOL[dtype]


def test_decode_gemv_rope_keeps_the_linear_and_rotary_where_the_gemv_does_not_apply(monkeypatch):
    """Too many rows, an unmeasured shape or the torch backend: the Linear, then kernels.rotary,
    exactly; the rotary takes whole heads and no prologue."""
    import kernels
    from kernels.projection import decode_linear_triton
    device, calls = _triton_on_this_device(monkeypatch)
    gen = torch.Generator().manual_seed(6)
    linear = torch.nn.Linear(1024, 512, bias=False).to(device, torch.float16)
    odd = torch.nn.Linear(1000, 512, bias=False).to(device, torch.float16)

    def unfused(lin, inp, cos, sin):
        y = lin(inp)
        kernels.rotary(y[:, :256].view(inp.shape[0], 2, 128), cos, sin)
        return y

    for lin, rows in ((linear, 6), (odd, 2)):
        inp = torch.randn(rows, lin.in_features, generator=gen).to(device, torch.float16)
        cos, sin = (torch.rand(rows, 128, generator=gen).to(device, torch.float16) for _ in range(2))
        assert torch.equal(kernels.decode_gemv_rope(lin, inp, cos, sin, 128, 256), unfused(lin, inp, cos, sin))
    assert calls == []
    x = torch.randn(2, 1024).to(device, torch.float16)
    cos = torch.ones(2, 128).to(device, torch.float16)
    with pytest.raises(AssertionError, match="whole heads"):
        decode_linear_triton(x, linear.weight, rotary=(cos, cos, 128, 100))
    with pytest.raises(AssertionError, match="plain projection"):
        decode_linear_triton(x, linear.weight, rotary=(cos, cos, 128, 256), residual=torch.zeros_like(x[:, :512]))
