"""Rows of a page-locked host table to and from the device: one DMA copy per run of rows.

    table  [N, ...]  host, page-locked; each row table[r] contiguous, rows ``pitch`` bytes apart
                     (e.g. ``mirror.host[:, layer]``: one layer of each block, a row of all layers apart)
    dense  [n, ...]  device, contiguous: dense[i] <-> table[rows[i]]

    rows     7 8 9 10 | 3 | 12 13          three runs -> three cudaMemcpy2DAsync, each copying
    dense    0 1 2 3  | 4 | 5  6           ``height`` = run length lines of ``width`` = row bytes

A per-row ``copy_`` costs the host ~10 us of Python and dispatch; one layer of a 128K-token
session's prefix is 2,048 rows (64-token blocks), 65,536 for the 32 layers of Llama-3-8B: most of
a cached turn's time to first token went to issuing those copies. ``cudaMemcpy2DAsync`` moves a
whole run (strided on the host, dense on the device) in one call, on the current stream, ordered
with the work around it as ``copy_(non_blocking=True)`` is. Where the CUDA runtime cannot be
reached (no CUDA, an unknown build), the callers copy row by row as before.
"""
from __future__ import annotations

import ctypes

import torch

H2D, D2H = 1, 2  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost
_runtime: list = []  # [the CUDA runtime PyTorch loaded (ctypes.CDLL) or None], once looked up


def cuda_runtime():
    """The ``libcudart`` PyTorch loaded, through ctypes (torch binds no cudaMemcpy2DAsync, no
    cudaGetLastError); None where there is none."""
    if not _runtime:
        lib = None
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({line.split()[-1] for line in f if "libcudart.so" in line})
        except OSError:
            paths = []
        for path in paths:
            try:
                candidate = ctypes.CDLL(path)
                fn = candidate.cudaMemcpy2DAsync
            except (OSError, AttributeError):
                continue
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                           ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
            lib = candidate
            break
        _runtime.append(lib)
    return _runtime[0]


def clear_cuda_error() -> None:
    """Read and reset the calling thread's last CUDA runtime error (PyTorch checks it after every
    kernel launch: a refused call left there would fail the next, unrelated launch)."""
    lib = cuda_runtime()
    if lib is not None:
        lib.cudaGetLastError()


def runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """(index in ``rows``, first row, length) of each run of consecutive rows."""
    out, i, n = [], 0, len(rows)
    while i < n:
        r = 1
        while i + r < n and rows[i + r] == rows[i] + r:
            r += 1
        out.append((i, rows[i], r))
        i += r
    return out


def _copy_runs(table: torch.Tensor, rows: list[int], dense: torch.Tensor, kind: int) -> bool:
    """The 2-D copies between ``table[rows]`` and ``dense``; False, with nothing copied, where they
    cannot be made (no runtime, a layout they do not cover)."""
    if not rows:
        return True
    lib = cuda_runtime()
    if lib is None or not dense.is_cuda or table.is_cuda or not table.is_pinned() or table.dtype != dense.dtype:
        return False
    width = table[0].numel() * table.element_size()
    if not (table[0].is_contiguous() and dense.is_contiguous() and dense.shape[0] == len(rows)
            and dense[0].numel() * dense.element_size() == width):
        return False
    pitch = table.stride(0) * table.element_size()
    base_host, base_dev = table.data_ptr(), dense.data_ptr()
    stream = torch.cuda.current_stream(dense.device).cuda_stream
    for i, first, length in runs(rows):
        host, dev = base_host + first * pitch, base_dev + i * width
        if kind == H2D:
            err = lib.cudaMemcpy2DAsync(dev, width, host, pitch, width, length, H2D, stream)
        else:
            err = lib.cudaMemcpy2DAsync(host, pitch, dev, width, width, length, D2H, stream)
        if err != 0:
            clear_cuda_error()
            if i == 0:
                return False  # refused before anything moved: the caller copies row by row
            raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {err} after {i} of {len(rows)} rows")
    return True


def gather_rows(dense: torch.Tensor, table: torch.Tensor, rows: list[int]) -> None:
    """dense[i] = table[rows[i]] (host -> device, asynchronous from page-locked memory)."""
    if not _copy_runs(table, rows, dense, H2D):
        for i, first, length in _pieces(table, rows):
            dense[i: i + length].copy_(table[first: first + length], non_blocking=True)


def scatter_rows(table: torch.Tensor, rows: list[int], dense: torch.Tensor) -> None:
    """table[rows[i]] = dense[i] (device -> host, asynchronous into page-locked memory)."""
    if not _copy_runs(table, rows, dense, D2H):
        for i, first, length in _pieces(table, rows):
            table[first: first + length].copy_(dense[i: i + length], non_blocking=True)


def _pieces(table: torch.Tensor, rows: list[int]) -> list[tuple[int, int, int]]:
    """Without 2-D copies: a run of rows where they are adjacent in memory, else row by row."""
    if table.stride(0) == table[0].numel():
        return runs(rows)
    return [(i, r, 1) for i, r in enumerate(rows)]


def copy_probe(host: torch.Tensor, device: torch.device, nbytes: int = 128 << 20, repeats: int = 3) -> dict[str, float]:
    """GB/s of the copies a turn makes from ``host`` (a page-locked table of rows, e.g. the host
    mirror's arena) to ``device``, best of ``repeats``: ``arena`` whole rows (plans' loads),
    ``arena_layer`` one layer of each row (a turn's prefix, a layer at a time: strided), and
    ``pinned`` whole rows from page-locked memory of this process's own as the reference (left out
    where the driver refuses to lock it). An arena well below the reference is memory the GPU
    reaches slowly (another NUMA node, a registration the driver maps page by page). Empty where it cannot be measured (no CUDA, the
    table not page-locked). Reads rows 0.. of ``host`` (their content does not matter)."""
    from engine.host_memory import register_host  # it imports this module

    if device.type != "cuda" or not host.is_pinned() or cuda_runtime() is None:
        return {}
    row = host[0].numel() * host.element_size()
    n = max(1, min(host.shape[0], nbytes // row))
    layer_rows = max(1, min(host.shape[0], nbytes // max(1, row // host.shape[1]))) if host.dim() > 1 else n
    out: dict[str, float] = {}
    cases = [("arena", host, n), ("arena_layer", host[:, 0], layer_rows)]
    # the reference registered and unregistered here: from torch's pinned pool it would stay cached
    ref = torch.empty((n, *host.shape[1:]), dtype=host.dtype)
    registered = register_host(ref.data_ptr(), ref.numel() * ref.element_size())
    if registered:
        cases.append(("pinned", ref, n))
    try:
        _time_copies(cases, device, repeats, out)
    finally:
        if registered:
            torch.cuda.synchronize(device)
            torch.cuda.cudart().cudaHostUnregister(ref.data_ptr())
            clear_cuda_error()
    return out


def _time_copies(cases: list, device: torch.device, repeats: int, out: dict[str, float]) -> None:
    """GB/s of ``gather_rows`` of each (name, table, rows) case into ``out``, best of ``repeats``."""
    for name, table, rows in cases:
        dense = torch.empty((rows, *table.shape[1:]), dtype=table.dtype, device=device)
        ids = list(range(rows))
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            gather_rows(dense, table, ids)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        out[name] = round(dense.numel() * dense.element_size() / best / 1e9, 2)
        del dense


__all__ = ["cuda_runtime", "clear_cuda_error", "runs", "gather_rows", "scatter_rows", "copy_probe"]
