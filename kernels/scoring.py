"""Block scoring in Triton: Quest upper bound and mean-key dot, max over a GQA group.

```
grid (cdiv(M, BLOCK_M), H_kv, N)
  program (i, h, n): table entries m in [i*BLOCK_M, (i+1)*BLOCK_M) of row n
    rows   = block_table[n, m]                       summary row ids
    kmin/kmax/kmean[rows, h, :]  -> [BLOCK_M, D]     read once, fp32 in registers
    for every query w of the window, every head g of KV group h:
      quest[m]   = max(quest[m],   sum_d max(q_d kmin_d, q_d kmax_d))
      meandot[m] = max(meandot[m], sum_d q_d kmean_d)
```
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _block_scores_kernel(
    Q, KMIN, KMAX, KMEAN, TABLE, NUM_BLOCKS, QUEST, MEANDOT,
    stride_qn, stride_qw, stride_qh, stride_qd,
    stride_r, stride_rh, stride_rd,          # shared by kmin / kmax / kmean (asserted equal)
    stride_tn, stride_tm,
    stride_on, stride_oh, stride_om,         # shared by both outputs
    width, window,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_n = tl.program_id(2).to(tl.int64)
    n_blocks = tl.load(NUM_BLOCKS + pid_n)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_row = offs_m < width
    listed = offs_m < n_blocks
    rows = tl.load(TABLE + pid_n * stride_tn + offs_m * stride_tm, mask=listed, other=0).to(tl.int64)
    s_ptrs = rows[:, None] * stride_r + pid_h * stride_rh + offs_d[None, :] * stride_rd
    kmin = tl.load(KMIN + s_ptrs, mask=listed[:, None], other=0.0).to(tl.float32)   # [BLOCK_M, D]
    kmax = tl.load(KMAX + s_ptrs, mask=listed[:, None], other=0.0).to(tl.float32)
    kmean = tl.load(KMEAN + s_ptrs, mask=listed[:, None], other=0.0).to(tl.float32)

    quest = tl.full([BLOCK_M], float("-inf"), tl.float32)
    meandot = tl.full([BLOCK_M], float("-inf"), tl.float32)
    q_row = Q + pid_n * stride_qn + (pid_h * GROUP) * stride_qh + offs_d * stride_qd
    for w in range(0, window):
        for g in tl.static_range(GROUP):
            qv = tl.load(q_row + w * stride_qw + g * stride_qh).to(tl.float32)[None, :]  # [1, D]
            quest = tl.maximum(quest, tl.sum(tl.maximum(qv * kmin, qv * kmax), 1))
            meandot = tl.maximum(meandot, tl.sum(qv * kmean, 1))

    quest = tl.where(listed, quest, float("-inf"))
    meandot = tl.where(listed, meandot, float("-inf"))
    o_off = pid_n * stride_on + pid_h * stride_oh + offs_m * stride_om
    tl.store(QUEST + o_off, quest, mask=in_row)
    tl.store(MEANDOT + o_off, meandot, mask=in_row)


def block_scores_triton(q, kmin, kmax, kmean, block_table, num_blocks, *, out=None, block_m=32,
                        num_warps=4):
    """Triton version of :func:`kernels.block_scores` (same contract)."""
    q4 = q[:, None] if q.dim() == 3 else q                # [N, W, Hq, D]
    n_seq, window, n_qh, head_dim = q4.shape
    n_rows, n_kvh, head_dim_s = kmin.shape
    assert kmax.shape == kmin.shape == kmean.shape and head_dim_s == head_dim
    assert kmin.stride() == kmax.stride() == kmean.stride(), "summaries must share strides"
    assert n_qh % n_kvh == 0
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0
    assert block_table.dim() == 2 and block_table.shape[0] == n_seq
    assert num_blocks.shape == (n_seq,) and num_blocks.dtype == torch.int32
    width = block_table.shape[1]
    if out is None:
        quest = torch.empty((n_seq, n_kvh, width), dtype=torch.float32, device=q.device)
        meandot = torch.empty_like(quest)
    else:
        quest, meandot = out
    assert quest.shape == meandot.shape == (n_seq, n_kvh, width) and quest.stride() == meandot.stride()
    assert quest.dtype == meandot.dtype == torch.float32
    grid = (triton.cdiv(width, block_m), n_kvh, n_seq)
    _block_scores_kernel[grid](
        q4, kmin, kmax, kmean, block_table, num_blocks, quest, meandot,
        *q4.stride(), *kmin.stride(), *block_table.stride(), *quest.stride(),
        width, window,
        GROUP=n_qh // n_kvh, BLOCK_M=block_m, HEAD_DIM=head_dim,
        num_warps=num_warps,
    )
    return quest, meandot
