"""A decode batch's projections in Triton, with the decoder layer's small kernels fused in.

At decode a projection multiplies a few rows (the batch) by a weight read once from HBM: a
GEMV, bound by the weight's bytes. cuBLAS runs it well, but around it the layer launches small
kernels of a few microseconds each (an RMSNorm before q|k|v and before gate|up, SiLU(gate) * up
before down, split-K reductions after o and down, the residual adds), ~5 a layer. Here they
become the GEMV's prologue and epilogue:

```
grid (cdiv(N, BLOCK_N),)    program: BLOCK_N output columns of every row, the whole K loop (tiles())
  NORM   a = w_norm * (x * rsqrt(mean(x^2) + eps))    each program computes its rows' rstd
  SILU   a = silu(gate) * up, x = gate | up [M, 2K]    (reads 2K per row, no product stored)
  ADD    residual[:, cols] += a @ W[cols].T            in place: each column has one owner
```

The plain GEMV (no prologue, no epilogue; :func:`gemv_tiles`) may instead end with the SwiGLU
of the MLP or with the rotary of q and k. Its programs then own pairs of columns, two accumulators
over the one K loop: the gate|up projection's the same columns of gate and of up, writing
``silu(gate) * up`` [M, I] (``GLU``: no separate SiLU kernel, down reads I columns); the q|k|v
projection's both halves of a head's columns, rotated before the store where they are q's or k's
(``ROPE_HALF``: no separate rotary kernel). Any of these kernels may be launched with programmatic
dependent launch (``PDL``, kernels/pdl.py).

Every step rounds where the unfused modules round (the norm's product and the SiLU in the
activation dtype, the projection's output before the residual add), so the result is the
unfused layer's up to the order of the fp32 sums. Rows padded to 16 or 32 for ``tl.dot``; for a
few rows only (a decode batch): prefill keeps cuBLAS.
"""
import torch
import triton
import triton.language as tl

from .pdl import enabled as pdl_enabled

BLOCK_K, MAX_STAGES, NUM_WARPS = 256, 5, 4  # benchmarks/decode_linear.py on the H200 (docs/kernels.md)
MAX_ROWS = 32  # kernels.DECODE_LINEAR_MAX_ROWS
SMEM_BUDGET = 200 * 1024  # of the 227 KB a Hopper block may use: the pipeline's tiles


def tiles(rows_pad: int, silu: bool, elem_bytes: int) -> tuple[int, int]:
    """(BLOCK_N, stages): 64 columns (32 with SiLU's two input tiles) and as many pipeline stages
    (<= 5) as the weight and input tiles of a stage fit in ``SMEM_BUDGET``. On the H200, 64 x 256
    x 5 stages was within 3% of the best of 36 tilings for every Llama-3-8B projection, and 32
    columns the best for down (the SiLU one)."""
    block_n = 32 if silu else 64
    per_stage = (block_n + rows_pad * (2 if silu else 1)) * BLOCK_K * elem_bytes
    return block_n, max(1, min(MAX_STAGES, SMEM_BUDGET // per_stage))


@triton.jit
def _decode_linear_kernel(X, W, Y, NORM_W, COS, SIN, M, N, K, stride_xm, stride_wn, stride_ym, stride_cm, eps,
                          rot_cols,
                          M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          NUM_STAGES: tl.constexpr, NORM: tl.constexpr, SILU: tl.constexpr, ADD: tl.constexpr,
                          GLU: tl.constexpr, ROPE_HALF: tl.constexpr, PAIRS: tl.constexpr, IEEE_DOT: tl.constexpr,
                          PDL: tl.constexpr):
    if PDL:  # launched before the previous kernel is done (kernels/pdl.py): wait for it here
        tl.extra.cuda.gdc_wait()
    # offs_n: this program's output columns; with GLU or ROPE_HALF, pairs of them (N pairs): the
    # weight rows (and, ROPE, the output columns) rows_1 and rows_2 of each pair
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if ROPE_HALF > 0:  # pair (head h, j < HALF): columns h * 2 HALF + j and + HALF
        rows_1 = (offs_n // ROPE_HALF) * (2 * ROPE_HALF) + offs_n % ROPE_HALF
        rows_2 = rows_1 + ROPE_HALF
    else:  # GLU: gate's column n and up's (weight row N + n)
        rows_1 = offs_n
        rows_2 = N + offs_n
    offs_m = tl.arange(0, M_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    dtype = Y.dtype.element_ty
    x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm
    if NORM:  # the rows' rstd over all of K (each program reads the rows again: a few KB, from L2)
        ss = tl.zeros((M_PAD,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            xk = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
            ss += tl.sum(xk * xk, 1)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    acc_2 = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)  # pairs: the second member's
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        kk = k0 + offs_k
        mask_k = kk < K
        mask_x = mask_m[:, None] & mask_k[None, :]
        w = tl.load(W + rows_1[:, None].to(tl.int64) * stride_wn + kk[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if SILU:  # as kernels.silu_mul: silu rounded to the activation dtype, then the product
            g = tl.load(x_rows + kk[None, :], mask=mask_x, other=0.0).to(tl.float32)
            u = tl.load(x_rows + K + kk[None, :], mask=mask_x, other=0.0).to(tl.float32)
            s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
            a = (s * u).to(dtype)
        elif NORM:  # as kernels.rms_norm: the normalised row rounded, then times the weight, rounded
            xf = tl.load(x_rows + kk[None, :], mask=mask_x, other=0.0).to(tl.float32)
            normed = (xf * rstd[:, None]).to(dtype).to(tl.float32)
            a = (tl.load(NORM_W + kk, mask=mask_k, other=0.0).to(tl.float32)[None, :] * normed).to(dtype)
        else:
            a = tl.load(x_rows + kk[None, :], mask=mask_x, other=0.0).to(dtype)
        if IEEE_DOT:  # fp32 activations (tests on the CPU): no tf32
            acc += tl.dot(a, tl.trans(w.to(dtype)), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(w.to(dtype)))
        if PAIRS:
            w_2 = tl.load(W + rows_2[:, None].to(tl.int64) * stride_wn + kk[None, :],
                          mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if IEEE_DOT:
                acc_2 += tl.dot(a, tl.trans(w_2.to(dtype)), input_precision="ieee")
            else:
                acc_2 += tl.dot(a, tl.trans(w_2.to(dtype)))
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    mask_y = mask_m[:, None] & mask_n[None, :]
    out = acc.to(dtype)
    if GLU:  # as kernels.silu_mul on the rounded gate and up: silu rounded, then the product
        g = out.to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        out = (s * acc_2.to(dtype).to(tl.float32)).to(dtype)
    if ROPE_HALF > 0:  # as kernels.rotary on the rounded projection, where rows_1 < rot_cols (q, k)
        x1 = out.to(tl.float32)
        x2 = acc_2.to(dtype).to(tl.float32)
        c_ptrs = offs_m[:, None].to(tl.int64) * stride_cm + (offs_n % ROPE_HALF)[None, :]
        mask_c = mask_m[:, None] & mask_n[None, :]
        c1 = tl.load(COS + c_ptrs, mask=mask_c, other=0.0).to(tl.float32)
        c2 = tl.load(COS + c_ptrs + ROPE_HALF, mask=mask_c, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + c_ptrs, mask=mask_c, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + c_ptrs + ROPE_HALF, mask=mask_c, other=0.0).to(tl.float32)
        y1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
        y2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
        rotate = (rows_1 < rot_cols)[None, :]
        y_rows = Y + offs_m[:, None].to(tl.int64) * stride_ym
        tl.store(y_rows + rows_1[None, :], tl.where(rotate, y1, x1).to(dtype), mask=mask_c)
        tl.store(y_rows + rows_2[None, :], tl.where(rotate, y2, x2).to(dtype), mask=mask_c)
    else:
        if ADD:  # the residual stream after the sublayer: the projection rounded, then the add rounded
            out = (tl.load(y_ptrs, mask=mask_y, other=0.0).to(tl.float32) + out.to(tl.float32)).to(dtype)
        tl.store(y_ptrs, out, mask=mask_y)


# Plain GEMV tilings (BLOCK_N, BLOCK_K, stages, warps). First chosen by the H200 sweep of 36 tilings
# (benchmarks/decode_linear.py, docs/results/2026-12-03h/call1/decode_linear.json, bf16, L2 cleared
# before each call): narrow outputs (o: N 4096, K 4096; down: N 4096, K 14336) with 32 columns and
# K tiles of 512, wide ones (gate|up N 28672, the LM heads) with 64 x 256; q|k|v (N 6144) level with
# cuBLAS there. Then timed as the step runs them (benchmarks/chain.py: one call per layer of 32 in a
# CUDA graph, nothing in L2; docs/results/2026-12-03k/call1/chain.json, batch 1): narrow with 4
# stages (o 11.3 us, down 29.4, against 11.5 / 30.1 with 3 and cuBLAS's 13.4 / 31.4), and q|k|v
# with 64 x 256 x 4 stages 14.8 us against cuBLAS's 15.9 (GEMV_MID, for outputs between the two).
GEMV_NARROW, GEMV_MID, GEMV_WIDE = (32, 512, 4, 4), (64, 256, 4, 4), (64, 256, 3, 4)


def gemv_tiles(n: int, k: int) -> tuple[int, int, int, int] | None:
    """The plain GEMV's tiling for an [N, K] weight, or None where cuBLAS is kept (a shape its
    tiles do not divide)."""
    for tiles, fits in ((GEMV_NARROW, n <= 4096), (GEMV_MID, 4096 < n < 16384), (GEMV_WIDE, n >= 16384)):
        if tiles is not None and fits and n % tiles[0] == 0 and k % tiles[1] == 0:
            return tiles
    return None


def decode_linear_triton(x, weight, norm_weight=None, eps=0.0, silu_input=False, residual=None, *,
                         glu_output=False, rotary=None, block_n=None, block_k=BLOCK_K, num_stages=None,
                         num_warps=NUM_WARPS):
    """See :func:`kernels.decode_linear`. ``glu_output``: ``weight`` is gate|up [2N, K] and the
    result ``silu(x @ gate.T) * (x @ up.T)`` [M, N]. ``rotary=(cos, sin, head_dim, rot_cols)``: the
    result [M, N] with its first ``rot_cols`` columns (q and k of a q|k|v projection, whole heads)
    rotated as :func:`kernels.rotary` does, cos / sin [M, head_dim]. Either takes a plain projection
    (no prologue, no residual), and ``block_n`` then counts pairs of columns (two weight rows each).
    Keyword-only tuning knobs (``benchmarks/decode_linear.py`` sweeps them): ``block_n`` and
    ``num_stages`` default to :func:`tiles`'s."""
    m, kx = x.shape
    n, k = weight.shape
    out_n, half = n, 0
    if glu_output or rotary is not None:
        assert n % 2 == 0 and norm_weight is None and not silu_input and residual is None, \
            "the GLU output and the rotary take a plain projection"
        assert not (glu_output and rotary is not None), "the GLU output or the rotary"
        n //= 2
        out_n = n if glu_output else out_n
    cos = sin = weight  # never read without ROPE_HALF
    if rotary is not None:
        cos, sin, head_dim, rot_cols = rotary
        half = head_dim // 2
        assert head_dim % 2 == 0 and out_n % head_dim == 0 and rot_cols % head_dim == 0, "whole heads"
        assert cos.shape == sin.shape == (m, head_dim) and cos.stride() == sin.stride() and cos.stride(1) == 1
    assert m <= MAX_ROWS, f"decode_linear takes at most {MAX_ROWS} rows, got {m}"
    assert kx == (2 * k if silu_input else k), f"x has {kx} columns for a weight of {k}"
    assert x.stride(1) == 1 and weight.stride(1) == 1
    assert not (silu_input and norm_weight is not None), "one prologue: the norm or the SiLU"
    if residual is None:
        out = torch.empty((m, out_n), dtype=x.dtype, device=x.device)
    else:
        out = residual
        assert out.shape == (m, n) and out.stride(1) == 1 and out.dtype == x.dtype
    norm_w = norm_weight if norm_weight is not None else weight  # never read without NORM
    pdl = pdl_enabled(x)
    rows_pad = 16 if m <= 16 else 32
    default_n, default_stages = tiles(rows_pad, silu_input, weight.element_size())
    block_n = block_n or default_n
    _decode_linear_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, norm_w, cos, sin, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        cos.stride(0), eps, rotary[3] if rotary is not None else 0,
        M_PAD=rows_pad, BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages or default_stages,
        NORM=norm_weight is not None, SILU=silu_input, ADD=residual is not None, GLU=glu_output,
        ROPE_HALF=half, PAIRS=glu_output or rotary is not None, IEEE_DOT=x.dtype == torch.float32, PDL=pdl,
        num_warps=num_warps, launch_pdl=pdl)
    return out


def decode_gemv_triton(x, weight, tiles, glu=False, rotary=None):
    """``x @ weight.T`` for a decode batch through the plain GEMV with ``tiles`` (:func:`gemv_tiles`);
    with ``glu``, ``silu(gate) * up`` of the gate|up ``weight``; with ``rotary`` (see
    :func:`decode_linear_triton`) q and k rotated. With either, each program reads as many weight
    rows as the tiling says, in pairs."""
    block_n, block_k, stages, warps = tiles
    pairs = glu or rotary is not None
    return decode_linear_triton(x, weight, glu_output=glu, rotary=rotary, block_n=block_n // 2 if pairs else block_n,
                                block_k=block_k, num_stages=stages, num_warps=warps)
