"""Fused elementwise kernels of the decoder layer, in Triton: RMSNorm (optionally after a
residual add), rotary embedding of q and k, and SiLU(gate) * up.

In eager torch each of these is 5-10 small kernels; in a decode step captured as a CUDA graph
the launches are gone but every kernel still costs its fixed few microseconds on the GPU, and
a 32-layer model runs ~1300 of them per step: about 3 ms, as much as reading the weights.

Every kernel rounds where the torch module rounds (each intermediate the model keeps in the
activation dtype is rounded here too), so outputs agree with the unfused model to the last
place of the activation dtype (exp and rsqrt may differ in the last bit of fp32).

```
rms_norm       grid (T,)        y = w * (x * rsqrt(mean(x^2) + eps)).to(dtype)
add_rms_norm   grid (T,)        r = x + h (stored in place of x);  y = rms_norm(r)
rotary         grid (T, H)      x <- x * cos + rotate_half(x) * sin   (in place, q and k)
silu_mul       grid (T, cols)   y = silu(g) * u
```
"""
import torch
import triton
import triton.language as tl

from .pdl import enabled as pdl_enabled


@triton.jit
def _rms_norm_kernel(X, H, W, Y, stride_x, stride_h, stride_y, n_cols, eps,
                     ADD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # launched before the previous kernel is done (kernels/pdl.py): wait for it here
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if ADD:  # residual add in the activation dtype, stored back: the next layer adds to it
        x = (x.to(tl.float32) + tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(X.dtype.element_ty)
        tl.store(X + row * stride_x + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=mask)


def rms_norm_triton(x, weight, eps, residual_in=None):
    """See :func:`kernels.rms_norm`."""
    assert x.dim() == 2 and x.stride(1) == 1 and weight.shape == (x.shape[1],)
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    h = residual_in if residual_in is not None else x
    assert h.shape == x.shape and h.stride(1) == 1
    pdl = pdl_enabled(x)
    _rms_norm_kernel[(x.shape[0],)](
        x, h, weight, out, x.stride(0), h.stride(0), out.stride(0), x.shape[1], eps,
        ADD=residual_in is not None, BLOCK=triton.next_power_of_2(x.shape[1]), PDL=pdl, num_warps=8,
        launch_pdl=pdl)
    return out


@triton.jit
def _rotary_kernel(X, COS, SIN, stride_xt, stride_xh, stride_ct, HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, HALF)
    base = X + t * stride_xt + h * stride_xh
    x1 = tl.load(base + d).to(tl.float32)
    x2 = tl.load(base + HALF + d).to(tl.float32)
    c1 = tl.load(COS + t * stride_ct + d).to(tl.float32)
    c2 = tl.load(COS + t * stride_ct + HALF + d).to(tl.float32)
    s1 = tl.load(SIN + t * stride_ct + d).to(tl.float32)
    s2 = tl.load(SIN + t * stride_ct + HALF + d).to(tl.float32)
    dt = X.dtype.element_ty
    # torch: x * cos + cat(-x2, x1) * sin, each product rounded, then the sum rounded
    y1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(base + d, y1.to(dt))
    tl.store(base + HALF + d, y2.to(dt))


def rotary_triton(x, cos, sin):
    """See :func:`kernels.rotary`."""
    t, heads, dim = x.shape
    assert x.stride(2) == 1 and cos.shape == (t, dim) and sin.shape == (t, dim)
    assert cos.stride() == sin.stride() and cos.stride(1) == 1
    _rotary_kernel[(t, heads)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), HALF=dim // 2, num_warps=1)
    return x


@triton.jit
def _silu_mul_kernel(G, U, Y, stride_g, stride_u, stride_y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (s * u).to(Y.dtype.element_ty), mask=mask)


def silu_mul_triton(gate, up):
    """See :func:`kernels.silu_mul`."""
    assert gate.shape == up.shape and gate.dim() == 2 and gate.stride(1) == 1 and up.stride(1) == 1
    out = torch.empty_like(gate)
    block = 1024
    _silu_mul_kernel[(gate.shape[0], triton.cdiv(gate.shape[1], block))](
        gate, up, out, gate.stride(0), up.stride(0), out.stride(0), gate.shape[1], BLOCK=block, num_warps=4)
    return out
