"""``lsa bench prefill``: long prefill through the engine against its floor, and its peak GPU memory.

    lsa bench prefill --model /tmp/llama3-8b-random --contexts 32768 131072 --out prefill.json
    python -m benchmarks.prefill --model tiny --contexts 2048 --device cpu      # a smoke run

The floor of a prompt of T tokens is measured in the same run: the linear layers' FLOPs
(``2 x T x`` the weights of the layers' matmuls) at the matmul rate of a prefill-shaped GEMM
([chunk, H] x [H, I]), plus causal attention's FLOPs (``2 x T^2 x D x Hq`` per layer) at the
rate of torch SDPA's flash backend on one layer of T_rate tokens. The engine's prefill of T
random tokens (LSA policy, ``max_tokens=1``) runs layer by layer (``layerwise``: the device holds
one layer's KV) and, up to ``--ordinary-max``, the ordinary way (every layer per segment, the
prompt's KV in the pool), each after an untimed short prompt that compiles the kernels.
Peak GPU memory is over what the engine held before (weights, pool, index keys), against
the layer-by-layer prefill's own bound (``LayerwisePrefill.device_bytes``). The flash kernel
(kernels/flash_prefill.py) is also timed alone against SDPA on the same shapes.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import torch
import torch.nn.functional as F

from benchmarks.synthetic import _sync, model_config
from engine.config import CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig, parse_dtype
from engine.llm import LLMEngine
from engine.sampling import SamplingParams


def timed(fn, device, repeats: int = 3) -> float:
    """Median seconds of ``fn()`` after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_rate(cfg: ModelConfig, chunk: int, device, dtype) -> float:
    """FLOP/s of the prefill's largest GEMM shape, [chunk, H] x [H, I]."""
    a = torch.randn(chunk, cfg.hidden_size, device=device, dtype=dtype)
    w = torch.randn(cfg.intermediate_size, cfg.hidden_size, device=device, dtype=dtype)
    return 2 * chunk * cfg.hidden_size * cfg.intermediate_size / timed(lambda: F.linear(a, w), device)


def linear_flops_per_token(cfg: ModelConfig) -> int:
    """Multiply-adds x 2 of every layer's projections and MLP for one token (LM head excluded:
    the prefill computes it for the last token only)."""
    h, d = cfg.hidden_size, cfg.head_dim
    per_layer = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h + 3 * h * cfg.intermediate_size
    return 2 * cfg.num_layers * per_layer


def attention_flops(cfg: ModelConfig, tokens: int, start: int = 0) -> float:
    """Causal attention of queries [start, tokens) over keys up to each: QK^T and PV, all layers."""
    pairs = (tokens * (tokens + 1) - start * (start + 1)) / 2  # (query, key) pairs attended
    return 4 * pairs * cfg.head_dim * cfg.num_heads * cfg.num_layers


def kernel_rates(cfg: ModelConfig, tokens: int, device, dtype) -> dict:
    """TFLOP/s of one layer's causal attention over ``tokens``: SDPA flash (the floor's rate) and
    kernels.prefill_attention, whole prompt and as its last 8192-query segment."""
    import kernels

    gen = torch.Generator(device=device).manual_seed(0)
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = torch.randn(tokens, hq, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(hkv, tokens, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn_like(k)
    one_layer = attention_flops(cfg, tokens) / cfg.num_layers
    out = {"tokens": tokens}
    qs, ks, vs = q.transpose(0, 1)[None], k.repeat_interleave(hq // hkv, 0)[None], v.repeat_interleave(hq // hkv, 0)[None]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out["sdpa_flash_tflops"] = one_layer / timed(lambda: F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True), device) / 1e12
    except RuntimeError as exc:  # no flash backend here (CPU): the default one
        out["sdpa_flash_error"] = str(exc)[:200]
        out["sdpa_flash_tflops"] = one_layer / timed(lambda: F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True), device) / 1e12
    del qs, ks, vs
    scale = d ** -0.5
    out["kernel_tflops"] = one_layer / timed(lambda: kernels.prefill_attention(q, k, v, 0, scale), device) / 1e12
    seg = min(8192, tokens)
    seg_flops = attention_flops(cfg, tokens, tokens - seg) / cfg.num_layers
    out["kernel_segment_tflops"] = seg_flops / timed(
        lambda: kernels.prefill_attention(q[-seg:], k, v, tokens - seg, scale), device) / 1e12
    return out


def build_engine(model, cfg: ModelConfig, context: int, layerwise: bool, chunk: int, host_dtype, block: int):
    """An LSA engine for one prompt of ``context`` tokens: a host mirror for all of it; a device
    pool of the decode reserve (layer by layer) or of the whole prompt (ordinary)."""
    from engine.policies import make_policy

    policy = PolicyConfig(name="lsa", budget=0.10)
    blocks = -(-(context + 1) // block)
    reserve = make_policy(policy, cfg.num_layers, block).decode_reserve(context + 1)
    config = EngineConfig(
        cache=CacheConfig(block_size=block, num_device_blocks=(reserve + 2 if layerwise else blocks + 2),
                          num_host_blocks=blocks + 1, host_dtype=host_dtype),
        scheduler=SchedulerConfig(max_num_seqs=1, max_model_len=context + 8, prefill_chunk=chunk,
                                  layerwise_prefill=layerwise),
        policy=policy)
    return LLMEngine(model, config)


def prefill_once(engine: LLMEngine, ids: list[int], device) -> dict:
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    seq = engine.add_request(ids, SamplingParams(max_tokens=1, ignore_eos=True))
    while engine.has_work():
        engine.step()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - held if device.type == "cuda" else None
    return {"seconds": seconds, "engine_prefill_s": seq.prefill_s, "peak_gpu_over_held_bytes": peak,
            "held_gpu_bytes": held, "host_kv_bytes": seq.kv.get("host_kv_bytes")}


def run_bench(args) -> int:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype, device.type)
    longest = max(args.contexts)
    if args.model in ("llama3-8b", "tiny"):
        from engine.loader import random_model

        cfg = model_config(args.model, args.layers, longest + 16)
        model = random_model(cfg, device, dtype, seed=0)
    else:
        from engine.loader import load_model
        from engine.weights import load_config, resolve_model

        source = resolve_model(args.model)
        cfg = load_config(source)
        model = load_model(source, device, dtype, cfg)
    t0 = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "model": args.model, "chunk": args.chunk, "block_size": args.block_size,
              "host_dtype": args.host_dtype, "dtype": str(dtype)}
    report["matmul_tflops"] = matmul_rate(cfg, args.chunk, device, dtype) / 1e12
    report["attention"] = kernel_rates(cfg, min(args.rate_tokens, longest), device, dtype)
    flash = report["attention"]["sdpa_flash_tflops"] * 1e12
    rows = []
    gen = torch.Generator().manual_seed(1)
    for path in ("layerwise", "ordinary"):
        contexts = [c for c in args.contexts if path == "layerwise" or c <= args.ordinary_max]
        if not contexts:
            continue
        for context in contexts:
            engine = build_engine(model, cfg, context, path == "layerwise", args.chunk, args.host_dtype,
                                  args.block_size)
            prefill_once(engine, torch.randint(0, cfg.vocab_size, (2 * args.chunk + 5,), generator=gen).tolist(),
                         device)  # compiles
            got = prefill_once(engine, torch.randint(0, cfg.vocab_size, (context,), generator=gen).tolist(), device)
            floor = context * linear_flops_per_token(cfg) / (report["matmul_tflops"] * 1e12) \
                + attention_flops(cfg, context) / flash
            bound = engine.runner.layerwise.device_bytes(context) if path == "layerwise" else None
            row = {"path": path, "context": context, **got, "tokens_per_s": context / got["seconds"],
                   "floor_s": floor, "over_floor": got["seconds"] / floor,
                   "layerwise_bound_bytes": sum(bound.values()) if bound else None, "layerwise_bound": bound}
            rows.append(row)
            print(f"{path:>9} {context:>8} tokens: {got['seconds']:8.2f} s ({row['tokens_per_s']:8.0f} tok/s), floor "
                  f"{floor:7.2f} s -> {row['over_floor']:.2f}x; peak GPU over held "
                  f"{(got['peak_gpu_over_held_bytes'] or 0) / 1e9:.2f} GB"
                  + (f" (bound {row['layerwise_bound_bytes'] / 1e9:.2f} GB)" if bound else ""), flush=True)
            del engine
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report["rows"] = rows
    report["seconds"] = time.perf_counter() - t0
    a = report["attention"]
    print(f"matmul {report['matmul_tflops']:.0f} TFLOP/s; attention at {a['tokens']} tokens: SDPA flash "
          f"{a['sdpa_flash_tflops']:.0f}, kernel {a['kernel_tflops']:.0f} (last segment "
          f"{a['kernel_segment_tflops']:.0f}) TFLOP/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama3-8b", help="llama3-8b | tiny (random weights, shapes only) or a "
                   "model directory / GGUF (e.g. one from benchmarks/make_random_model.py)")
    p.add_argument("--layers", type=int, default=None, help="with a shape name: override its layer count")
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--ordinary-max", type=int, default=32768, help="longest prompt also run the ordinary way")
    p.add_argument("--chunk", type=int, default=8192, help="prefill_chunk: tokens per segment")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--host-dtype", default=None, choices=["fp8"], help="host mirror format (default: the model dtype)")
    p.add_argument("--rate-tokens", type=int, default=32768, help="tokens of the attention rate measurement")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=None, help="JSON report")


if __name__ == "__main__":
    from benchmarks.commands import main

    raise SystemExit(main("prefill"))
