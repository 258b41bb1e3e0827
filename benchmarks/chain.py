"""Kernels timed as the decode step runs them: a CUDA graph of one call per layer, 32 layers.

    python -m benchmarks.chain [--out PATH] [--what attention,gemv] [--layers 32]

``benchmarks/kernels.py`` and ``benchmarks/decode_linear.py`` time one call after clearing the
L2 cache with a 256 MB memset; at the sizes of a batch-1 decode step (a 128K sparse attention
reads 53 MB a layer, an o projection 34 MB) that memset's write-back and the single call's ramp
weigh as much as the differences between tilings. Here a graph replays the call once per layer
of a 32-layer model, each layer with its own KV pool or weights (so nothing is served from L2,
as in the step), and the time per call is the replay's median over rounds divided by the layers.

``attention``: sparse decode attention (Llama-3-8B shapes, blocks of 64, bf16) at 128K and 512K
batch 1 and 128K batch 4, rho 0.10, over split count x warps x stages x ``min_blocks``.
``gemv``: each Llama-3-8B decode projection at 1 and 4 rows, cuBLAS (``F.linear``) against the
plain Triton GEMV (kernels/projection.py) over its tilings. Floors: the bytes read at the
device-to-device copy bandwidth measured in this run as ``lsa bench decode`` measures it
(benchmarks/floor.py; the first run, docs/results/2026-12-03k/call1, timed its own graph-captured copy). Prints tables, writes JSON.
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.floor import copy_bandwidth  # noqa: E402
from kernels.fused import rotary_triton, silu_mul_triton  # noqa: E402
from kernels.projection import decode_gemv_triton, decode_linear_triton, gemv_tiles  # noqa: E402
from kernels.sparse_attention import (default_num_splits, default_num_stages,  # noqa: E402
                                      sparse_decode_attention_triton)

HQ, HKV, D, BLOCK = 32, 8, 128, 64
DT = torch.bfloat16
PROJECTIONS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def replay_ms(fn, layers: int, rounds: int = 7, reps: int = 10) -> float:
    """Median over ``rounds`` of the mean time of ``reps`` replays of a graph of ``fn``, per layer."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps / layers)
    del graph
    return sorted(times)[len(times) // 2]


def attention_rows(layers: int, bw: float) -> list[dict]:
    rows = []
    for ctx, batch in ((131072, 1), (524288, 1), (131072, 4)):
        n_blocks = math.ceil(ctx * 0.10 / BLOCK)
        slots = batch * n_blocks
        pool = torch.randn(layers, 2, slots, HKV, BLOCK, D, dtype=DT, device="cuda")
        q = torch.randn(layers, batch, HQ, D, dtype=DT, device="cuda")
        out = torch.empty_like(q)
        table = torch.randperm(slots, device="cuda").int().view(batch, n_blocks)
        nb = torch.full((batch,), n_blocks, dtype=torch.int32, device="cuda")
        last = torch.full((batch,), 37, dtype=torch.int32, device="cuda")
        read = batch * ((n_blocks - 1) * BLOCK + 37) * HKV * D * 2 * 2
        base_splits = default_num_splits(batch, HKV, torch.device("cuda"))
        base_stages = default_num_stages(BLOCK, D, 2)
        ref = None
        for splits in sorted({max(1, base_splits * f // 4) for f in (1, 2, 4, 8)}):
            for warps in (4, 8):
                for stages in (2, 3):
                    for min_blocks in (1, 4, 8, 16):
                        kw = dict(num_splits=splits, num_warps=warps, num_stages=stages, min_blocks=min_blocks)

                        def step(kw=kw):
                            for layer in range(layers):
                                sparse_decode_attention_triton(q[layer], pool[layer, 0], pool[layer, 1], table, nb,
                                                               last, D ** -0.5, out=out[layer], **kw)
                        try:
                            ms = replay_ms(step, layers)
                        except Exception as e:  # out of shared memory, say
                            rows.append(dict(context=ctx, batch=batch, **kw, error=repr(e)[:120]))
                            continue
                        got = out.float()
                        err = 0.0 if ref is None else ((got - ref).norm() / ref.norm()).item()
                        ref = got if ref is None else ref
                        rows.append(dict(context=ctx, batch=batch, **kw, us=ms * 1e3, x_floor=ms / (read / bw * 1e3),
                                         default=(splits, stages, warps, min_blocks) == (base_splits, base_stages, 4, 1),
                                         rel_err=err))
        del pool
        torch.cuda.empty_cache()
    return rows


def gemv_rows(layers: int, bw: float) -> list[dict]:
    rows = []
    for name, (n, k) in PROJECTIONS.items():
        weights = torch.randn(layers, n, k, dtype=DT, device="cuda") * 0.02
        for m in (1, 4):
            x = torch.randn(layers, m, k, dtype=DT, device="cuda")
            floor_us = n * k * 2 / bw * 1e6
            configs = [None] + [(bn, bk, st, 4) for bn in (16, 32, 64) for bk in (256, 512) for st in (3, 4)]
            for tiles in configs:
                if tiles is None:
                    def step():
                        for layer in range(layers):
                            F.linear(x[layer], weights[layer])
                else:
                    def step(tiles=tiles):
                        bn, bk, st, w = tiles
                        for layer in range(layers):
                            decode_linear_triton(x[layer], weights[layer], block_n=bn, block_k=bk, num_stages=st,
                                                 num_warps=w)
                try:
                    us = replay_ms(step, layers) * 1e3
                except Exception as e:
                    rows.append(dict(proj=name, rows=m, tiles=tiles, error=repr(e)[:120]))
                    continue
                rows.append(dict(proj=name, n=n, k=k, rows=m, tiles=tiles or "cublas", us=us, x_floor=us / floor_us,
                                 rule=tiles == gemv_tiles(n, k)))
            if name == "gate_up":  # the MLP's first half: the GEMV then silu_mul, or the GEMV ending with it
                tiles = gemv_tiles(n, k)
                variants = {
                    "cublas+silu": lambda layer: silu_mul_triton(*F.linear(x[layer], weights[layer]).chunk(2, -1)),
                    "gemv+silu": lambda layer: silu_mul_triton(*decode_gemv_triton(x[layer], weights[layer],
                                                                                   tiles).chunk(2, -1)),
                    "gemv_glu": lambda layer: decode_gemv_triton(x[layer], weights[layer], tiles, glu=True)}
                for label, call in variants.items():
                    us = replay_ms(lambda call=call: [call(layer) for layer in range(layers)], layers) * 1e3
                    rows.append(dict(proj="gate_up+silu", n=n, k=k, rows=m, tiles=label, us=us,
                                     x_floor=us / floor_us, rule=label == "gemv_glu"))
            if name == "qkv":  # q|k|v then the rotary of q and k (32 + 8 heads of 128), or the GEMV ending with it
                tiles = gemv_tiles(n, k)
                cos, sin = torch.rand(m, D, dtype=DT, device="cuda"), torch.rand(m, D, dtype=DT, device="cuda")
                rot = (HQ + HKV) * D

                def then_rotary(y):
                    rotary_triton(y[:, :rot].view(m, HQ + HKV, D), cos, sin)
                    return y
                variants = {
                    "cublas+rotary": lambda layer: then_rotary(F.linear(x[layer], weights[layer])),
                    "gemv+rotary": lambda layer: then_rotary(decode_gemv_triton(x[layer], weights[layer], tiles)),
                    "gemv_rope": lambda layer: decode_gemv_triton(x[layer], weights[layer], tiles,
                                                                  rotary=(cos, sin, D, rot))}
                for label, call in variants.items():
                    us = replay_ms(lambda call=call: [call(layer) for layer in range(layers)], layers) * 1e3
                    rows.append(dict(proj="qkv+rotary", n=n, k=k, rows=m, tiles=label, us=us,
                                     x_floor=us / floor_us, rule=label == "gemv_rope"))
        del weights
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "chain.json"))
    ap.add_argument("--what", default="attention,gemv")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth(torch.device("cuda"))  # as bench decode measures it, so that the floors compare
    result = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, python=platform.python_version(), command=" ".join(sys.argv),
                  copy_bw_gbps=bw / 1e9, layers=args.layers)
    what = args.what.split(",")
    print(f"{result['gpu']}  torch {result['torch']}  triton {result['triton']}  copy {bw / 1e9:.0f} GB/s")
    if "attention" in what:
        result["attention"] = attention_rows(args.layers, bw)
        for key in sorted({(r["context"], r["batch"]) for r in result["attention"]}):
            ok = [r for r in result["attention"] if (r["context"], r["batch"]) == key and "us" in r]
            best = sorted(ok, key=lambda r: r["us"])[:6]
            dflt = [r for r in ok if r["default"]]
            print(f"attention {key[0]} x {key[1]}: default " + ", ".join(
                f"{r['num_splits']}/{r['num_warps']}/{r['num_stages']}/{r['min_blocks']} {r['us']:.1f} us "
                f"({r['x_floor']:.2f}x floor)" for r in dflt))
            for r in best:
                print(f"    splits {r['num_splits']:>4} warps {r['num_warps']} stages {r['num_stages']} "
                      f"min_blocks {r['min_blocks']:>2}: {r['us']:.1f} us ({r['x_floor']:.2f}x floor) err {r['rel_err']:.1e}")
    if "gemv" in what:
        result["gemv"] = gemv_rows(args.layers, bw)
        for key in sorted({(r["proj"], r["rows"]) for r in result["gemv"]}):
            ok = [r for r in result["gemv"] if (r["proj"], r["rows"]) == key and "us" in r]
            if key[0] in ("gate_up+silu", "qkv+rotary"):
                print(f"{key[0]} x {key[1]} rows: " + ", ".join(f"{r['tiles']} {r['us']:.1f} us" for r in ok))
                continue
            cublas = [r for r in ok if r["tiles"] == "cublas"]
            best = sorted([r for r in ok if r["tiles"] != "cublas"], key=lambda r: r["us"])[:3]
            rule = [r for r in ok if r["rule"]]
            print(f"gemv {key[0]} x {key[1]} rows: cublas {cublas[0]['us']:.1f} us ({cublas[0]['x_floor']:.2f}x)"
                  + (f"; rule {rule[0]['tiles']} {rule[0]['us']:.1f}" if rule else "; rule: cublas")
                  + "; best " + ", ".join(f"{r['tiles']} {r['us']:.1f} ({r['x_floor']:.2f}x)" for r in best))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
