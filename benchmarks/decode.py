"""``lsa bench decode``: long-context decode, full attention vs LSA, on a Llama-3-8B-shaped model.

    lsa bench decode --contexts 131072 524288 1048576 --batch 1 max --out decode.json
    python -m benchmarks.decode --config tiny --layers 2 --contexts 4096 --device cpu   # a smoke run

Random weights (fixed seed), bf16 on CUDA. **Prefill is skipped**: each sequence's KV is
synthetic (random blocks; block summaries around a random mean key) written straight into the
device pool (full) or the host mirror (lsa; the first resident set is then chosen by the
indexer from random queries and loaded like any other plan). Decode then runs through the
engine as served: tokens from the model, Level-1 at every cycle boundary, swaps of changed
blocks. Plans on random KV hardly change (nothing to copy); ``--churn`` makes them change as
on real text (below). LSA warms up through each sequence's first boundary, which re-applies the
prefill's plan, so every timed boundary applies a plan ranked during decode.

Each row also says how many decode graphs were captured while timed (0 expected: every batch
bucket's graph is made at build, engine/graphs.py) and lists the steps over 10x the median, with
the cycle boundaries and captures each ran (``slow_steps``; printed under the table).

Each row carries the step's memory floor (benchmarks/floor.py: weights + attended KV + index keys
per step, at the device copy bandwidth measured in the same run) and the median's ratio to it;
``--churn 0.33`` gives each sequence blocks every plan keeps, so that a plan replaces about a third
of the resident set, as plans do on real text (docs/perf.md), instead of most of it.
``--index-score mean attention`` times LSA with each Level-1 score, each its own engine: ``attention``
reads the index layers' keys of the whole context from the host mirror at every boundary.

Windows alternate: batch 1 (and any explicit batch) keeps one full engine and one LSA engine
alive and times, round-robin, full / lsa at each rho (the LSA engine's budget is switched
between windows; its reserve is sized for the largest rho, and one cycle runs untimed after
each switch). ``max`` gives each policy its own largest batch (from free GPU memory and, for
lsa, host RAM, per mirror format), so those engines run one after the other; their "vs full" is
the ratio of aggregate tokens/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys
import time

import torch

from engine.config import ModelConfig
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.sequence import Status

# the synthetic-KV engines (also imported from here by swap_probe and the tests)
from benchmarks.floor import copy_bandwidth, floor_fields
from benchmarks.floor import step_bytes as engine_step_bytes
from benchmarks.synthetic import (GiB, LLAMA3_8B, TINY, Setup, _sync, build, fill_host,  # noqa: F401
                                  model_config, per_seq_bytes)


def host_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemTotal"])


def device_free_bytes(device: torch.device, cpu_budget: int) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return cpu_budget


# ------------------------------------------------------------------ timing

class SwapTimer:
    """Wraps the policy's host work around a step and records, per call, its wall time:
    ``policy.before_decode`` (cycle boundaries: applying the plan) split into the host's own time
    and the wait for the device after it (what it queued, and copies it must wait for), and
    ``policy.after_launch`` (Level-1 launches, adopting and staging a plan), where a host wait for
    the step just launched would show as time the GPU cannot hide."""

    def __init__(self, engine: LLMEngine, device: torch.device):
        self.seconds = 0.0
        self.before_host: list[float] = []  # per call of before_decode
        self.before_wait: list[float] = []
        self.after_host: list[float] = []  # per call of after_launch
        policy = engine.policy
        inner, after = policy.before_decode, policy.after_launch

        def timed(seq_ids):
            t0 = time.perf_counter()
            inner(seq_ids)
            t1 = time.perf_counter()
            if not engine.overlap_decode:  # overlapped, a sync here would wait for the step in flight: not measured
                _sync(device)
            t2 = time.perf_counter()
            self.seconds += t2 - t0
            self.before_host.append(t1 - t0)
            self.before_wait.append(t2 - t1)

        def timed_after(seq_ids):
            t0 = time.perf_counter()
            after(seq_ids)
            self.after_host.append(time.perf_counter() - t0)

        policy.before_decode = timed
        policy.after_launch = timed_after

    def marks(self) -> tuple[int, int]:
        return len(self.before_host), len(self.after_host)

    def since(self, marks: tuple[int, int]) -> tuple[float, float, float]:
        """(before_decode host, its device wait, after_launch host) seconds since ``marks``."""
        b, a = marks
        return sum(self.before_host[b:]), sum(self.before_wait[b:]), sum(self.after_host[a:])


def graph_captures(engine: LLMEngine) -> int:
    graphs = engine.runner.graphs
    return graphs.captures if graphs is not None else 0


def time_window(engine: LLMEngine, seqs, device, steps: int, swaps: SwapTimer) -> dict:
    cache, policy = engine.cache, engine.policy
    copied0, cycles0, swap0 = cache.bytes_copied, getattr(policy, "cycles", 0), swaps.seconds
    late0, ahead0, deferred0 = cache.blocks_loaded_late, cache.blocks_prefetched, getattr(policy, "deferred", 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, peak, boundaries, captures = [], 0.0, [], []  # per step: boundaries it ran, graphs it captured
    host = []  # per step: (before_decode host, its device wait, after_launch host) seconds
    # Overlapped decode (engine/llm.py) keeps a step in flight across step() calls: a step's time is
    # then the interval between two calls' returns (each returns once a token per sequence is on the
    # host: the inter-token time a client sees), with no device sync inside the window. Without it,
    # each step is timed alone between two syncs.
    overlapped = engine.overlap_decode
    _sync(device)
    last = time.perf_counter()
    for _ in range(steps):
        cycles, captured = getattr(policy, "cycles", 0), graph_captures(engine)
        if not overlapped:
            _sync(device)
        marks = swaps.marks()
        t0 = last if overlapped else time.perf_counter()
        engine.step()
        if not overlapped:
            _sync(device)
        last = time.perf_counter()
        times.append(last - t0)
        host.append(swaps.since(marks))
        boundaries.append(getattr(policy, "cycles", 0) - cycles)
        captures.append(graph_captures(engine) - captured)
        # untimed; overlapped, inside the next interval (as a server's own host work between steps is)
        peak = max(peak, cache.accounting().device_fraction)
    assert all(s.status is Status.DECODE for s in seqs), "a sequence finished inside the timed window"
    acc = cache.accounting()
    cycles = getattr(policy, "cycles", 0) - cycles0
    return {"step_s": times, "boundaries": boundaries, "captures": captures, "host_s": host,
            "bytes_copied": cache.bytes_copied - copied0, "cycles": cycles,
            "late_blocks": cache.blocks_loaded_late - late0, "prefetched_blocks": cache.blocks_prefetched - ahead0,
            "deferred_blocks": getattr(policy, "deferred", 0) - deferred0,
            "swap_wait_s": swaps.seconds - swap0, "device_kv_bytes": acc.device_bytes, "staged_kv_bytes": acc.staged_bytes,
            "device_kv_capacity_bytes": acc.device_capacity_bytes, "full_kv_bytes": acc.full_bytes,
            "host_kv_bytes": acc.host_bytes, "device_kv_fraction": acc.device_fraction, "peak_device_kv_fraction": peak,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def slow_steps(windows: list[dict], median: float, factor: float = 10.0) -> list[dict]:
    """Timed steps over ``factor`` x the median: where (window, step), how long, how many cycle
    boundaries they ran and how many decode graphs they captured."""
    return [{"window": w, "step": i, "ms": t * 1e3, "boundaries": win["boundaries"][i], "captures": win["captures"][i]}
            for w, win in enumerate(windows) for i, t in enumerate(win["step_s"]) if t > factor * median]


def boundary_anatomy(windows: list[dict]) -> dict:
    """Where a boundary's extra time goes: per kind of step (a boundary, the step after one, the
    others), the median step and its host parts (ms): ``before`` the plan applied before the
    launch, ``wait`` the device wait right after it, ``after`` the host work after the launch
    (Level-1 launches at the step after a boundary's, adopting and staging a plan later); a step
    longer than the others with its GPU work unchanged shows here as host time."""
    kinds: dict[str, list[tuple[float, tuple]]] = {"boundary": [], "after_boundary": [], "other": []}
    for w in windows:
        for i, (t, b) in enumerate(zip(w["step_s"], w["boundaries"])):
            kind = "boundary" if b else "after_boundary" if i and w["boundaries"][i - 1] else "other"
            kinds[kind].append((t, w["host_s"][i]))
    out = {}
    for kind, rows in kinds.items():
        if rows:
            out[kind] = {"steps": len(rows), "step_ms": 1e3 * statistics.median(t for t, _ in rows),
                         **{name: 1e3 * statistics.median(h[k] for _, h in rows)
                            for k, name in enumerate(("before_ms", "wait_ms", "after_ms"))}}
    return out


def summarise(label: dict, windows: list[dict], batch: int) -> dict:
    steps = sorted(t for w in windows for t in w["step_s"])
    p99 = steps[min(len(steps) - 1, int(0.99 * len(steps)))]
    cycles = sum(w["cycles"] for w in windows)
    last = windows[-1]
    median = statistics.median(steps)
    at_boundary = [t for w in windows for t, b in zip(w["step_s"], w["boundaries"]) if b]
    return {**label, "batch": batch, "steps": len(steps), "token_ms_median": median * 1e3,
            "token_ms_p99": p99 * 1e3, "timed_s": sum(steps), "tokens_per_s": batch * len(steps) / sum(steps),
            # captures while timed should be 0 (every graph made at warm-up); slow steps say where time went
            "graph_captures": sum(sum(w["captures"]) for w in windows), "slow_steps": slow_steps(windows, median),
            "boundary_steps": len(at_boundary), "boundary_ms_max": max(at_boundary, default=0.0) * 1e3,
            "boundary_anatomy": boundary_anatomy(windows),
            "device_kv_fraction": last["device_kv_fraction"], "device_kv_bytes": last["device_kv_bytes"],
            # without the slots staged for the next plan: what decode attends to, plus index keys
            "resident_kv_fraction": (last["device_kv_bytes"] - last["staged_kv_bytes"]) / last["full_kv_bytes"],
            "peak_device_kv_fraction": max(w["peak_device_kv_fraction"] for w in windows),
            "device_kv_capacity_bytes": last["device_kv_capacity_bytes"], "full_kv_bytes": last["full_kv_bytes"],
            "host_kv_bytes": last["host_kv_bytes"],
            "peak_gpu_bytes": max((w["peak_gpu_bytes"] or 0) for w in windows) or None,
            "cycles": cycles, "bytes_copied_per_cycle": sum(w["bytes_copied"] for w in windows) / cycles if cycles else 0,
            # single-layer blocks copied at the boundary (the plan's blocks not copied ahead) and ahead of it
            "late_blocks_per_cycle": sum(w["late_blocks"] for w in windows) / cycles if cycles else 0,
            "prefetched_blocks_per_cycle": sum(w["prefetched_blocks"] for w in windows) / cycles if cycles else 0,
            # plan blocks kept out a cycle more for want of staging room (late="defer"); late + prefetched
            # + deferred is what the plans wanted to bring in
            "deferred_blocks_per_cycle": sum(w["deferred_blocks"] for w in windows) / cycles if cycles else 0,
            "late_fraction": (sum(w["late_blocks"] for w in windows)
                              / max(1, sum(w["late_blocks"] + w["prefetched_blocks"] for w in windows))),
            "swap_wait_ms_per_cycle": 1e3 * sum(w["swap_wait_s"] for w in windows) / cycles if cycles else 0.0,
            "swap_wait_fraction": sum(w["swap_wait_s"] for w in windows) / sum(steps),
            # every timed step, per window: its ms, the boundaries it ran, its host parts (ms: before the
            # launch, the device wait after it, after the launch): where a p99 step sits in the cycle
            "windows": [{"step_ms": [round(t * 1e3, 3) for t in w["step_s"]], "boundaries": w["boundaries"],
                         "host_ms": [[round(x * 1e3, 3) for x in h] for h in w["host_s"]]} for w in windows]}


def run_group(model, setups: list[Setup], device, args, gen, bandwidth: float) -> list[dict]:
    """Build every engine of the group, then time windows round-robin over (engine, rho)."""
    engines = []
    for s in setups:
        t0 = time.perf_counter()
        engine, seqs = build(model, s, device, gen)
        made = engine.runner.graphs.capture_batches(s.batch) if engine.runner.graphs is not None else 0
        print(f"  built {s.policy} batch {s.batch} at {s.context} tokens in {time.perf_counter() - t0:.1f} s "
              f"(synthetic KV, prefill skipped; {made} decode graphs made)", file=sys.stderr)
        engines.append((s, engine, seqs, SwapTimer(engine, device)))
    flags = {"on": [True], "off": [False], "both": [True, False]}.get(args.overlap, [device.type == "cuda"])
    pairs = [(i, rho, flag) for i, (s, *_) in enumerate(engines) for rho in (s.rhos if s.policy == "lsa" else (None,))
             for flag in flags]
    windows = {p: [] for p in pairs}
    step_bytes = {}  # (engine, rho) -> what its step reads, taken at the end of its last window
    # lsa warms up through each sequence's first boundary too: it re-applies the prefill's plan (copies
    # nothing, and its one-time costs are not the steady state), so every timed boundary applies a
    # plan ranked from decode queries
    for s, engine, *_ in engines:
        for _ in range(args.warmup + (s.cycle if s.policy == "lsa" else 0)):
            engine.step()
    warm_captures = [graph_captures(engine) for _, engine, *_ in engines]
    for _ in range(args.rounds):
        for i, rho, flag in pairs:
            s, engine, seqs, swaps = engines[i]
            if rho is not None and engine.policy.config.budget != rho:
                engine.policy.config = dataclasses.replace(engine.policy.config, budget=rho)
                for _ in range(s.cycle):  # one boundary applies the new budget, untimed
                    engine.step()
            if engine.overlap_decode != flag:  # (a step in flight lands in the first step after)
                engine.overlap_decode = flag
                for _ in range(2):
                    engine.step()
            windows[(i, rho, flag)].append(time_window(engine, seqs, device, args.steps, swaps))
            step_bytes[(i, rho, flag)] = engine_step_bytes(model, engine)
    rows = []
    for i, rho, flag in pairs:
        s = engines[i][0]
        label = {"context": s.context, "policy": s.policy, "rho": rho, "host_dtype": s.host_dtype or "model",
                 "churn": s.churn, "max_batch": s.max_batch,
                 "index_score": s.index_score if s.policy == "lsa" else None, "alternated": len(pairs) > 1, "overlap": flag,
                 "cuda_graphs": engines[i][1].runner.graphs is not None, "graph_captures_warmup": warm_captures[i]}
        row = summarise(label, windows[(i, rho, flag)], s.batch)
        rows.append({**row, **floor_fields(step_bytes[(i, rho, flag)], bandwidth, row["token_ms_median"])})
    engines.clear()  # and the loop variables: the last engine must not outlive its group
    s = engine = seqs = swaps = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        memory = getattr(getattr(torch, "accelerator", None), "memory", None)
        if hasattr(memory, "empty_host_cache"):  # pinned buffers torch keeps for reuse
            memory.empty_host_cache()
    return rows


def plan_groups(cfg: ModelConfig, context: int, batches: list[str], args, dtype, device) -> list[list[Setup]]:
    rhos = tuple(args.rhos)
    max_tokens = args.warmup + args.cycle + args.rounds * (args.steps + args.cycle) * (len(rhos) + 1) + 8
    host_budget = int(host_available_bytes() * args.host_fraction)
    activations = args.activation_bytes if args.activation_bytes is not None else (
        6 * GiB if device.type == "cuda" else 64 * 2 ** 20)
    dev_budget = int(device_free_bytes(device, args.cpu_device_bytes) * args.device_fraction) - activations

    def setup(policy, batch, host_dtype=None, index_score="mean"):
        if policy == "lsa":
            if host_dtype == "auto":  # the model dtype if one sequence's mirror fits in host RAM, else fp8
                probe = Setup(policy, rhos, 1, context, max_tokens, args.block_size, args.cycle, None,
                              index_score=index_score)
                host_dtype = None if per_seq_bytes(cfg, probe, dtype)[1] <= host_budget else "fp8"
            host_dtype = None if host_dtype in ("bf16", "model") else host_dtype
        return Setup(policy, rhos if policy == "lsa" else (), batch, context, max_tokens, args.block_size,
                     args.cycle, host_dtype, graphs=False if args.eager else None,
                     churn=args.churn if policy == "lsa" else None, index_score=index_score)

    # (policy, host mirror format, Level-1 score): full attention, then LSA over each format and score asked for
    variants = [("full", None, "mean")] + [("lsa", h, sc) for h in dict.fromkeys(args.host_dtype)
                                           for sc in dict.fromkeys(args.index_score)]

    def largest(s: Setup) -> int:
        dev, host = per_seq_bytes(cfg, s, dtype)
        n = dev_budget // max(dev, 1)
        if host:
            n = min(n, host_budget // host)
        return min(n, args.max_batch)

    groups, skipped = [], []
    for b in batches:
        if b == "max":  # each policy (and mirror format) alone, at its own largest batch
            for policy, host_dtype, score in variants:
                n = largest(setup(policy, 1, host_dtype, score))
                if n >= 1:
                    groups.append([dataclasses.replace(setup(policy, n, host_dtype, score), max_batch=True)])
                else:
                    skipped.append({"context": context, "policy": policy, "batch": "max",
                                    "skipped": "one sequence does not fit"})
            continue
        group, dev_left, host_left = [], dev_budget, host_budget  # alive together: lsa first, full in what is left
        for policy, host_dtype, score in variants[1:] + variants[:1]:
            s = setup(policy, int(b), host_dtype, score)
            dev, host = (x * int(b) for x in per_seq_bytes(cfg, s, dtype))
            if dev <= dev_left and host <= host_left:
                group.append(s)
                dev_left, host_left = dev_left - dev, host_left - host
            else:
                skipped.append({"context": context, "policy": policy, "batch": int(b),
                                "skipped": f"KV needs {dev / GiB:.1f} GiB device / {host / GiB:.1f} GiB host; "
                                           f"{dev_left / GiB:.1f} / {host_left / GiB:.1f} GiB left"})
        if group:
            groups.append(group[::-1])
    return groups, skipped


def row_name(r: dict) -> str:
    """full, lsa@rho, or lsa@rho/att for the ``attention`` Level-1 score."""
    if r["rho"] is None:
        return r["policy"]
    return f"lsa@{r['rho']:g}" + ("/att" if r.get("index_score") == "attention" else "")


def print_table(rows: list[dict]) -> None:
    head = (f"{'context':>8} {'batch':>5} {'policy':>12} {'host':>5} {'ovl':>3} {'ms/tok':>8} {'p99':>8} {'floor':>7} {'x floor':>7} "
            f"{'tok/s':>9} {'vs full':>7} {'GPU KV':>7} {'KV peak':>7} {'late %':>6} {'defer/c':>7} {'peak GB':>8} "
            f"{'host GB':>8} {'MB/cycle':>9} {'swap ms/cyc':>11} {'bound max':>9} {'caps':>4} {'slow':>4}")
    print(head)
    full = {(r["context"], "max" if r["max_batch"] else r["batch"], r.get("overlap")): r for r in rows
            if r.get("policy") == "full" and "skipped" not in r}  # the same run's, with overlap as the row's
    for r in rows:
        if "skipped" in r:
            print(f"{r['context']:>8} {str(r['batch']):>5} {r['policy']:>12}  skipped: {r['skipped']}")
            continue
        name = row_name(r)
        ref = full.get((r["context"], "max" if r["max_batch"] else r["batch"], r.get("overlap")))
        if not ref or ref is r:
            speed = "-"
        elif r["max_batch"]:  # each at its own largest batch: aggregate tokens/s
            speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x"
        else:
            speed = f"{ref['token_ms_median'] / r['token_ms_median']:.2f}x"
        peak = f"{r['peak_gpu_bytes'] / 1e9:.1f}" if r["peak_gpu_bytes"] else "-"
        host = "-" if r["policy"] == "full" else r["host_dtype"]
        ovl = {True: "on", False: "off"}.get(r.get("overlap"), "-")
        print(f"{r['context']:>8} {r['batch']:>5} {name:>12} {host:>5} {ovl:>3} {r['token_ms_median']:>8.2f} "
              f"{r['token_ms_p99']:>8.2f} {r['floor_ms']:>7.2f} {r['ratio_to_floor'] or 0:>7.2f} "
              f"{r['tokens_per_s']:>9.1f} {speed:>7} {100 * r['resident_kv_fraction']:>6.1f}% "
              f"{100 * r['peak_device_kv_fraction']:>6.1f}% {100 * r['late_fraction']:>5.1f}% "
              f"{r['deferred_blocks_per_cycle']:>7.0f} "
              f"{peak:>8} {r['host_kv_bytes'] / 1e9:>8.2f} {r['bytes_copied_per_cycle'] / 1e6:>9.1f} "
              f"{r['swap_wait_ms_per_cycle']:>11.2f} {r['boundary_ms_max']:>9.2f} {r['graph_captures']:>4} "
              f"{len(r['slow_steps']):>4}")
    # a boundary's extra time by where it goes (median ms per kind of step): host before / device wait / host after
    for r in rows:
        anatomy = r.get("boundary_anatomy") or {}
        if "boundary" in anatomy:
            name = row_name(r) + {True: " overlap on", False: " overlap off"}.get(
                r.get("overlap"), "")
            parts = "; ".join(f"{kind} {a['step_ms']:.2f} ms (before {a['before_ms']:.2f}, wait {a['wait_ms']:.2f}, "
                              f"after {a['after_ms']:.2f})" for kind, a in anatomy.items())
            print(f"  steps of {r['context']} batch {r['batch']} {name}: {parts}")
    # steps over 10x the median: a capture (caps) or a boundary's work, or neither
    for r in rows:
        for slow in r.get("slow_steps", ()):
            name = row_name(r)
            print(f"  slow step: {r['context']} batch {r['batch']} {name}: window {slow['window']} step "
                  f"{slow['step']} {slow['ms']:.1f} ms (median {r['token_ms_median']:.2f}), boundaries "
                  f"{slow['boundaries']}, graph captures {slow['captures']}")


# ------------------------------------------------------------------ CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="llama3-8b", help="llama3-8b, tiny, or a config.json path (shapes only)")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (quick runs)")
    p.add_argument("--contexts", type=int, nargs="+", default=[131072, 524288, 1048576], help="context lengths "
                   "in tokens")
    p.add_argument("--batch", nargs="+", default=["1", "max"], help="batch sizes, or max (per policy)")
    p.add_argument("--rhos", type=float, nargs="+", default=[0.10, 0.135], help="lsa budgets")
    p.add_argument("--steps", type=int, default=64, help="decode steps per timed window")
    p.add_argument("--rounds", type=int, default=3, help="windows per (policy, rho), alternated")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps before the windows")
    p.add_argument("--cycle", type=int, default=64, help="lsa cycle (decode steps between boundaries)")
    p.add_argument("--block-size", type=int, default=64, help="tokens per KV block")
    p.add_argument("--host-dtype", nargs="+", default=["auto"], help="lsa host mirror formats, each its own lsa "
                   "engine: auto (model dtype if it fits, else fp8), model, fp8, int4")
    p.add_argument("--index-score", nargs="+", choices=("mean", "attention"), default=["mean"],
                   help="lsa's Level-1 score, each its own lsa engine: mean (device index keys) or attention (exact "
                        "attention of the last queries on the index layers' keys, read from the host mirror)")
    p.add_argument("--churn", type=float, default=None, help="lsa: make plans replace about this share of the "
                   "resident set (real text: 0.33; default: random KV, most of it)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--eager", action="store_true", help="decode steps launched from Python (no CUDA graphs)")
    p.add_argument("--overlap", choices=("auto", "on", "off", "both"), default="auto",
                   help="overlapped decode (a step launched before the step before's tokens are read; engine/llm.py): "
                        "auto = the engine's default (on CUDA), both = each engine timed with and without it, "
                        "in alternation")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--max-batch", type=int, default=256, help="cap on the computed largest batch")
    p.add_argument("--device-fraction", type=float, default=0.92, help="share of free GPU memory for KV")
    p.add_argument("--activation-bytes", type=int, default=None,
                   help="device memory kept for activations (default 6 GiB on CUDA, 64 MiB on CPU)")
    p.add_argument("--host-fraction", type=float, default=0.85, help="share of available host RAM for mirrors")
    p.add_argument("--cpu-device-bytes", type=int, default=2 * GiB, help="'device' memory on a CPU run")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and KV")
    p.add_argument("--out", default="bench_decode.json", help="JSON results file")


def run_bench(args) -> int:
    from engine.config import parse_dtype

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype, device.type)
    contexts = [c - c % args.block_size for c in args.contexts]
    cfg = model_config(args.config, args.layers, max(contexts) + 65536)
    t0 = time.perf_counter()
    model = random_model(cfg, device, dtype, seed=args.seed)
    print(f"model: {args.config} shapes, {cfg.num_layers} layers, random weights (seed {args.seed}), {dtype}, "
          f"on {device} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    print("KV is synthetic: the host mirror (lsa) or the device pool (full) is filled with random blocks and "
          "summaries; prefill is skipped", file=sys.stderr)
    gen = torch.Generator().manual_seed(args.seed)
    bandwidth = copy_bandwidth(device)
    print(f"device copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + written): the floor's rate", file=sys.stderr)
    rows = []
    for context in contexts:
        groups, skipped = plan_groups(cfg, context, args.batch, args, dtype, device)
        rows += skipped
        for group in groups:
            rows += run_group(model, group, device, args, gen, bandwidth)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else platform.processor() or "cpu", "torch": torch.__version__, "dtype": str(dtype),
            "model": f"{args.config} shapes, {cfg.num_layers} layers, random weights (seed {args.seed})",
            "kv": "synthetic (prefill skipped)", "command": " ".join(sys.argv), "args": vars(args),
            "host_available_bytes": host_available_bytes(), "copy_bw_bytes_per_s": bandwidth}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print_table(rows)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    from benchmarks.commands import main

    raise SystemExit(main("decode"))
