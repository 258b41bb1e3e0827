"""Paged KV write in Triton, with the block summaries (min / max / mean key) kept current.

```
pass 1, grid (T,)         token t: k[t], v[t]  [H_kv, D]  ->  cache[slot[t], :, off[t], :]
(torch, no host sync)     max_off[slot] = max offset written to each slot in this call
pass 2, grid (T, H_kv)    token t is its block's representative iff off[t] == max_off[slot[t]]:
                          it reads cache[slot, h, 0:off+1, :] (the valid prefix, written by
                          pass 1 or earlier calls) and stores min / max / mean into
                          kmin / kmax / kmean[summary_ids[t], h, :]; other tokens do nothing
```

Two passes because several tokens of one block may arrive in one call (prefill): a single
pass would race between the token writes and the summary reads of other programs.
"""
import torch
import triton
import triton.language as tl

from .pdl import enabled as pdl_enabled


@triton.jit
def _write_kernel(
    K, V, K_CACHE, V_CACHE, SLOTS, OFFSETS,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cs, stride_ch, stride_cb, stride_cd,
    stride_ds, stride_dh, stride_db, stride_dd,
    n_kvh,
    HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # launched before the previous kernel is done (kernels/pdl.py): wait for it here
        tl.extra.cuda.gdc_wait()
    pid_t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + pid_t).to(tl.int64)
    off = tl.load(OFFSETS + pid_t).to(tl.int64)
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < n_kvh)[:, None]
    k = tl.load(K + pid_t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd,
                mask=mask)                                            # [H_PAD, D]
    v = tl.load(V + pid_t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd,
                mask=mask)
    kc = K_CACHE + slot * stride_cs + off * stride_cb + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd
    vc = V_CACHE + slot * stride_ds + off * stride_db + offs_h[:, None] * stride_dh + offs_d[None, :] * stride_dd
    tl.store(kc, k.to(K_CACHE.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(V_CACHE.dtype.element_ty), mask=mask)


@triton.jit
def _summary_kernel(
    K_CACHE, SLOTS, OFFSETS, MAX_OFF, SUMMARY_IDS, KMIN, KMAX, KMEAN,
    stride_cs, stride_ch, stride_cb, stride_cd,
    stride_r, stride_rh, stride_rd,          # shared by kmin / kmax / kmean (asserted equal)
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    slot = tl.load(SLOTS + pid_t).to(tl.int64)
    off = tl.load(OFFSETS + pid_t).to(tl.int32)
    last = tl.load(MAX_OFF + slot)
    # only the token at its block's max offset works; the others see an empty block
    limit = tl.where(off == last, last, -1)
    offs_b = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = offs_b <= limit                                           # [B]
    ptrs = (K_CACHE + slot * stride_cs + pid_h * stride_ch + offs_b[:, None] * stride_cb
            + offs_d[None, :] * stride_cd)
    k = tl.load(ptrs, mask=valid[:, None], other=0.0).to(tl.float32)  # [B, D]
    k_min = tl.min(tl.where(valid[:, None], k, float("inf")), 0)      # [D]
    k_max = tl.max(tl.where(valid[:, None], k, float("-inf")), 0)
    k_mean = tl.sum(k, 0) / (last + 1).to(tl.float32)
    row = tl.load(SUMMARY_IDS + pid_t).to(tl.int64)
    s_off = row * stride_r + pid_h * stride_rh + offs_d * stride_rd
    keep = offs_d < tl.where(limit >= 0, HEAD_DIM, 0)
    tl.store(KMIN + s_off, k_min.to(KMIN.dtype.element_ty), mask=keep)
    tl.store(KMAX + s_off, k_max.to(KMAX.dtype.element_ty), mask=keep)
    tl.store(KMEAN + s_off, k_mean.to(KMEAN.dtype.element_ty), mask=keep)


def paged_kv_write_triton(k, v, k_cache, v_cache, slot_ids, offsets, kmin=None, kmax=None,
                          kmean=None, summary_ids=None):
    """Triton version of :func:`kernels.paged_kv_write` (same contract)."""
    n_tok, n_kvh, head_dim = k.shape
    n_slots, n_kvh_c, block, head_dim_c = k_cache.shape
    assert v.shape == k.shape and v_cache.shape == k_cache.shape
    assert n_kvh_c == n_kvh and head_dim_c == head_dim
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0
    assert slot_ids.shape == (n_tok,) and offsets.shape == (n_tok,)
    if n_tok == 0:
        return
    pdl = pdl_enabled(k)
    _write_kernel[(n_tok,)](
        k, v, k_cache, v_cache, slot_ids, offsets,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        n_kvh, HEADS_PAD=triton.next_power_of_2(n_kvh), HEAD_DIM=head_dim, PDL=pdl,
        num_warps=4, launch_pdl=pdl,
    )
    if kmin is None:
        return
    assert kmax is not None and kmean is not None and summary_ids is not None
    assert summary_ids.shape == (n_tok,)
    assert kmin.shape[1:] == (n_kvh, head_dim) and kmin.shape == kmax.shape == kmean.shape
    assert kmin.stride() == kmax.stride() == kmean.stride(), "summaries must share strides"
    max_off = torch.full((n_slots,), -1, dtype=torch.int32, device=k.device)
    max_off.scatter_reduce_(0, slot_ids.long(), offsets.to(torch.int32), reduce="amax")
    _summary_kernel[(n_tok, n_kvh)](
        k_cache, slot_ids, offsets, max_off, summary_ids, kmin, kmax, kmean,
        *k_cache.stride(), *kmin.stride(),
        BLOCK=block, HEAD_DIM=head_dim,
        num_warps=4,
    )
