"""The host mirror's block formats and ``load_blocks`` (Triton and torch reference).

int4 (KIVI grouping: keys per channel over the block, values per token over the channels), checked
against float64: each group's stored min is at most its true min and at most one float16 step
below it, 15 x its stored scale covers the group's range with at most a float16 step to spare, and
every value comes back within half a step: ``|x - dequantized| <= scale / 2`` (plus fp32
arithmetic, 1e-6 relative). ``load_blocks``: the kernel writes exactly what the reference writes
(fp32: within 1e-6 relative; fp16 / bf16: within one rounding of the pool dtype) into the listed
slots and nothing else (the rest of the pool stays NaN).
"""
import pytest
import torch

from kernel_cases import DEVICE_DTYPES  # first: sets TRITON_INTERPRET on CPU
import kernels
from kernels import reference

FP16_STEP = 2.0 ** -10  # relative spacing of float16 normals


def kv_blocks(n, layers, heads, block, dim, seed):
    """[n, L, 2, H, B, D] float64 with what real KV has: key channels with their own offsets and
    ranges (a few outlier channels), value tokens of different magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, layers, heads, block, dim, generator=gen, dtype=torch.float64)
    channel_scale = torch.rand(n, layers, heads, 1, dim, generator=gen, dtype=torch.float64) * 2 + 0.1
    channel_scale[..., : max(1, dim // 16)] *= 20  # outlier channels
    keys = keys * channel_scale + torch.randn(n, layers, heads, 1, dim, generator=gen, dtype=torch.float64) * 3
    values = torch.randn(n, layers, heads, block, dim, generator=gen, dtype=torch.float64)
    values = values * (torch.rand(n, layers, heads, block, 1, generator=gen, dtype=torch.float64) * 4 + 0.05)
    return torch.stack([keys, values], 2)


@pytest.mark.parametrize("block,dim", [(16, 64), (64, 128), (4, 8)])
def test_int4_round_trip_against_float64(block, dim):
    x = kv_blocks(3, 2, 2, block, dim, seed=block + dim).float().double()  # [n, L, 2, H, B, D], fp32 values
    codes, meta = kernels.quantize_int4(x.float())
    assert codes.dtype == torch.uint8 and codes.shape == (3, 2, 2, 2, block, dim // 2)
    assert meta.dtype == torch.float16 and meta.shape == (3, 2, 2, 2 * dim + 2 * block)
    m = meta.double()
    k_scale, k_min = m[..., :dim], m[..., dim: 2 * dim]  # [n, L, H, D]
    v_scale, v_min = m[..., 2 * dim: 2 * dim + block], m[..., 2 * dim + block:]  # [n, L, H, B]
    k, v = x[:, :, 0], x[:, :, 1]  # [n, L, H, B, D]
    for low, scale, lo, hi in ((k_min, k_scale, k.amin(3), k.amax(3)), (v_min, v_scale, v.amin(4), v.amax(4))):
        step16 = lo.abs() * FP16_STEP + 2.0 ** -24
        assert (low <= lo).all() and (lo - low <= step16).all()  # min rounded down, by under one float16 step
        assert (15 * scale >= hi - low).all()  # the range is covered
        assert (scale <= (hi - low) / 15 * (1 + FP16_STEP) + 2.0 ** -24).all()  # and no more than that
    back = reference.dequantize_int4(codes, meta, torch.float64)
    half_step = torch.stack([k_scale[:, :, :, None, :].expand_as(k), v_scale[..., None].expand_as(v)], 2) / 2
    err = (back - x).abs()
    assert (err <= half_step * (1 + 1e-6) + 1e-6 * x.abs()).all()
    # the codes are the float64 rounding of (x - min) / scale, but for ties blurred by fp32
    unpacked = torch.stack([codes & 15, codes >> 4], -1).flatten(-2).double()
    low = torch.stack([k_min[:, :, :, None, :].expand_as(k), v_min[..., None].expand_as(v)], 2)
    want = torch.round((x - low) / (2 * half_step).clamp_min(1e-30)).clamp(0, 15)
    assert (unpacked - want).abs().max() <= 1 and (unpacked == want).double().mean() > 0.999
    # 4 bits per element and 4 float16 per (channel or token) group pair: the bytes the mirror keeps
    assert codes.numel() + meta.numel() * 2 == x.numel() // 2 + 3 * 2 * 2 * (2 * dim + 2 * block) * 2


def test_int4_constant_and_tiny_groups_come_back_exactly_or_within_a_subnormal_step():
    x = torch.zeros(1, 1, 2, 1, 16, 32)
    x[0, 0, 0, 0, :, 3] = 1.5  # a constant key channel
    x[0, 0, 1, 0, 2] = -2.25  # a constant value token
    x[0, 0, 1, 0, 5] = torch.linspace(0, 1e-6, 32)  # a tiny value range
    codes, meta = kernels.quantize_int4(x)
    back = reference.dequantize_int4(codes, meta, torch.float32)
    assert torch.equal(back[0, 0, 0, 0, :, 3], x[0, 0, 0, 0, :, 3]) and torch.equal(back[0, 0, 1, 0, 2], x[0, 0, 1, 0, 2])
    assert (back - x).abs().max() <= 1e-6 / 30 + 2.0 ** -24
    assert torch.isfinite(back).all()


def _formats(src64, fmt):
    """Rows in host format ``fmt`` and their meta, from float64 blocks."""
    if fmt == "int4":
        return kernels.quantize_int4(src64.float())
    if fmt == "fp8":
        from engine.host_memory import quantize_fp8
        return quantize_fp8(src64.float())
    return src64, None


@pytest.mark.parametrize("fmt", ["model", "fp8", "int4"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("layers_view", ["all", "one"])
def test_load_blocks_kernel_matches_reference(fmt, device, dtype, layers_view):
    from kernels.block_load import load_blocks_triton

    layers, heads, block, dim, slots_total = 3, 2, 16, 64, 9
    src64 = kv_blocks(4, layers, heads, block, dim, seed=7)
    src, meta = _formats(src64, fmt)
    src = src.to(dtype) if fmt == "model" else src
    pool = torch.full((layers, 2, slots_total, heads, block, dim), float("nan"), dtype=dtype, device=device)
    if layers_view == "one":  # a per-layer group: one layer's rows into pool[l:l+1]
        src = src[:, 1:2].contiguous()
        meta = meta[:, 1:2].contiguous() if meta is not None else None
        dst_of = lambda p: p[1:2]  # noqa: E731
    else:
        dst_of = lambda p: p  # noqa: E731
    src = src.to(device)
    meta = meta.to(device) if meta is not None else None
    slots = torch.tensor([6, 0, 3, 8], dtype=torch.int32, device=device)
    want, got = pool.clone(), pool.clone()
    reference.load_blocks(src, meta, dst_of(want), slots, fmt)
    load_blocks_triton(src, meta, dst_of(got), slots, fmt)
    written = torch.zeros(layers, dtype=torch.bool)
    written[1 if layers_view == "one" else slice(None)] = True
    for layer in range(layers):
        for s in range(slots_total):
            if written[layer] and s in slots.tolist():
                tol = 1e-6 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 1e-2)
                torch.testing.assert_close(got[layer, :, s].float(), want[layer, :, s].float(), rtol=tol, atol=tol)
            else:
                assert torch.isnan(got[layer, :, s]).all()
    # the reference is the format's dequantization, scattered
    rows = reference.dequantize_blocks(src, meta, fmt, dtype)  # [n, L', 2, H, B, D]
    assert torch.equal(dst_of(want)[:, :, slots.long()], rows.permute(1, 2, 0, 3, 4, 5))


def test_load_blocks_dispatch_runs_the_reference_on_cpu_and_checks_shapes():
    from kernels.block_load import load_blocks_triton

    pool = torch.zeros(2, 2, 4, 1, 16, 16)
    src = torch.randn(2, 2, 2, 1, 16, 16)
    kernels.load_blocks(src, None, pool, torch.tensor([3, 1]))
    assert torch.equal(pool[:, :, 3], src[0]) and torch.equal(pool[:, :, 1], src[1])
    with pytest.raises(AssertionError, match="does not match"):
        load_blocks_triton(src[:, :1], None, pool, torch.tensor([3, 1]))
    with pytest.raises(AssertionError, match="int4 codes"):
        load_blocks_triton(src, torch.zeros(2, 2, 1, 64, dtype=torch.float16), pool, torch.tensor([3, 1]), "int4")
    with pytest.raises(ValueError, match="fmt"):
        reference.load_blocks(src, None, pool, torch.tensor([3, 1]), "int3")
