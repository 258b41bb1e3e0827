"""Host memory of the KV mirror: page-locked allocation at exact size, and the FP8 (e4m3) block
format with per-(block, layer, K/V, head) scales."""
from __future__ import annotations

import weakref

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value


def quantize_fp8(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks [..., B, D] -> (e4m3 [..., B, D], scale [...] float32), one scale per leading index
    (per block, layer, K/V and KV head): scale = amax / 448, so every value is in range."""
    x = blocks.float()
    scale = (x.abs().amax((-2, -1)) / FP8_MAX).clamp_min(1e-12)
    return (x / scale[..., None, None]).to(FP8), scale


def dequantize_fp8(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_fp8``: e4m3 [..., B, D] and scale [...] -> [..., B, D] in ``dtype``."""
    return (data.float() * scale.float()[..., None, None]).to(dtype)


PIN_REGISTER_BYTES = 1 << 30  # larger host buffers are registered, not drawn from torch's pinned cache


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialised host tensor, page-locked when ``pin`` (copies to the GPU are then DMA).

    Small buffers come from torch's caching pinned allocator; large ones (a 512K-token mirror is
    64 GiB) are allocated pageable and registered with ``cudaHostRegister`` at their exact size:
    the caching allocator rounds a request up to a power of two (64.1 GiB -> 128 GiB) and keeps
    freed buffers for reuse, which a machine with 128 GiB of RAM cannot afford."""
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if not pin or nbytes < PIN_REGISTER_BYTES:
        return torch.empty(shape, dtype=dtype, pin_memory=pin)
    t = torch.empty(shape, dtype=dtype)
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(t.data_ptr(), nbytes, 0)
    if int(getattr(err, "value", err)) != 0:  # cannot lock that much: stay pageable (copies are synchronous)
        return t
    weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t
