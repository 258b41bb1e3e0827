"""prefill_attention (Triton and torch reference) against an independent float64 loop.

A segment of T queries at positions [start, start + T) attends causally to keys [0, start + T)
of one layer ([Hkv, N, D], N may be longer: keys past the segment hold NaN and must never be
read). Tolerances, ||out - ref|| / ||ref||: fp32 1e-5, fp16 2e-3, bf16 1e-2. On CPU the Triton
kernel runs under TRITON_INTERPRET=1 (fp32 / fp16, small tiles so that every stage and ragged
edge is crossed); on CUDA in bf16 / fp16 at its default tiles too.
"""
import pytest
import torch

from kernel_cases import CUDA, DEVICE_DTYPES, TOL, rel_err  # first: sets TRITON_INTERPRET on CPU
import kernels
from kernels import reference


def impl(backend):
    if backend == "torch":
        return reference.prefill_attention
    from kernels.flash_prefill import prefill_attention_triton
    return prefill_attention_triton


def make_case(gen, device, dtype, n_qh, n_kvh, head_dim, start, num_q, spare=5, layout="hnd"):
    """q [T, Hq, D]; k/v [Hkv, N, D] (or strided views of [N, Hkv, D]) with NaN past start + T."""
    n = start + num_q + spare
    k = torch.randn(n_kvh, n, head_dim, generator=gen)
    v = torch.randn(n_kvh, n, head_dim, generator=gen)
    k[:, start + num_q:] = float("nan")
    v[:, start + num_q:] = float("nan")
    q = 2.0 * torch.randn(num_q, n_qh, head_dim, generator=gen)
    if layout == "nhd":  # the same values as views of token-major storage
        k, v = k.transpose(0, 1).contiguous().transpose(0, 1), v.transpose(0, 1).contiguous().transpose(0, 1)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def attention_f64(q, k, v, start, scale):
    """Per query and head: explicit softmax over keys 0 .. start + i, in float64."""
    num_q, n_qh, head_dim = q.shape
    group = n_qh // k.shape[0]
    out = torch.zeros(num_q, n_qh, head_dim, dtype=torch.float64)
    qd, kd, vd = (t.double().cpu() for t in (q, k, v))
    for h in range(n_qh):
        for i in range(num_q):
            keys, vals = kd[h // group, : start + i + 1], vd[h // group, : start + i + 1]
            p = torch.softmax(keys @ qd[i, h] * scale, dim=0)
            out[i, h] = p @ vals
    return out



CASES = [  # (Hq, Hkv, D, start, T): GQA 1 / 4 / 8 / 3, D 64 / 128, start 0 / > 0, ragged T
    (2, 2, 64, 0, 37),
    (8, 2, 128, 0, 64),
    (8, 1, 64, 23, 41),
    (8, 2, 128, 100, 19),
    (9, 3, 64, 5, 1),
    (4, 4, 128, 77, 33),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("n_qh,n_kvh,head_dim,start,num_q", CASES)
def test_prefill_attention_matches_f64(backend, device, dtype, n_qh, n_kvh, head_dim, start, num_q):
    gen = torch.Generator().manual_seed(hash((n_qh, n_kvh, head_dim, start, num_q, str(dtype))) % 2**31)
    q, k, v = make_case(gen, device, dtype, n_qh, n_kvh, head_dim, start, num_q)
    scale = head_dim ** -0.5
    ref = attention_f64(q, k, v, start, scale)
    tiles = {} if backend == "torch" or CUDA else {"block_m": 16, "block_n": 16}
    out = torch.full_like(q, float("nan"))
    res = impl(backend)(q, k, v, start, scale, out=out, **tiles)
    assert res.data_ptr() == out.data_ptr() and out.dtype == dtype
    assert not out.isnan().any(), "every output element written, no NaN key read"
    assert rel_err(out, ref) < TOL[dtype]
    plain = impl(backend)(q, k, v, start, scale, **tiles)  # its own output buffer
    assert rel_err(plain, ref) < TOL[dtype]


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16), (64, 64)])
def test_triton_tiles_and_strided_inputs(block_m, block_n):
    """Tiles larger and smaller than each other and than the segment; k/v as views of
    token-major storage; q as a strided view; a start that is not a multiple of any tile."""
    device, dtype = DEVICE_DTYPES[0]
    gen = torch.Generator().manual_seed(block_m * 100 + block_n)
    q, k, v = make_case(gen, device, dtype, 8, 2, 64, 45, 50, layout="nhd")
    assert k.stride(1) == 2 * 64
    q_view = torch.cat([q, q], dim=-1)[..., 64:]
    assert not q_view.is_contiguous()
    from kernels.flash_prefill import prefill_attention_triton
    out = prefill_attention_triton(q_view, k, v, 45, 0.125, block_m=block_m, block_n=block_n)
    assert rel_err(out, attention_f64(q, k, v, 45, 0.125)) < TOL[dtype]


def test_segments_compose_to_the_whole_prompt():
    """Prefill in three segments (the engine's chunks) equals the whole prompt in one call."""
    device, dtype = DEVICE_DTYPES[0]
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_case(gen, device, dtype, 4, 1, 64, 0, 90, spare=0)
    whole = kernels.prefill_attention(q, k, v, 0, 0.125)
    parts = torch.cat([kernels.prefill_attention(q[a:b], k, v, a, 0.125) for a, b in ((0, 31), (31, 64), (64, 90))])
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_refused():
    device, dtype = DEVICE_DTYPES[0]
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_case(gen, device, dtype, 6, 4, 64, 0, 8)  # 6 query heads over 4 KV heads
    from kernels.flash_prefill import prefill_attention_triton
    with pytest.raises(AssertionError, match="multiple"):
        prefill_attention_triton(q, k, v, 0, 0.125)
    q, k, v = make_case(gen, device, dtype, 4, 2, 64, 0, 8, spare=0)
    with pytest.raises(AssertionError, match="cover"):
        prefill_attention_triton(q, k, v, 3, 0.125)  # keys end before the segment does
