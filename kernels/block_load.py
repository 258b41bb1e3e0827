"""Blocks copied from the host mirror into their pool slots, dequantized on the way, in Triton.

A copy from the host lands as contiguous rows ``src [n, L, 2, H, B, D]`` (one row = one block of
every layer); the pool is ``[L, 2, S, H, B, D]``. Writing the rows into their slots with torch
advanced indexing (``pool[:, :, slots] = rows.permute(...)``) costs an index_put kernel split
in ~5-10 pieces (the pool is past 32-bit indexing), which ran beside every decode step while
the next plan's blocks were staged. Here each program writes one (block, layer, K/V, head)
tile of B x D once:

```
grid (n, L * H, 2)        program (i, l*H + h, kv):  src[i, l, kv, h] --dequantize--> dst[l, kv, slots[i], h]

model   src in the pool dtype, copied as it is
fp8     e4m3 tile * scale[i, l, kv, h]                               (engine/host_memory.py)
int4    codes [B, D/2] uint8, two per byte (even channel in the low nibble);
        meta [n, L, H, 2D + 2B] float16 per (block, layer, head):
            key scale [D] | key min [D] | value scale [B] | value min [B]
        K (per channel):  x[b, d] = code * key_scale[d] + key_min[d]
        V (per token):    x[b, d] = code * value_scale[b] + value_min[b]
```

The arithmetic is the reference's (``kernels.reference.dequantize_blocks``): fp32, one rounding
to the pool dtype at the end.
"""
import torch
import triton
import triton.language as tl

FORMATS = {"model": 0, "fp8": 1, "int4": 2}


@triton.jit
def _load_kernel(
    SRC, META, DST, SLOTS,
    stride_sn, stride_sl, stride_skv, stride_sh, stride_sb, stride_sd,
    stride_mn, stride_ml, stride_mkv, stride_mh, stride_mm,
    stride_dl, stride_dkv, stride_ds, stride_dh, stride_db, stride_dd,
    n_heads,
    FMT: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    pid_i = tl.program_id(0).to(tl.int64)
    pid_lh = tl.program_id(1)
    kv = tl.program_id(2)
    layer = (pid_lh // n_heads).to(tl.int64)
    head = (pid_lh % n_heads).to(tl.int64)
    slot = tl.load(SLOTS + pid_i).to(tl.int64)
    offs_b = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    src = SRC + pid_i * stride_sn + layer * stride_sl + kv * stride_skv + head * stride_sh
    if FMT == 2:
        byte = tl.load(src + offs_b[:, None] * stride_sb + (offs_d[None, :] // 2) * stride_sd).to(tl.int32)
        code = ((byte >> ((offs_d[None, :] % 2) * 4)) & 15).to(tl.float32)            # [B, D]
        meta = META + pid_i * stride_mn + layer * stride_ml + head * stride_mh
        if kv == 0:  # keys: per channel
            scale = tl.load(meta + offs_d * stride_mm).to(tl.float32)                     # [D]
            low = tl.load(meta + (HEAD_DIM + offs_d) * stride_mm).to(tl.float32)
            x = code * scale[None, :] + low[None, :]
        else:  # values: per token
            scale = tl.load(meta + (2 * HEAD_DIM + offs_b) * stride_mm).to(tl.float32)    # [B]
            low = tl.load(meta + (2 * HEAD_DIM + BLOCK + offs_b) * stride_mm).to(tl.float32)
            x = code * scale[:, None] + low[:, None]
    else:
        x = tl.load(src + offs_b[:, None] * stride_sb + offs_d[None, :] * stride_sd)
        if FMT == 1:
            scale = tl.load(META + pid_i * stride_mn + layer * stride_ml + kv * stride_mkv + head * stride_mh)
            x = x.to(tl.float32) * scale
    dst = DST + layer * stride_dl + kv * stride_dkv + slot * stride_ds + head * stride_dh
    tl.store(dst + offs_b[:, None] * stride_db + offs_d[None, :] * stride_dd, x.to(DST.dtype.element_ty))


def load_blocks_triton(src, meta, dst, slots, fmt="model"):
    """See :func:`kernels.load_blocks`."""
    assert fmt in FORMATS, f"fmt must be one of {tuple(FORMATS)}, got {fmt!r}"
    n, layers, two, heads, block, width = src.shape
    n_layers, two_d, _, heads_d, block_d, head_dim = dst.shape
    assert two == two_d == 2 and layers == n_layers and heads == heads_d and block == block_d, \
        f"src [n, L, 2, H, B, D] {tuple(src.shape)} does not match dst [L, 2, S, H, B, D] {tuple(dst.shape)}"
    assert slots.shape == (n,), "one slot per block"
    assert block & (block - 1) == 0 and head_dim & (head_dim - 1) == 0, "power-of-two block and head dim"
    if fmt == "int4":
        assert src.dtype == torch.uint8 and width * 2 == head_dim, "int4 codes: [n, L, 2, H, B, D/2] uint8"
        assert meta is not None and meta.shape == (n, layers, heads, 2 * head_dim + 2 * block), \
            "int4 meta: [n, L, H, 2D + 2B]"
        meta_strides = (meta.stride(0), meta.stride(1), 0, meta.stride(2), meta.stride(3))
    elif fmt == "fp8":
        assert width == head_dim and meta is not None and meta.shape == (n, layers, 2, heads), "fp8 scale: [n, L, 2, H]"
        meta_strides = (*meta.stride(), 0)
    else:
        assert width == head_dim and src.dtype == dst.dtype, "model-dtype rows copy as they are"
        meta, meta_strides = src, (0, 0, 0, 0, 0)
    if n == 0:
        return dst
    _load_kernel[(n, layers * heads, 2)](
        src, meta, dst, slots,
        *src.stride(), *meta_strides, *dst.stride(), heads,
        FMT=FORMATS[fmt], BLOCK=block, HEAD_DIM=head_dim, num_warps=4,
    )
    return dst
