"""Host memory of the KV mirror: page-locked allocation at exact size, and the FP8 (e4m3) block
format with per-(block, layer, K/V, head) scales."""
from __future__ import annotations

import weakref

import torch

from engine.host_copy import clear_cuda_error

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
    if register_host(t.data_ptr(), nbytes):  # else: cannot lock that much: stay pageable (copies are synchronous)
        weakref.finalize(t, torch.cuda.cudart().cudaHostUnregister, t.data_ptr())
    return t


def register_host(ptr: int, nbytes: int) -> bool:
    """Page-lock ``nbytes`` of host memory at ``ptr`` for DMA (``cudaHostRegister``); False when
    the driver refuses (too much to lock, or file-backed pages that Linux will not pin for long:
    a mapping of a file on disk rather than on tmpfs). A refusal is cleared from the CUDA
    runtime's last-error slot, which PyTorch reads after every kernel launch: left there, the next
    unrelated launch would fail with the refusal's "invalid argument"."""
    err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    if int(getattr(err, "value", err)) == 0:
        return True
    clear_cuda_error()
    return False


def on_tmpfs(path: str) -> bool:
    """Whether ``path`` is on a tmpfs / hugetlbfs mount (shared memory, which CUDA can pin) rather
    than a disk filesystem (whose mapped pages Linux will not pin for DMA)."""
    import os

    path = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")) \
                        and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        return False
    return kind in ("tmpfs", "hugetlbfs")
