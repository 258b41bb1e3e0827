"""Flash-attention prefill in Triton: a segment of queries, causal over the keys before them.

The queries of one prompt segment sit at positions [start, start + T); the keys of the whole
prompt so far at [0, start + T). No mask tensor is built: each program walks its keys in two
stages (the Triton tutorial 06 shape), unmasked before its first query, masked on the diagonal.

```
grid (ceil(T / BLOCK_M), Hq)           program (m, h): queries [m*BM, (m+1)*BM) of query head h,
                                       keys of KV head h // G (GQA), log2-domain online softmax

 key  0 ............................ lo | lo ........ hi
      stage 1: every key before the     | stage 2: the diagonal, mask k <= q
      tile's first query (no mask)      | (and k < start + T)
      lo = (start + m*BM) rounded down to BLOCK_N,   hi = min(start + (m+1)*BM, start + T)
```

Keys and values are one layer's ``[Hkv, N, D]`` (any strides, N >= start + T): the layer-by-layer
prefill's scratch, or the prompt gathered from the paged pool.
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend_keys(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_n, q_pos, lo, hi, end,
                 qk_scale, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE_DOT: tl.constexpr):
    """Online softmax over keys [lo, hi): acc [BM, D], l_i / m_i [BM] updated (log2 units)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k_pos = start_n + offs_n                                          # [BN]
        if CAUSAL:
            k = tl.load(k_base + k_pos[:, None] * stride_kn, mask=k_pos[:, None] < end, other=0.0)  # [BN, D]
        else:
            k = tl.load(k_base + k_pos[:, None] * stride_kn)
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale                                                  # [BM, BN]
        if CAUSAL:
            keep = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < end)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if CAUSAL:
            v = tl.load(v_base + k_pos[:, None] * stride_vn, mask=k_pos[:, None] < end, other=0.0)  # [BN, D]
        else:
            v = tl.load(v_base + k_pos[:, None] * stride_vn)
        if IEEE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["num_q", "q_start"])
def _prefill_kernel(
    Q, K, V, O,
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_qd,
    stride_kh, stride_kn, stride_kd,
    stride_vh, stride_vn, stride_vd,
    stride_ot, stride_oh, stride_od,
    num_q, q_start,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    kv_h = pid_h // GROUP
    end = q_start + num_q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                      # rows of the segment
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < num_q
    q_pos = q_start + offs_m                                              # absolute positions

    q = tl.load(Q + offs_m[:, None] * stride_qt + pid_h * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None], other=0.0)                          # [BM, D]
    k_base = K + kv_h.to(tl.int64) * stride_kh + offs_d[None, :] * stride_kd    # K tiles [BN, D]
    v_base = V + kv_h.to(tl.int64) * stride_vh + offs_d[None, :] * stride_vd    # V tiles [BN, D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first = q_start + pid_m * BLOCK_M
    lo = first // BLOCK_N * BLOCK_N
    hi = tl.minimum(first + BLOCK_M, end)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_n, q_pos,
                                 0, lo, end, qk_scale, BLOCK_N, False, IEEE_DOT)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_n, q_pos,
                                 lo, hi, end, qk_scale, BLOCK_N, True, IEEE_DOT)
    out = acc / tl.where(mask_m, l_i, 1.0)[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + pid_h * stride_oh + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=mask_m[:, None])


def default_tiles(head_dim: int) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages): the tutorial's forward configs for Hopper."""
    if head_dim >= 128:
        return 128, 64, 8, 3
    return 128, 64, 4, 3


def prefill_attention_triton(q, k, v, q_start, scale, *, out=None, block_m=None, block_n=None,
                             num_warps=None, num_stages=None):
    """Triton version of :func:`kernels.prefill_attention` (same contract). Keyword-only tuning
    knobs: tile sizes, warps and pipeline stages (default :func:`default_tiles`)."""
    num_q, n_qh, head_dim = q.shape
    n_kvh, n_keys, head_dim_k = k.shape
    assert v.shape == k.shape and head_dim_k == head_dim, "k / v: [Hkv, N, D], the same shape"
    assert n_qh % n_kvh == 0, "query heads must be a multiple of KV heads"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head dim: power of two >= 16"
    assert 0 <= q_start and q_start + num_q <= n_keys, "keys must cover [0, q_start + T)"
    assert k.dtype == v.dtype == q.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    int32 = 2 ** 31  # row offsets are 32-bit inside the kernel
    assert num_q * max(q.stride(0), 1) < int32 and n_keys * max(k.stride(1), v.stride(1), 1) < int32
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape
    bm, bn, warps, stages = default_tiles(head_dim)
    block_m, block_n = block_m or bm, block_n or bn
    assert block_m >= 16 and block_n >= 16 and block_m & (block_m - 1) == 0 and block_n & (block_n - 1) == 0
    if num_q == 0:
        return out
    grid = (triton.cdiv(num_q, block_m), n_qh)
    _prefill_kernel[grid](
        q, k, v, out, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        num_q, q_start,
        GROUP=n_qh // n_kvh, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim,
        IEEE_DOT=q.dtype == torch.float32,
        num_warps=num_warps or warps, num_stages=num_stages or stages,
    )
    return out
