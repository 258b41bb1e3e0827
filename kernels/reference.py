"""Plain-torch references of every kernel in this package.

They define what the Triton kernels compute, run on any device, and are what the
dispatcher uses off CUDA. Arithmetic is fp32 (fp64 when the inputs are fp64); outputs
follow the contracts in ``kernels/__init__.py`` and ``docs/kv-layout.md``.
"""
import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def token_mask(block_table: torch.Tensor, num_blocks: torch.Tensor, last_len: torch.Tensor,
               block_size: int) -> torch.Tensor:
    """[N, M, B] bool: which (listed block, token) pairs are valid.

    Entries ``j < num_blocks[n]`` are listed; the last listed one holds ``last_len[n]`` tokens,
    every other listed one is full.
    """
    n_rows, width = block_table.shape
    dev = block_table.device
    j = torch.arange(width, device=dev)[None, :]                         # [1, M]
    nb = num_blocks.to(dev).long()[:, None]                              # [N, 1]
    valid_len = torch.where(j == nb - 1, last_len.to(dev).long()[:, None],
                            torch.full_like(j, block_size))              # [N, M]
    valid_len = torch.where(j < nb, valid_len, torch.zeros_like(valid_len))
    t = torch.arange(block_size, device=dev)
    return t[None, None, :] < valid_len[:, :, None]                      # [N, M, B]


def sparse_decode_attention(q, k_cache, v_cache, block_table, num_blocks, last_len, scale,
                            return_block_mass=False, *, out=None, mass_out=None):
    """Reference of :func:`kernels.sparse_decode_attention`; see there for the contract."""
    n_seq, n_qh, head_dim = q.shape
    n_slots, n_kvh, block_size, _ = k_cache.shape
    group = n_qh // n_kvh
    cdt = _compute_dtype(q)
    idx = block_table.long().clamp(0, n_slots - 1)       # padding entries may hold anything
    valid = token_mask(block_table, num_blocks, last_len, block_size)      # [N, M, B]
    k = k_cache[idx].to(cdt)                              # [N, M, Hkv, B, D]
    v = v_cache[idx].to(cdt)
    v = v.masked_fill(~valid[:, :, None, :, None], 0.0)   # unwritten slots may hold NaN
    qg = q.to(cdt).view(n_seq, n_kvh, group, head_dim)    # [N, Hkv, G, D]
    s = torch.einsum("nhgd,nmhbd->nhgmb", qg, k) * scale  # [N, Hkv, G, M, B]
    s = s.masked_fill(~valid[:, None, None, :, :], float("-inf"))
    p = torch.softmax(s.flatten(-2), dim=-1).view_as(s)
    o = torch.einsum("nhgmb,nmhbd->nhgd", p, v).reshape(n_seq, n_qh, head_dim)
    out = o.to(q.dtype) if out is None else out.copy_(o)
    if not return_block_mass:
        return out
    mass = p.sum(-1).reshape(n_seq, n_qh, -1).float()    # [N, Hq, M]
    mass = mass if mass_out is None else mass_out.copy_(mass)
    return out, mass


def block_scores(q, kmin, kmax, kmean, block_table, num_blocks, *, out=None):
    """Reference of :func:`kernels.block_scores`; see there for the contract."""
    if q.dim() == 3:
        q = q[:, None]                                    # [N, W=1, Hq, D]
    n_seq, window, n_qh, head_dim = q.shape
    n_rows, n_kvh, _ = kmin.shape
    group = n_qh // n_kvh
    cdt = _compute_dtype(q)
    idx = block_table.long().clamp(0, n_rows - 1)
    qg = q.to(cdt).view(n_seq, window, n_kvh, group, head_dim)      # [N, W, Hkv, G, D]
    # sum_d max(q_d kmin_d, q_d kmax_d) = q+ . kmax + q- . kmin   (kmin <= kmax)
    quest = (torch.einsum("nwhgd,nmhd->nhwgm", qg.clamp(min=0), kmax[idx].to(cdt))
             + torch.einsum("nwhgd,nmhd->nhwgm", qg.clamp(max=0), kmin[idx].to(cdt)))
    meandot = torch.einsum("nwhgd,nmhd->nhwgm", qg, kmean[idx].to(cdt))
    quest = quest.flatten(2, 3).amax(2).float()           # [N, Hkv, M]
    meandot = meandot.flatten(2, 3).amax(2).float()
    listed = torch.arange(block_table.shape[1], device=q.device)[None, :] < \
        num_blocks.to(q.device).long()[:, None]           # [N, M]
    listed = listed[:, None, :]
    neg_inf = float("-inf")
    quest, meandot = quest.masked_fill(~listed, neg_inf), meandot.masked_fill(~listed, neg_inf)
    if out is not None:
        quest, meandot = out[0].copy_(quest), out[1].copy_(meandot)
    return quest, meandot


def paged_kv_write(k, v, k_cache, v_cache, slot_ids, offsets, kmin=None, kmax=None, kmean=None,
                   summary_ids=None):
    """Reference of :func:`kernels.paged_kv_write`; see there for the contract."""
    slot = slot_ids.long()
    off = offsets.long()
    k_cache[slot, :, off] = k.to(k_cache.dtype)           # [T, Hkv, D] into [S, Hkv, B, D]
    v_cache[slot, :, off] = v.to(v_cache.dtype)
    if kmin is None:
        return
    n_slots, _, block_size, _ = k_cache.shape
    max_off = torch.full((n_slots,), -1, dtype=torch.long, device=slot.device)
    max_off.scatter_reduce_(0, slot, off, reduce="amax")
    rep = (off == max_off[slot]).nonzero().flatten()      # one token per touched block
    rs = slot[rep]
    blk = k_cache[rs].to(_compute_dtype(k_cache))         # [R, Hkv, B, D]
    valid = torch.arange(block_size, device=slot.device)[None, :] <= max_off[rs][:, None]  # [R, B]
    vm = valid[:, None, :, None]                          # [R, 1, B, 1]
    rows = summary_ids.long()[rep]
    kmin[rows] = blk.masked_fill(~vm, float("inf")).amin(2).to(kmin.dtype)
    kmax[rows] = blk.masked_fill(~vm, float("-inf")).amax(2).to(kmax.dtype)
    count = valid.sum(1).to(blk.dtype)[:, None, None]
    kmean[rows] = (blk.masked_fill(~vm, 0.0).sum(2) / count).to(kmean.dtype)


def select_blocks(scores, num_blocks, k=None, threshold=None, top_p=None):
    """See :func:`kernels.select_blocks`."""
    width = scores.shape[-1]
    listed = torch.arange(width, device=scores.device) < \
        num_blocks.to(scores.device).long().view(-1, *([1] * (scores.dim() - 1)))
    s = scores.float().masked_fill(~listed, float("-inf"))
    keep = listed.expand_as(s).clone()
    if threshold is not None:
        keep &= s >= threshold
    order = torch.sort(torch.where(keep, s, torch.full_like(s, float("-inf"))),
                       dim=-1, descending=True, stable=True)
    sorted_s, idx = order.values, order.indices
    kept = torch.gather(keep, -1, idx)                    # keep flags in score order
    if top_p is not None:
        w = torch.where(kept, sorted_s, torch.zeros_like(sorted_s)).clamp(min=0)
        before = w.cumsum(-1) - w                         # mass strictly before each entry
        total = w.sum(-1, keepdim=True)
        kept &= before < top_p * total
    count = kept.sum(-1)
    if k is not None:
        count = count.clamp(max=k)
    kept &= torch.arange(width, device=s.device) < count[..., None]
    idx = torch.where(kept, idx, torch.full_like(idx, -1))
    if k is not None and k < width:
        idx = idx[..., :k]
    return idx, count.to(torch.int32)


def rms_norm(x, weight, eps, residual_in=None):
    """Reference of :func:`kernels.rms_norm`; see there for the contract."""
    if residual_in is not None:
        x.copy_(x + residual_in)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def decode_linear(x, weight, norm_weight=None, eps=0.0, silu_input=False, residual=None):
    """Reference of :func:`kernels.decode_linear`; see there for the contract."""
    if silu_input:
        gate, up = x.chunk(2, dim=-1)
        x = silu_mul(gate, up)
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    y = torch.nn.functional.linear(x, weight)
    if residual is None:
        return y
    return residual.copy_(residual + y)


def rotary(x, cos, sin):
    """Reference of :func:`kernels.rotary`; see there for the contract."""
    x1, x2 = x.chunk(2, dim=-1)
    return x.copy_(x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None])


def silu_mul(gate, up):
    """Reference of :func:`kernels.silu_mul`; see there for the contract."""
    return torch.nn.functional.silu(gate) * up


# ------------------------------------------------------------------ the host mirror's block formats

INT4_LEVELS = 15  # codes 0..15


def _fp16_toward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """``x`` (fp32) rounded to float16 toward +inf (``up``) or -inf: the result bounds ``x``.
    One step on the float16 bit pattern where round-to-nearest went the wrong way."""
    h = x.to(torch.float16)
    wrong = h.float() < x if up else h.float() > x
    bits = h.view(torch.int16)
    away_from_zero = (h > 0) == up  # the next float16 in the wanted direction has a larger magnitude
    step = torch.where(away_from_zero, bits + 1, bits - 1)
    step = torch.where(h == 0, torch.full_like(bits, 1 if up else -32767), step)  # +-smallest subnormal
    return torch.where(wrong, step, bits).view(torch.float16)


def quantize_int4(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks [..., 2, H, B, D] (K, V) -> 4-bit codes and their scales, KIVI's grouping.

    Keys per channel (one scale and min per channel d over the block's B tokens: outlier
    channels keep their own range), values per token (one per token over its D channels).
    Each group's min is rounded down and its scale up to float16, so every value lies in
    [min, min + 15 * scale] and ``|x - dequantized| <= scale / 2`` (fp32 arithmetic aside).
    Values must be within the float16 range.

    Returns (codes [..., 2, H, B, D/2] uint8, two per byte, the even channel in the low nibble;
    meta [..., H, 2D + 2B] float16: key scale [D] | key min [D] | value scale [B] | value min [B]).
    """
    x = blocks.float()
    k, v = x[..., 0, :, :, :], x[..., 1, :, :, :]  # [..., H, B, D]
    k_min = _fp16_toward(k.amin(-2), up=False)  # [..., H, D]
    step = (1 + 2.0 ** -20) / INT4_LEVELS  # a hair over 1/15: fp32 rounding never leaves the range uncovered
    k_scale = _fp16_toward((k.amax(-2) - k_min.float()) * step, up=True)
    v_min = _fp16_toward(v.amin(-1), up=False)  # [..., H, B]
    v_scale = _fp16_toward((v.amax(-1) - v_min.float()) * step, up=True)

    def codes(t, low, scale):
        return torch.round((t - low.float()) / scale.float().clamp_min(1e-30)).clamp_(0, INT4_LEVELS)

    c = torch.stack([codes(k, k_min[..., None, :], k_scale[..., None, :]),
                     codes(v, v_min[..., None], v_scale[..., None])], -4).to(torch.uint8)  # [..., 2, H, B, D]
    packed = c[..., 0::2] | (c[..., 1::2] << 4)
    meta = torch.cat([k_scale, k_min, v_scale, v_min], -1)  # [..., H, 2D + 2B]
    return packed, meta


def dequantize_int4(codes: torch.Tensor, meta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_int4`: codes [..., 2, H, B, D/2], meta [..., H, 2D + 2B] ->
    blocks [..., 2, H, B, D] in ``dtype`` (fp32 arithmetic, one rounding at the end)."""
    block, d = codes.shape[-2], codes.shape[-1] * 2
    c = torch.stack([codes & 15, codes >> 4], -1).flatten(-2).float()  # [..., 2, H, B, D]
    m = meta.float()
    k_scale, k_min = m[..., None, :d], m[..., None, d: 2 * d]  # [..., H, 1, D]
    v_scale, v_min = m[..., 2 * d: 2 * d + block, None], m[..., 2 * d + block:, None]  # [..., H, B, 1]
    k = c[..., 0, :, :, :] * k_scale + k_min
    v = c[..., 1, :, :, :] * v_scale + v_min
    return torch.stack([k, v], -4).to(dtype)


def dequantize_blocks(src: torch.Tensor, meta: torch.Tensor | None, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """Host-mirror rows [n, L, 2, H, B, D(/2)] in format ``fmt`` -> [n, L, 2, H, B, D] in ``dtype``
    (``model``: as they are; ``fp8``: e4m3 times one scale per (row, layer, K/V, head); ``int4``)."""
    if fmt == "int4":
        return dequantize_int4(src, meta, dtype)
    if fmt == "fp8":
        return (src.float() * meta.float()[..., None, None]).to(dtype)
    if fmt != "model":
        raise ValueError(f"fmt must be model, fp8 or int4, got {fmt!r}")
    return src.to(dtype)


def load_blocks(src, meta, dst, slots, fmt="model"):
    """Reference of :func:`kernels.load_blocks`; see there for the contract."""
    dst[:, :, slots.long()] = dequantize_blocks(src, meta, fmt, dst.dtype).permute(1, 2, 0, 3, 4, 5)
    return dst


def prefill_attention(q, k, v, q_start, scale, *, out=None):
    """Reference of :func:`kernels.prefill_attention`; see there for the contract. SDPA with a
    boolean causal mask [T, start + T] (the CPU backend works through it blockwise)."""
    num_q, n_qh, _ = q.shape
    end = q_start + num_q
    cdt = _compute_dtype(q)
    dev = q.device
    mask = torch.arange(end, device=dev)[None, :] <= torch.arange(q_start, end, device=dev)[:, None]  # [T, end]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.to(cdt).transpose(0, 1)[None], k[:, :end].to(cdt)[None], v[:, :end].to(cdt)[None],  # [1, H, T|end, D]
        attn_mask=mask, scale=scale, enable_gqa=True)[0].transpose(0, 1)  # [T, Hq, D]
    return o.to(q.dtype) if out is None else out.copy_(o)
