"""Decode throughput of the engine (full attention) on a Llama-3-8B-shaped model with random weights.

    python -m benchmarks.engine_decode --context 8192 --batch 1 16 --out engine_decode.json

Each batch size: prefill ``batch`` prompts of ``context`` tokens through the engine, then time
``--steps`` decode steps (all sequences decoding together); median and p90 step time over
``--repeats`` timed windows. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, RopeScaling, SchedulerConfig
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.sampling import SamplingParams
from engine.sequence import Status

LLAMA3_8B = ModelConfig(
    architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
    eos_token_ids=(128001,))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_batch(model, config: ModelConfig, device, batch: int, context: int, steps: int, repeats: int) -> dict:
    # room for the decode steps some sequences take while the others are still prefilling
    steps_total = steps * repeats + 8 + batch * (-(-context // 2048)) + 8
    engine = LLMEngine(model, EngineConfig(
        device=str(device),
        cache=CacheConfig(block_size=64, num_device_blocks=batch * (-(-(context + steps_total) // 64)),
                          host_mirror=False),
        scheduler=SchedulerConfig(max_num_seqs=batch, prefill_chunk=2048, max_model_len=context + steps_total + 1)))
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=steps_total, ignore_eos=True)
    seqs = [engine.add_request(torch.randint(10, config.vocab_size, (context,), generator=gen).tolist(), params)
            for _ in range(batch)]
    t0 = time.perf_counter()
    while any(s.status is not Status.DECODE for s in seqs):
        engine.step()
    _sync(device)
    prefill_s = time.perf_counter() - t0
    for _ in range(4):  # warm-up
        engine.step()
    times, rates = [], []
    for _ in range(repeats):
        before = sum(len(s.output_ids) for s in seqs)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync(device)
        dt = time.perf_counter() - t0
        assert all(s.status is Status.DECODE for s in seqs), "a sequence finished inside the timed window"
        times.append(dt / steps)
        rates.append((sum(len(s.output_ids) for s in seqs) - before) / dt)
    med = statistics.median(times)
    acc = engine.cache.accounting()
    return {"batch": batch, "context": context, "prefill_s": prefill_s, "step_ms_median": med * 1e3,
            "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
            "tokens_per_s": statistics.median(rates), "device_kv_bytes": acc.device_bytes, "full_kv_bytes": acc.full_bytes,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick CPU run")
    parser.add_argument("--out", default="engine_decode.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = LLAMA3_8B
    if args.layers:
        config = ModelConfig(**{**config.__dict__, "num_layers": args.layers})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(config, device, dtype, seed=0)
    rows = [bench_batch(model, config, device, b, args.context, args.steps, args.repeats) for b in args.batch]
    meta = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor(), "torch": torch.__version__, "dtype": str(dtype),
            "model": "Llama-3-8B shapes, random weights", "layers": config.num_layers}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"{'batch':>5} {'context':>8} {'step ms (median)':>17} {'min':>7} {'max':>7} {'tokens/s':>9} {'prefill s':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {r['context']:>8} {r['step_ms_median']:>17.2f} {r['step_ms_min']:>7.2f} "
              f"{r['step_ms_max']:>7.2f} {r['tokens_per_s']:>9.1f} {r['prefill_s']:>9.2f}")
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
