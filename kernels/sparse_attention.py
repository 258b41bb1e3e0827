"""Sparse paged decode attention in Triton (flash-decoding over a list of KV blocks).

One decode query per sequence attends to the blocks its block-table row lists, read in place
from the paged pool (docs/kv-layout.md). Two launches:

```
pass 1, grid (SPLITS, H_kv, N)                 pass 2, grid (H_q, N)
  program (s, h, n): listed blocks                combine the SPLITS partials of a
  [s*P, (s+1)*P) of row n, P = cdiv(num_blocks[n], query head by their log-sum-exp;
  SPLITS); all G query heads of KV head h ->      optionally turn the per-block lse
  o_part[n, hG:hG+G, s, :]  (normalised, fp32)    into softmax mass
  lse_part[n, hG:hG+G, s]   (log2 units)
  block_lse[n, hG:hG+G, j]  (if mass wanted)
```

Each K/V tile [B, D] of a (slot, KV head) is contiguous and read exactly once; the G query
heads of the group share it through one tl.dot with G padded to 16 rows. A row's listed blocks
are shared out over the splits by its own ``num_blocks``, not by the table's width: a table wider
than what it lists (a CUDA graph's, sized for the widest row it may hold) reads and computes
nothing more, and every split keeps an equal share of the work.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from .pdl import enabled as pdl_enabled

LOG2E = 1.4426950408889634
MIN_BLOCKS = 1  # the default of sparse_decode_attention_triton's min_blocks


@triton.jit
def _split_kernel(
    Q, K, V, TABLE, NUM_BLOCKS, LAST_LEN, O_PART, LSE_PART, BLOCK_LSE,
    qk_scale,  # softmax scale * log2(e)
    min_blocks,  # a row's blocks go to at most cdiv(num_blocks, min_blocks) of the splits
    stride_qn, stride_qh, stride_qd,
    stride_ks, stride_kh, stride_kb, stride_kd,
    stride_vs, stride_vh, stride_vb, stride_vd,
    stride_tn, stride_tm,
    stride_on, stride_oh, stride_os, stride_od,
    stride_ln, stride_lh, stride_ls,
    stride_mn, stride_mh, stride_mm,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    RETURN_MASS: tl.constexpr, IEEE_DOT: tl.constexpr, NUM_STAGES: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # launched before the previous kernel is done (kernels/pdl.py): wait for it here
        tl.extra.cuda.gdc_wait()
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_n = tl.program_id(2).to(tl.int64)

    n_blocks = tl.load(NUM_BLOCKS + pid_n)
    last_len = tl.load(LAST_LEN + pid_n)
    active = tl.minimum(tl.num_programs(0), tl.cdiv(n_blocks, min_blocks))
    per_split = tl.cdiv(n_blocks, active)                             # this row's blocks, not the width
    start = pid_s * per_split
    end = tl.minimum(start + per_split, n_blocks)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_b = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_g = offs_g < GROUP
    heads = pid_h * GROUP + offs_g                                    # [G_PAD] query heads

    q_ptrs = Q + pid_n * stride_qn + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_g[:, None], other=0.0).to(K.dtype.element_ty)  # [G_PAD, D]

    k_base = K + pid_h * stride_kh + offs_b[:, None] * stride_kb + offs_d[None, :] * stride_kd
    v_base = V + pid_h * stride_vh + offs_b[:, None] * stride_vb + offs_d[None, :] * stride_vd
    table_row = TABLE + pid_n * stride_tn
    mass_row = BLOCK_LSE + pid_n * stride_mn + heads * stride_mh

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for j in tl.range(start, end, num_stages=NUM_STAGES):
        slot = tl.load(table_row + j * stride_tm).to(tl.int64)
        n_valid = tl.where(j == n_blocks - 1, last_len, BLOCK)
        mask_b = offs_b < n_valid                                     # [B]
        k = tl.load(k_base + slot * stride_ks, mask=mask_b[:, None], other=0.0)   # [B, D]
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(mask_b[None, :], s * qk_scale, float("-inf"))  # [G_PAD, B] log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        p_sum = tl.sum(p, 1)
        l_i = l_i * alpha + p_sum
        v = tl.load(v_base + slot * stride_vs, mask=mask_b[:, None], other=0.0)   # [B, D]
        if IEEE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
        if RETURN_MASS:
            # block log-sum-exp in log2 units, relative to nothing: m_new + log2(sum p)
            tl.store(mass_row + j * stride_mm, m_new + tl.log2(p_sum), mask=mask_g)

    has = l_i > 0.0                                                   # empty split: nothing
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    o_ptrs = (O_PART + pid_n * stride_on + heads[:, None] * stride_oh + pid_s * stride_os
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out, mask=mask_g[:, None])
    tl.store(LSE_PART + pid_n * stride_ln + heads * stride_lh + pid_s * stride_ls, lse, mask=mask_g)


@triton.jit
def _combine_kernel(
    O_PART, LSE_PART, OUT, MASS, NUM_BLOCKS,
    stride_on, stride_oh, stride_os, stride_od,
    stride_ln, stride_lh, stride_ls,
    stride_outn, stride_outh, stride_outd,
    stride_mn, stride_mh, stride_mm,
    num_splits, width,
    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, RETURN_MASS: tl.constexpr,
    MASS_TILE: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # launched before the previous kernel is done (kernels/pdl.py): wait for it here
        tl.extra.cuda.gdc_wait()
    pid_h = tl.program_id(0)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_s = offs_s < num_splits

    lse = tl.load(LSE_PART + pid_n * stride_ln + pid_h * stride_lh + offs_s * stride_ls,
                  mask=mask_s, other=float("-inf"))                   # [SPLITS_PAD]
    lse_max = tl.max(lse, 0)                                          # finite: split 0 has a block
    w = tl.exp2(lse - lse_max)
    w_sum = tl.sum(w, 0)
    o_ptrs = (O_PART + pid_n * stride_on + pid_h * stride_oh + offs_s[:, None] * stride_os
              + offs_d[None, :] * stride_od)
    o = tl.load(o_ptrs, mask=mask_s[:, None], other=0.0)             # [SPLITS_PAD, D]
    out = tl.sum(o * w[:, None], 0) / w_sum
    tl.store(OUT + pid_n * stride_outn + pid_h * stride_outh + offs_d * stride_outd,
             out.to(OUT.dtype.element_ty))

    if RETURN_MASS:
        lse_total = lse_max + tl.log2(w_sum)
        n_blocks = tl.load(NUM_BLOCKS + pid_n)
        row = MASS + pid_n * stride_mn + pid_h * stride_mh
        for m0 in range(0, width, MASS_TILE):
            offs_m = m0 + tl.arange(0, MASS_TILE)
            listed = offs_m < n_blocks
            blk = tl.load(row + offs_m * stride_mm, mask=listed, other=float("-inf"))
            mass = tl.where(listed, tl.exp2(blk - lse_total), 0.0)
            tl.store(row + offs_m * stride_mm, mass, mask=offs_m < width)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_stages(block: int, head_dim: int, elem_bytes: int) -> int:
    """Deepest pipeline (<= 3) whose K and V tiles fit in shared memory twice over."""
    tile = block * head_dim * elem_bytes
    return 3 if 6 * tile <= 160 * 1024 else 2 if 4 * tile <= 160 * 1024 else 1


@functools.lru_cache(maxsize=None)
def default_num_splits(n_seq: int, n_kvh: int, device: torch.device,
                       stages: int = 3, tile_bytes: int = 16384) -> int:
    """Split count that fills whole waves of the GPU, about two of them.

    Resident programs per SM are estimated from shared memory (``stages`` K and V tiles per
    program, 228 KB per SM). The smallest split count giving >= 1.5 waves at >= 95% wave
    efficiency wins (at most 1024). It depends on the grid alone, never on the table's width: the
    split count fixes the order in which partial sums are combined, so the same rows in a wider
    table (an offloading policy's CUDA graph is as wide as its decode reserve) must give the same
    bits as in a narrow one (budget 1.0 equals full attention bit-exactly); a row with fewer
    blocks than splits leaves the extra programs empty. Cached: eager decode asks every step.
    Measured on the H200, 512K x 1 seq at 13.5%, 3 stages (2 programs per SM): 66 splits (2.0
    waves) 85.5 us, 33 (1 wave) 89.7 us, 132 (4 waves) 87.0 us; with 2 stages (3 per SM, so 66
    splits = 1.33 waves) 99.9 us.
    """
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
    per_sm = max(1, min(4, (228 * 1024) // (2 * stages * tile_bytes + 1024)))
    slots = sms * per_sm
    base = n_seq * n_kvh
    best, best_eff = 1, 0.0
    for splits in range(1, 1025):
        waves = base * splits / slots
        eff = waves / math.ceil(waves)
        if waves >= 1.5 and eff >= 0.95:
            return splits
        if eff > best_eff + 1e-9:
            best, best_eff = splits, eff
    return best


def sparse_decode_attention_triton(q, k_cache, v_cache, block_table, num_blocks, last_len, scale,
                                   return_block_mass=False, *, out=None, mass_out=None,
                                   num_splits=None, num_warps=4, num_stages=None, min_blocks=None):
    """Triton version of :func:`kernels.sparse_decode_attention` (same contract).

    ``out`` / ``mass_out``: optional preallocated outputs. Keyword-only tuning knobs, defaults
    chosen by ``benchmarks/kernels.py --sweep`` on the H200: ``num_splits`` (programs per
    (sequence, KV head) in pass 1; default :func:`default_num_splits`), ``num_warps``,
    ``num_stages`` (software pipelining depth of the block loop), ``min_blocks`` (a row's blocks
    are shared out over at most ``cdiv(num_blocks, min_blocks)`` splits, the others stay empty:
    a short row keeps a few programs busy instead of many for one block each; it depends on
    the row alone, so the bits do not depend on the table's width).
    """
    n_seq, n_qh, head_dim = q.shape
    n_slots, n_kvh, block, head_dim_k = k_cache.shape
    assert v_cache.shape == k_cache.shape and head_dim_k == head_dim, "k/v cache [S, Hkv, B, D]"
    assert n_qh % n_kvh == 0, "query heads must be a multiple of KV heads"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head dim: power of two >= 16"
    assert block & (block - 1) == 0 and 16 <= block <= 128, "block size: power of two in 16..128"
    assert block_table.dim() == 2 and block_table.shape[0] == n_seq
    assert num_blocks.shape == (n_seq,) and last_len.shape == (n_seq,)
    assert num_blocks.dtype == torch.int32 and last_len.dtype == torch.int32
    assert k_cache.dtype == v_cache.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    width = block_table.shape[1]
    group = n_qh // n_kvh
    dev = q.device
    if num_stages is None:
        num_stages = default_num_stages(block, head_dim, k_cache.element_size())
    if num_splits is None:
        num_splits = default_num_splits(n_seq, n_kvh, dev, num_stages, block * head_dim * k_cache.element_size())
    num_splits = max(1, num_splits)  # each row's blocks are shared out over them in the kernel
    pdl = pdl_enabled(q)

    o_part = torch.empty((n_seq, n_qh, num_splits, head_dim), dtype=torch.float32, device=dev)
    lse_part = torch.empty((n_seq, n_qh, num_splits), dtype=torch.float32, device=dev)
    if out is None:
        out = torch.empty((n_seq, n_qh, head_dim), dtype=q.dtype, device=dev)
    assert out.shape == (n_seq, n_qh, head_dim)
    if not return_block_mass:
        mass = o_part  # never touched
    elif mass_out is None:
        mass = torch.empty((n_seq, n_qh, width), dtype=torch.float32, device=dev)
    else:
        mass = mass_out
        assert mass.shape == (n_seq, n_qh, width) and mass.dtype == torch.float32

    _split_kernel[(num_splits, n_kvh, n_seq)](
        q, k_cache, v_cache, block_table, num_blocks, last_len, o_part, lse_part, mass,
        scale * LOG2E, max(1, MIN_BLOCKS if min_blocks is None else min_blocks),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_table.stride(),
        *o_part.stride(), *lse_part.stride(), *mass.stride()[:3],
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK=block,
        HEAD_DIM=head_dim, RETURN_MASS=return_block_mass,
        IEEE_DOT=k_cache.dtype == torch.float32, NUM_STAGES=num_stages, PDL=pdl,
        num_warps=num_warps, launch_pdl=pdl,
    )
    _combine_kernel[(n_qh, n_seq)](
        o_part, lse_part, out, mass, num_blocks,
        *o_part.stride(), *lse_part.stride(), *out.stride(), *mass.stride()[:3],
        num_splits, width,
        SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
        RETURN_MASS=return_block_mass, MASS_TILE=128, PDL=pdl,
        num_warps=4, launch_pdl=pdl,
    )
    return (out, mass) if return_block_mass else out
