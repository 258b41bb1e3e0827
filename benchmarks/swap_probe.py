"""Where an LSA cycle's time goes on the GPU: host-to-device bandwidth from the mirror, and the
time of every decode step of a few cycles (boundary steps marked), with the copy stream's state.

    python -m benchmarks.swap_probe --context 131072 --out swap_probe.json

A diagnostic for issue 6 (prefetch overlapped with decode); the benchmark is ``lsa bench decode``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.decode import Setup, build, model_config
from engine.loader import random_model


def h2d_bandwidth(cache, rows: int = 64) -> dict:
    """GB/s of copying whole mirror rows (one block of all layers each) to the device, one copy per row."""
    host = cache.mirror.host
    out = torch.empty((rows, *host.shape[1:]), dtype=host.dtype, device=cache.device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(rows):
        out[i].copy_(host[i], non_blocking=True)
    issue = time.perf_counter() - t0
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    nbytes = out.numel() * out.element_size()
    return {"pinned": host.is_pinned(), "row_mb": nbytes / rows / 1e6, "gb_per_s": nbytes / dt / 1e9,
            "issue_ms": issue * 1e3, "total_ms": dt * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--prefetch", type=float, default=0.5)
    p.add_argument("--out", default="swap_probe.json")
    args = p.parse_args()
    device = torch.device("cuda")
    cfg = model_config("llama3-8b", None, args.context + 65536)
    model = random_model(cfg, device, torch.bfloat16, seed=0)
    s = Setup("lsa", (0.10,), 1, args.context, 64 * (args.cycles + 2), 64, 64, None)
    engine, _ = build(model, s, device, torch.Generator().manual_seed(0))
    import dataclasses

    engine.policy.config = dataclasses.replace(engine.policy.config, prefetch=args.prefetch)
    cache = engine.cache
    report = {"h2d": h2d_bandwidth(cache), "steps": []}
    print(report["h2d"])
    for _ in range(8):
        engine.step()
    compute = torch.cuda.current_stream()
    for i in range(64 * args.cycles):
        step = engine.policy._step[engine.scheduler.running[0].seq_id]
        before = (cache.blocks_prefetched, cache.blocks_loaded_late)
        compute.synchronize()
        t0 = time.perf_counter()
        timing = dict(engine.policy.timing)
        engine.step()
        t1 = time.perf_counter()
        compute.synchronize()
        t2 = time.perf_counter()
        copies_idle = cache.mirror.copy_stream.query()
        row = {"step": step, "boundary": step % 64 == 0, "host_ms": (t1 - t0) * 1e3, "step_ms": (t2 - t0) * 1e3,
               "staged": cache.blocks_prefetched - before[0], "late": cache.blocks_loaded_late - before[1],
               "copies_idle": copies_idle,
               **{k: round((v - timing[k]) * 1e3, 3) for k, v in engine.policy.timing.items()}}
        report["steps"].append(row)
        if row["boundary"] or i % 8 == 0 or row["step_ms"] > 15:
            print(row)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
