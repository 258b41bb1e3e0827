"""Block scoring in Triton: Quest upper bound and mean-key dot, max over a GQA group.

```
grid (cdiv(M, BLOCK_M), H_kv, N)
  program (i, h, n): table entries m in [i*BLOCK_M, (i+1)*BLOCK_M) of row n
    rows = block_table[n, m]                         summary row ids
    kmin/kmax/kmean[rows, h, :]  -> [BLOCK_M, D]     read once
    q rows r = w*G + g: the G heads of KV group h for each of the W window queries, [R_PAD, D]
    quest   = kmax @ max(q, 0)^T + kmin @ min(q, 0)^T  [BLOCK_M, R_PAD]   (three tl.dot,
    meandot = kmean @ q^T                               [BLOCK_M, R_PAD]    fp32 accumulate)
    -> max over the R valid rows
```
sum_d max(q_d kmin_d, q_d kmax_d) = sum_d (q_d+ kmax_d + q_d- kmin_d) whenever kmin <= kmax,
which summaries of real keys satisfy. q is rounded to the summaries' dtype for the dot.
"""
import torch
import triton
import triton.language as tl


# Level-1 scores every complete block of a sequence: the width grows by one every B tokens. Not
# specialized on it nor on the strides that follow it (Triton specializes integers divisible by
# 16), one compiled kernel serves every width; otherwise a boundary that meets a new pattern
# (M = 2049, then 2050 with 8M divisible by 16) compiles another, mid-run.
@triton.jit(do_not_specialize=["stride_tn", "stride_on", "stride_oh", "width"])
def _block_scores_kernel(
    Q, KMIN, KMAX, KMEAN, TABLE, NUM_BLOCKS, QUEST, MEANDOT,
    stride_qn, stride_qw, stride_qh, stride_qd,
    stride_r, stride_rh, stride_rd,          # shared by kmin / kmax / kmean (asserted equal)
    stride_tn, stride_tm,
    stride_on, stride_oh, stride_om,         # shared by both outputs
    width,
    GROUP: tl.constexpr, WINDOW: tl.constexpr, ROWS_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_n = tl.program_id(2).to(tl.int64)
    n_blocks = tl.load(NUM_BLOCKS + pid_n)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_r = tl.arange(0, ROWS_PAD)
    in_row = offs_m < width
    listed = offs_m < n_blocks
    valid_r = offs_r < WINDOW * GROUP

    q_ptrs = (Q + pid_n * stride_qn + (offs_r // GROUP)[:, None] * stride_qw
              + (pid_h * GROUP + offs_r % GROUP)[:, None] * stride_qh + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=valid_r[:, None], other=0.0).to(KMIN.dtype.element_ty)  # [R_PAD, D]
    q_pos = tl.trans(tl.maximum(q, 0.0).to(q.dtype))                  # [D, R_PAD]
    q_neg = tl.trans(tl.minimum(q, 0.0).to(q.dtype))
    q_t = tl.trans(q)

    rows = tl.load(TABLE + pid_n * stride_tn + offs_m * stride_tm, mask=listed, other=0).to(tl.int64)
    s_ptrs = rows[:, None] * stride_r + pid_h * stride_rh + offs_d[None, :] * stride_rd
    kmin = tl.load(KMIN + s_ptrs, mask=listed[:, None], other=0.0)   # [BLOCK_M, D]
    kmax = tl.load(KMAX + s_ptrs, mask=listed[:, None], other=0.0)
    kmean = tl.load(KMEAN + s_ptrs, mask=listed[:, None], other=0.0)
    if IEEE_DOT:
        quest = tl.dot(kmax, q_pos, input_precision="ieee")
        quest = tl.dot(kmin, q_neg, quest, input_precision="ieee")
        meandot = tl.dot(kmean, q_t, input_precision="ieee")
    else:
        quest = tl.dot(kmin, q_neg, tl.dot(kmax, q_pos))             # [BLOCK_M, R_PAD] fp32
        meandot = tl.dot(kmean, q_t)

    neg_inf = float("-inf")
    quest = tl.max(tl.where(valid_r[None, :], quest, neg_inf), 1)     # [BLOCK_M]
    meandot = tl.max(tl.where(valid_r[None, :], meandot, neg_inf), 1)
    quest = tl.where(listed, quest, neg_inf)
    meandot = tl.where(listed, meandot, neg_inf)
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
        width,
        GROUP=n_qh // n_kvh, WINDOW=window, ROWS_PAD=max(16, triton.next_power_of_2(window * n_qh // n_kvh)),
        BLOCK_M=block_m, HEAD_DIM=head_dim, IEEE_DOT=kmin.dtype == torch.float32,
        num_warps=num_warps,
    )
    return quest, meandot
