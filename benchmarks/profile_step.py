"""Where the time of one decode step goes: a profile of CUDA-graph replays, kernels by kind,
against the step's memory floor (issue 13: "find where the time above the floor goes").

    python -m benchmarks.profile_step --contexts 131072 524288 --out profile.json

Builds the synthetic-KV LSA engine of ``lsa bench decode`` (Llama-3-8B shapes, random
weights, batch 1 or ``--batch``), decodes into steady state, then profiles ``--steps`` engine steps with
torch.profiler (CUDA activity): every kernel's name, count and GPU time, grouped by kind.
The floor is the bytes one step must read (weights + attended KV + index keys, benchmarks/floor.py)
at the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections import defaultdict

import torch

from benchmarks.floor import copy_bandwidth, floor_fields, step_bytes
from benchmarks.synthetic import Setup, _sync, build, model_config
from engine.loader import random_model

KINDS = (  # first match wins: a kernel name -> its kind
    ("sparse_attention", r"sparse|_decode_attn|split_k|flash_decod"),
    ("attention_combine", r"combine|reduce_splits"),
    ("kv_write", r"kv_write|paged_kv"),
    ("block_scores", r"block_score|scores"),
    ("gemm", r"gemm|gemv|cutlass|sm90_xmma|nvjet|matmul|_mm_|splitK|decode_linear"),
    ("rmsnorm", r"rms"),
    ("rotary", r"rotary|rope"),
    ("silu_mul", r"silu"),
    ("copy", r"copy|Memcpy|memcpy|cat_|index|gather|scatter"),
    ("elementwise", r"elementwise|vectorized|unrolled|fill|add|mul"),
    ("reduction", r"reduce|argmax|softmax|max"),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def profile_context(model, context: int, rho: float, steps: int, device, bandwidth: float,
                    churn: float | None = None, batch: int = 1, host_dtype: str | None = None) -> dict:
    s = Setup("lsa", (rho,), batch, context, steps * 4 + 256, 64, 64, host_dtype, churn=churn)
    gen = torch.Generator().manual_seed(0)
    engine, seqs = build(model, s, device, gen)
    for _ in range(96):  # past the first boundary, graphs captured
        engine.step()
    _sync(device)
    wall = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        _sync(device)
        wall.append(time.perf_counter() - t0)
    kernels: dict[str, list] = defaultdict(lambda: [0, 0.0])
    error = None
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
            _sync(device)
        for evt in prof.key_averages():
            gpu_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
            if gpu_us and not evt.key.startswith(("aten::", "cuda", "ProfilerStep")):  # kernels and copies only
                kernels[evt.key][0] += evt.count
                kernels[evt.key][1] += gpu_us / 1e3
    except Exception as exc:  # CUPTI may be unavailable (gVisor): the wall times still stand
        error = f"{type(exc).__name__}: {exc}"
    by_kind: dict[str, dict] = defaultdict(lambda: {"count": 0, "ms": 0.0})
    for name, (count, ms) in kernels.items():
        k = by_kind[kind_of(name)]
        k["count"] += count
        k["ms"] += ms
    step_ms = statistics.median(wall) * 1e3
    floor = floor_fields(step_bytes(model, engine), bandwidth, step_ms)  # each byte read once (benchmarks/floor.py)
    per_step = {k: {"count": v["count"] / steps, "ms": v["ms"] / steps} for k, v in by_kind.items()}
    top = sorted(((n, c / steps, ms / steps) for n, (c, ms) in kernels.items()), key=lambda r: -r[2])[:25]
    return {"context": context, "rho": rho, "churn": churn, "batch": batch, "host_dtype": host_dtype,
            "step_ms_median": step_ms, "step_ms_mean": statistics.fmean(wall) * 1e3,
            "step_ms_p99": sorted(wall)[int(0.99 * (len(wall) - 1))] * 1e3, **floor,
            "kernels_per_step": sum(v["count"] for v in per_step.values()),
            "gpu_ms_per_step": sum(v["ms"] for v in per_step.values()),
            "by_kind": per_step, "top_kernels": [{"name": n[:120], "count": c, "ms": ms} for n, c, ms in top],
            "profiler_error": error}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[131072, 524288])
    p.add_argument("--rho", type=float, default=0.10)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--config", default="llama3-8b", help="llama3-8b, or tiny for a CPU smoke run")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (quick runs)")
    p.add_argument("--churn", type=float, default=None, help="plans replace about this share of the resident "
                   "set (real text: 0.33; default: random KV, most of it)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together (boundaries staggered)")
    p.add_argument("--host-dtype", default=None, choices=("fp8", "int4"), help="the host mirror's format "
                   "(default: the model's dtype)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="profile_step.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = model_config(args.config, args.layers, max(args.contexts) + 65536)
    model = random_model(cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32, seed=0)
    bandwidth = copy_bandwidth(device)
    rows = []
    for context in args.contexts:
        row = profile_context(model, context, args.rho, args.steps, device, bandwidth, args.churn, args.batch,
                              args.host_dtype)
        rows.append(row)
        print(f"{context:>8} tokens x {args.batch}: step {row['step_ms_median']:.2f} ms (mean {row['step_ms_mean']:.2f}, "
              f"p99 {row['step_ms_p99']:.2f}), floor "
              f"{row['floor_ms']:.2f} ms ({row['ratio_to_floor']:.2f}x), {row['kernels_per_step']:.0f} kernels, "
              f"GPU {row['gpu_ms_per_step']:.2f} ms/step; {row['profiler_error'] or ''}")
        for kind, v in sorted(row["by_kind"].items(), key=lambda kv: -kv[1]["ms"]):
            print(f"    {kind:<18} {v['count']:7.1f} kernels  {v['ms']:7.3f} ms")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    with open(args.out, "w") as f:
        json.dump({"gpu": gpu, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
