"""The memory floor of a decode step: the bytes it must read, at the copy bandwidth measured in
the same run (``lsa bench decode`` and ``benchmarks.profile_step`` report their steps against it).

    weights   every parameter once; the embedding table only where the LM head shares it (a step
              reads one row per token of it otherwise)
    kv        the blocks each sequence attends to (its resident slots; full attention: all of them)
    index     Level-1 index keys, read once a cycle: their bytes / cycle per step
"""
from __future__ import annotations

import statistics
import time

import torch


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes per second of a device-to-device copy, bytes read + written (median of 10)."""
    nbytes = nbytes or ((2 << 30) if device.type == "cuda" else (256 << 20))
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        _sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def weight_bytes_per_step(model) -> int:
    """Parameter bytes a decode step reads (each storage once: tied weights count once)."""
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight.data_ptr() == embed.data_ptr()
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen or (p is embed and not tied):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def step_bytes(model, engine) -> dict:
    """What one decode step of ``engine``'s running sequences must read, in bytes."""
    cache, policy = engine.cache, engine.policy
    acc = cache.accounting()
    attended = acc.device_bytes - acc.staged_bytes - acc.index_bytes  # resident slots
    cycle = policy.config.cycle if policy.index_layers() else 1  # Level-1 keys: scored once a cycle
    index = acc.index_bytes // cycle
    weights = weight_bytes_per_step(model)
    return {"weights_bytes": weights, "attended_kv_bytes": attended, "index_bytes_per_step": index,
            "step_bytes": weights + attended + index}


def floor_fields(step: dict, bandwidth: float, step_ms_median: float) -> dict:
    """``step`` (from ``step_bytes``) with the floor in ms at ``bandwidth`` and the median's ratio to it."""
    floor_ms = step["step_bytes"] / bandwidth * 1e3
    return {**step, "copy_bw_bytes_per_s": bandwidth, "floor_ms": floor_ms,
            "ratio_to_floor": step_ms_median / floor_ms if floor_ms else None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
