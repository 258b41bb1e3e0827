"""GPU math of lsa-serve: sparse paged decode attention, block scoring, paged KV write, blocks
loaded from the host mirror (dequantized).

Every function here runs its Triton kernel on CUDA tensors and its plain-torch reference
(``kernels.reference``) elsewhere; ``LSA_KERNELS`` overrides that (see ``kernels.dispatch``).
The pool layout is docs/kv-layout.md; the design is docs/kernels.md. No model, no Ray.
"""
import torch

from . import reference
from .dispatch import pick, use_triton

DECODE_LINEAR_MAX_ROWS = 32  # kernels.decode_linear's rows (a decode batch)
DECODE_GEMV_MAX_ROWS = 4  # decode_gemv's rows: the H200 sweep measured batch 1 and 4; larger keep cuBLAS

__all__ = ["sparse_decode_attention", "prefill_attention", "block_scores", "select_blocks", "paged_kv_write",
           "load_blocks", "quantize_int4", "rms_norm", "rotary", "silu_mul", "decode_linear", "decode_gemv", "reference"]


def _dim(t, i: int) -> int | None:
    """``t.shape[i]``, or None when ``t`` is not a tensor (the kernel's own checks report it)."""
    return t.shape[i] if isinstance(t, torch.Tensor) else None


def sparse_decode_attention(q, k_cache, v_cache, block_table, num_blocks, last_len, scale,
                            return_block_mass=False, *, out=None, mass_out=None):
    """Decode attention of one query per sequence over the KV blocks its table row lists.

    Args:
        q:           [N, Hq, D] one decode query per sequence (bf16 / fp16; fp32 too).
        k_cache:     [S, Hkv, B, D] one layer of the pool, e.g. ``kv_pool[l, 0]``; any
                     strides, but the head dim should be contiguous for speed.
        v_cache:     [S, Hkv, B, D] same shape and dtype, e.g. ``kv_pool[l, 1]``.
        block_table: [N, M] int32 slot ids; entries ``>= num_blocks[n]`` are never read.
        num_blocks:  [N] int32, >= 1: valid entries of each row.
        last_len:    [N] int32 in 1..B: valid tokens of the last listed block; every other
                     listed block is full. Full blocks may be listed in any order.
        scale:       softmax scale (usually D ** -0.5).
        return_block_mass: also return each listed block's share of the softmax.
        out, mass_out: optional preallocated outputs (e.g. static buffers for CUDA graphs).

    Returns:
        out [N, Hq, D] in q's dtype; with ``return_block_mass`` also mass [N, Hq, M] fp32
        (sums to 1 over a row's listed blocks, 0 for padding entries).

    Query head i uses KV head i // (Hq // Hkv) (the repeat_interleave GQA convention).
    """
    fn = pick(q, "sparse_attention", "sparse_decode_attention", q.shape[-1], _dim(k_cache, 2))
    return fn(q, k_cache, v_cache, block_table, num_blocks, last_len, scale, return_block_mass,
              out=out, mass_out=mass_out)


def prefill_attention(q, k, v, q_start, scale, *, out=None):
    """Causal attention of a prompt segment over the prompt so far (flash attention, no mask).

    Args:
        q:       [T, Hq, D] queries at positions ``q_start .. q_start + T - 1``.
        k, v:    [Hkv, N, D] keys and values of one layer at positions 0 .. N-1 (any strides;
                 N >= q_start + T; keys past q_start + T are never read).
        q_start: position of the first query.
        scale:   softmax scale (usually D ** -0.5).
        out:     optional [T, Hq, D] output.

    Returns:
        [T, Hq, D] in q's dtype: query i attends to keys 0 .. q_start + i. Query head h uses
        KV head h // (Hq // Hkv).
    """
    fn = pick(q, "flash_prefill", "prefill_attention", q.shape[-1])
    return fn(q, k, v, q_start, scale, out=out)


def block_scores(q, kmin, kmax, kmean, block_table, num_blocks, *, out=None):
    """Score blocks from their key summaries: Quest upper bound and mean-key dot product.

    Args:
        q:           [N, Hq, D] queries, or [N, W, Hq, D] a window of W recent queries.
        kmin, kmax, kmean: [R, Hkv, D] summary rows (one layer), same dtype and strides.
        block_table: [N, M] int32 summary row ids; entries ``>= num_blocks[n]`` are never read.
        num_blocks:  [N] int32 valid entries of each row.
        out:         optional preallocated (quest, meandot).

    Returns:
        (quest, meandot), each [N, Hkv, M] fp32: ``quest = sum_d max(q_d kmin_d, q_d kmax_d)``
        and ``meandot = q . kmean``, each maxed over the query heads of the KV group (and
        over the W queries of a window); ``-inf`` for entries ``>= num_blocks``.
    """
    fn = pick(q, "scoring", "block_scores", q.shape[-1])
    return fn(q, kmin, kmax, kmean, block_table, num_blocks, out=out)


def paged_kv_write(k, v, k_cache, v_cache, slot_ids, offsets, kmin=None, kmax=None, kmean=None,
                   summary_ids=None):
    """Write new tokens' K and V into their pool slots; optionally refresh block summaries.

    Args:
        k, v:        [T, Hkv, D] new tokens (cast to the cache dtype).
        k_cache, v_cache: [S, Hkv, B, D] one layer of the pool, written in place.
        slot_ids:    [T] int32 / int64 device slot of each token's block.
        offsets:     [T] int32 / int64 position inside the block, 0..B-1.
        kmin, kmax, kmean: optional [R, Hkv, D] summary rows (same dtype and strides).
        summary_ids: [T] summary row of each token's block (the same for all tokens of a block).

    After the call, for every block touched, ``kmin/kmax/kmean[summary_ids[t]]`` are the
    min / max / mean over ``k_cache[slot, h, 0 : max offset written in this call + 1]``, i.e.
    the block's whole valid prefix, so decode (one token at a time) and prefill (many tokens
    of a block at once) both leave correct summaries. Tokens of one call must not share a
    (slot, offset).
    """
    fn = pick(k, "kv_write", "paged_kv_write", k.shape[-1])
    fn(k, v, k_cache, v_cache, slot_ids, offsets, kmin, kmax, kmean, summary_ids)


def load_blocks(src, meta, dst, slots, fmt="model"):
    """Write whole blocks copied from the host mirror into their pool slots, dequantized.

    Args:
        src:   [n, L, 2, H, B, D] rows in the pool dtype (``fmt="model"``) or float8 e4m3
               (``"fp8"``); [n, L, 2, H, B, D/2] uint8 4-bit codes (``"int4"``, see
               :func:`quantize_int4`). On the pool's device.
        meta:  None (model); fp8: scale [n, L, 2, H] float32; int4: [n, L, H, 2D + 2B] float16.
        dst:   [L, 2, S, H, B, D] the pool, or a range of its layers (``pool[l:l+1]``); written
               at ``dst[:, :, slots[i]]`` only.
        slots: [n] int32 / int64 device slots, distinct.
        fmt:   ``model``, ``fp8`` or ``int4``.

    Returns:
        dst. Values are computed in fp32 and rounded once to the pool dtype.
    """
    fn = pick(dst, "block_load", "load_blocks", dst.shape[-1], dst.shape[-2])
    return fn(src, meta, dst, slots, fmt)


def quantize_int4(blocks):
    """Blocks [..., 2, H, B, D] -> (codes [..., 2, H, B, D/2] uint8, meta [..., H, 2D + 2B] float16):
    4-bit codes with KIVI's grouping (keys per channel over the block's tokens, values per token
    over the channels), each group's min rounded down and scale rounded up to float16, so that
    ``|x - dequantized| <= scale / 2`` of its group. Plain torch on any device."""
    return reference.quantize_int4(blocks)


def select_blocks(scores, num_blocks, k=None, threshold=None, top_p=None):
    """Choose blocks from scores: top-k, score threshold and/or top-p of mass (plain torch).

    Args:
        scores:     [N, M] or [N, H, M] (e.g. ``block_scores`` output or block mass).
        num_blocks: [N] valid entries per row; the rest is never selected.
        k:          keep at most k blocks (the highest scores).
        threshold:  keep only blocks with ``score >= threshold``.
        top_p:      keep the smallest highest-score prefix whose summed score reaches
                    ``top_p`` of the row's total (for non-negative scores such as mass).
        Filters compose: threshold, then top_p, then k. None of them keeps every listed block.

    Returns:
        (idx, count): idx [..., K] int64 column indices into the row (not slot ids), sorted by
        score descending, -1 after the first ``count`` entries; K = min(k, M) if k else M.
        count [...] int32 number of selected blocks.
    """
    return reference.select_blocks(scores, num_blocks, k=k, threshold=threshold, top_p=top_p)


def rms_norm(x, weight, eps, residual_in=None):
    """RMSNorm of each row, as the Llama module computes it: ``weight * (x * rsqrt(mean(x^2) +
    eps)).to(x.dtype)``, statistics in fp32.

    Args:
        x:      [T, H] activations (the last dim contiguous).
        weight: [H].
        residual_in: optional [T, H]: first ``x += residual_in`` **in place** (the residual
                stream after a sublayer), then the norm of the sum.

    Returns:
        [T, H] in the promoted dtype of weight and x.
    """
    return pick(x, "fused", "rms_norm")(x, weight, eps, residual_in)


def decode_linear(x, weight, norm_weight=None, eps=0.0, silu_input=False, residual=None):
    """A decode batch's projection ``y = a @ weight.T``, with its neighbours in the layer fused.

    Args:
        x:           [M, K] activations, M <= 32 (a decode batch; the last dim contiguous).
        weight:      [N, K] (an ``nn.Linear``'s, no bias).
        norm_weight: optional [K]: ``a = rms_norm(x, norm_weight, eps)`` (as :func:`rms_norm`,
                     without its residual add); else ``a = x``.
        silu_input:  ``x`` is [M, 2K], gate | up: ``a = silu_mul(gate, up)`` (as :func:`silu_mul`).
        residual:    optional [M, N]: ``residual += y`` **in place** (the residual stream after
                     the sublayer; ``y`` rounded to the activation dtype first) and returned.

    Returns:
        [M, N] in x's dtype: ``y``, or ``residual`` when given.
    """
    return pick(x, "projection", "decode_linear")(x, weight, norm_weight, eps, silu_input, residual)


def _gemv_tiles_for(linear, x):
    """The plain GEMV's tiles for ``linear(x)``, or None where the Linear runs (see decode_gemv)."""
    weight = linear.weight
    if (type(linear) is torch.nn.Linear and linear.bias is None and use_triton(x) and x.dim() == 2
            and x.shape[0] <= DECODE_GEMV_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.stride(1) == 1):
        from .projection import gemv_tiles
        return gemv_tiles(*weight.shape)
    return None


def decode_gemv(linear, x):
    """``linear(x)`` for a decode batch, through the plain Triton GEMV where it beat cuBLAS on the
    H200 (``kernels.projection.gemv_tiles``: q|k|v, o, down, gate|up and the LM head of Llama-3-8B shapes,
    at most ``DECODE_GEMV_MAX_ROWS`` rows, bf16 / fp16, no bias); ``linear(x)`` otherwise (the CPU,
    larger batches, other shapes). The same product up to the order of the fp32 sums.

    Args:
        linear: an ``nn.Linear`` ([N, K] weight); a subclass (a tensor-parallel shard) is called as it is.
        x:      [M, K] activations, the last dim contiguous.
    """
    tiles = _gemv_tiles_for(linear, x)
    if tiles is None:
        return linear(x)
    from .projection import decode_gemv_triton
    return decode_gemv_triton(x, linear.weight, tiles)


def decode_gemv_glu(gate_up, x):
    """``silu_mul(gate, up)`` of ``gate_up(x)`` (the fused gate|up Linear, [2I, K]): where
    :func:`decode_gemv` would run the Triton GEMV, one kernel whose programs own the same columns of
    gate and up and end with the SwiGLU (no [M, 2I] output, no separate SiLU kernel); otherwise the
    Linear then :func:`silu_mul`. Rounds where they do (gate and up, the SiLU, the product)."""
    tiles = _gemv_tiles_for(gate_up, x)
    if tiles is None:
        gate, up = gate_up(x).chunk(2, dim=-1)
        return silu_mul(gate, up)
    from .projection import decode_gemv_triton
    return decode_gemv_triton(x, gate_up.weight, tiles, glu=True)


def decode_gemv_rope(qkv_proj, x, cos, sin, head_dim, rot_cols):
    """``qkv_proj(x)`` with its first ``rot_cols`` columns (q and k, whole heads of ``head_dim``)
    rotated as :func:`rotary` does: where :func:`decode_gemv` would run the Triton GEMV, one kernel
    whose programs own both halves of their heads' columns and rotate them before the store (no
    separate rotary kernel); otherwise the Linear (or decode_gemv's GEMV) then :func:`rotary`.
    cos, sin: [M, head_dim]. Rounds where they do (the projection, then each product and the sum)."""
    tiles = _gemv_tiles_for(qkv_proj, x)
    if tiles is not None and head_dim % 2 == 0 and cos.stride(1) == 1:
        from .projection import decode_gemv_triton
        return decode_gemv_triton(x, qkv_proj.weight, tiles, rotary=(cos, sin, head_dim, rot_cols))
    qkv = decode_gemv(qkv_proj, x)
    rotary(qkv[:, :rot_cols].view(x.shape[0], rot_cols // head_dim, head_dim), cos, sin)
    return qkv


def rotary(x, cos, sin):
    """Rotary embedding applied **in place**: ``x * cos + rotate_half(x) * sin``.

    Args:
        x:   [T, H, D] queries or keys (the last dim contiguous).
        cos, sin: [T, D] per token (the two halves of D repeat the same frequencies).

    Returns:
        x.
    """
    return pick(x, "fused", "rotary")(x, cos, sin)


def silu_mul(gate, up):
    """``silu(gate) * up`` (the SwiGLU MLP), [T, I] each -> [T, I]."""
    return pick(gate, "fused", "silu_mul")(gate, up)
