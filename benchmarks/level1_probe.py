"""What one Level-1 boundary costs, by piece: host time (what the decode loop waits for) and
device time, of one sequence's scoring at a long context (Llama-3-8B shapes, synthetic KV, the
engine of ``lsa bench decode``), for each Level-1 score and host-mirror format asked for.

    python -m benchmarks.level1_probe --context 131072 --scores mean attention --host-dtype model int4

Prints a table and writes JSON (``--out``): per (score, format) the median over ``--repeats``
of the host time of ``LSAPolicy._scores`` (the work a boundary launches on the decode thread),
the time until its result is on the device, and, for the attention score, the same for the two
pieces it is made of (the keys read from the mirror; the attention mass over them). With
``--profile``, the CUDA runtime calls of one scoring (torch.profiler), longest first.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from benchmarks.synthetic import Setup, build, model_config
from engine.loader import random_model
from engine.policies.base import window_block_mass


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> dict:
    """Median host ms (the call's return) and device ms (until its work is done) of ``fn()``."""
    host, total = [], []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync(device)
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        total.append((t2 - t0) * 1e3)
    return {"host_ms": statistics.median(host), "total_ms": statistics.median(total)}


def probe(model, context: int, score: str, host_dtype: str | None, args, device) -> dict:
    s = Setup("lsa", (0.1,), 1, context, 2 * args.cycle + 8, args.block_size, args.cycle, host_dtype, churn=None,
              index_score=score)
    engine, seqs = build(model, s, device, torch.Generator().manual_seed(0))
    for _ in range(args.cycle + 2):  # past the first boundary: the query windows hold decode queries
        engine.step()
    sync(device)
    policy, cache, sid = engine.policy, engine.cache, seqs[0].seq_id
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def scores():  # on a side stream, as the engine's boundaries score
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            policy._scores(sid)

    row = {"context": context, "score": score, "host_dtype": host_dtype or "model",
           "scores": timed(scores, device, args.repeats)}
    if policy.reads_keys:
        host_ids = cache.blocks.seqs[sid].host_ids
        layer = policy.index_layers()[0]
        queries = torch.stack(list(policy._queries[sid][layer]))
        keys = cache.host_keys(host_ids, layer)
        last = cache.num_tokens(sid) - 1
        row["keys_one_layer"] = timed(lambda: cache.host_keys(host_ids, layer), device, args.repeats)
        row["mass_one_layer"] = timed(lambda: window_block_mass(queries, keys, queries.shape[-1] ** -0.5,
                                                                args.block_size, last), device, args.repeats)
        row["keys_bytes_per_layer"] = keys.numel() * keys.element_size()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            scores()
            sync(device)
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.profile)
        row["profile"] = table
        print(f"--- {score} / {host_dtype or 'model'}\n{table}")
    del engine, seqs, policy, cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--scores", nargs="+", default=["mean", "attention"], choices=("mean", "attention"))
    p.add_argument("--host-dtype", nargs="+", default=["model", "int4"])
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--cycle", type=int, default=64)
    p.add_argument("--layers", type=int, default=None, help="fewer layers (quick runs)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--profile", type=int, default=0, help="also print this many rows of a torch.profiler table")
    p.add_argument("--config", default="llama3-8b", help="llama3-8b or tiny (a CPU smoke run)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default="level1_probe.json")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(model_config(args.config, args.layers, args.context + 2 * args.cycle + 16), device, dtype)
    rows = []
    for fmt in args.host_dtype:
        for score in args.scores:
            rows.append(probe(model, args.context, score, None if fmt == "model" else fmt, args, device))
    print(f"{'context':>8} {'score':>9} {'host':>5} {'host ms':>8} {'total ms':>8} {'keys host/total':>16} "
          f"{'mass host/total':>16}")
    for r in rows:
        k, m = r.get("keys_one_layer"), r.get("mass_one_layer")
        pieces = [f"{x['host_ms']:.2f}/{x['total_ms']:.2f}" if x else "-" for x in (k, m)]
        print(f"{r['context']:>8} {r['score']:>9} {r['host_dtype']:>5} {r['scores']['host_ms']:>8.2f} "
              f"{r['scores']['total_ms']:>8.2f} {pieces[0]:>16} {pieces[1]:>16}")
    with open(args.out, "w") as f:
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        json.dump({"rows": rows, "torch": torch.__version__, "gpu": gpu, "command": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
