"""Decode throughput of the engine (full attention) on a Llama-3-8B-shaped model with random weights.

    python -m benchmarks.engine_decode --context 8192 --batch 1 16 --out engine_decode.json

Each batch size: prefill ``batch`` prompts of ``context`` tokens through the engine, then time
``--steps`` decode steps (all sequences decoding together); median step time over ``--repeats``
timed windows. On CUDA the decode step runs as a CUDA graph and eagerly, in two engines alive
together, windows alternated. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from benchmarks.synthetic import model_config
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.sampling import SamplingParams
from engine.sequence import Status

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(model, config: ModelConfig, device, batch: int, context: int, steps_total: int, graphs: bool):
    """An engine with ``batch`` random prompts of ``context`` tokens prefilled (timed)."""
    engine = LLMEngine(model, EngineConfig(
        device=str(device),
        cache=CacheConfig(block_size=64, num_device_blocks=batch * (-(-(context + steps_total) // 64)),
                          host_mirror=False),
        scheduler=SchedulerConfig(max_num_seqs=batch, prefill_chunk=2048, max_model_len=context + steps_total + 1,
                                  cuda_graphs=graphs)))
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=steps_total, ignore_eos=True)
    seqs = [engine.add_request(torch.randint(10, config.vocab_size, (context,), generator=gen).tolist(), params)
            for _ in range(batch)]
    t0 = time.perf_counter()
    while any(s.status is not Status.DECODE for s in seqs):
        engine.step()
    _sync(device)
    prefill_s = time.perf_counter() - t0
    for _ in range(4):  # warm-up (captures the graphs)
        engine.step()
    return engine, seqs, prefill_s


def time_window(engine, seqs, device, steps: int) -> tuple[float, float]:
    """(seconds per step, tokens per second) over ``steps`` steps."""
    before = sum(len(s.output_ids) for s in seqs)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(device)
    dt = time.perf_counter() - t0
    assert all(s.status is Status.DECODE for s in seqs), "a sequence finished inside the timed window"
    return dt / steps, (sum(len(s.output_ids) for s in seqs) - before) / dt


def bench_batch(model, config: ModelConfig, device, batch: int, context: int, steps: int, repeats: int,
                modes: list[str]) -> list[dict]:
    """Engines of every mode (graph / eager) alive together, timed windows alternated."""
    # room for the decode steps some sequences take while the others are still prefilling
    steps_total = (steps * repeats + 8) * len(modes) + batch * (-(-context // 2048)) + 8
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    built = {m: build(model, config, device, batch, context, steps_total, m == "graph") for m in modes}
    samples = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            samples[m].append(time_window(built[m][0], built[m][1], device, steps))
    rows = []
    for m in modes:
        engine, _, prefill_s = built[m]
        times = [t for t, _ in samples[m]]
        med = statistics.median(times)
        acc = engine.cache.accounting()
        rows.append({"batch": batch, "context": context, "mode": m, "prefill_s": prefill_s,
                     "step_ms_median": med * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
                     "tokens_per_s": statistics.median(r for _, r in samples[m]),
                     "device_kv_bytes": acc.device_bytes, "full_kv_bytes": acc.full_bytes,
                     "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None})
    del built
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick CPU run")
    parser.add_argument("--modes", nargs="+", default=None, choices=["graph", "eager"],
                        help="decode step modes, alternated (default: graph and eager on CUDA, eager on CPU)")
    parser.add_argument("--out", default="engine_decode.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = model_config("llama3-8b", args.layers, 2 * args.context)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(config, device, dtype, seed=0)
    modes = args.modes or (["graph", "eager"] if device.type == "cuda" else ["eager"])
    rows = [r for b in args.batch for r in bench_batch(model, config, device, b, args.context, args.steps,
                                                        args.repeats, modes)]
    meta = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor(), "torch": torch.__version__, "dtype": str(dtype),
            "model": "Llama-3-8B shapes, random weights", "layers": config.num_layers}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"{'batch':>5} {'context':>8} {'mode':>6} {'step ms (median)':>17} {'min':>7} {'max':>7} {'tokens/s':>9} "
          f"{'prefill s':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {r['context']:>8} {r['mode']:>6} {r['step_ms_median']:>17.2f} {r['step_ms_min']:>7.2f} "
              f"{r['step_ms_max']:>7.2f} {r['tokens_per_s']:>9.1f} {r['prefill_s']:>9.2f}")
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
