"""Benchmark of a decode step's projections on one GPU: torch's F.linear against alternatives.

    python -m benchmarks.decode_linear [--batches 1,4] [--vocab 49152,128256] [--out PATH]

Llama-3-8B shapes (hidden 4096, 32 query heads, 8 KV heads, intermediate 14336), bf16, at decode
batch sizes: the fused q|k|v, o, gate|up and down projections and the LM head. Per shape: F.linear
as the engine calls it (the weight [N, K] row-major), the same product against the weight stored
transposed ([K, N], x @ Wt), and ``kernels.decode_linear``'s Triton GEMV without its prologue and
epilogue (a program per BLOCK_N output columns, the whole K loop pipelined; swept over tile sizes,
the best reported, and its default tiles). Each is a median of do_bench (the L2
cache cleared before every call) over a CUDA graph replay, with the bytes each must read (the
weight) over that time against the device-to-device copy bandwidth measured in the run. The
Triton GEMV's result is checked against a float64 product. Then a decoder layer's projections with
the kernels around them (norms, SiLU, residual adds), separate as the engine runs them by default and
fused (``kernels.decode_linear``, ``LSA_FUSED_DECODE=1``). Prints a table, writes JSON.
"""
import argparse
import datetime
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.kernels import copy_bandwidth, graph_bench  # noqa: E402
from kernels.projection import decode_linear_triton  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 4096, 32, 8, 128, 14336


def gemv(x, w, block_n, block_k, stages, warps):
    return decode_linear_triton(x, w, block_n=block_n, block_k=block_k, num_stages=stages, num_warps=warps)


GEMV_CONFIGS = list(itertools.product((16, 32, 64), (128, 256, 512), (3, 5), (4, 8)))


def run_shape(name, n, k, batch, copy_bw):
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k ** -0.5
    x = torch.randn(batch, k, dtype=torch.bfloat16, device="cuda")
    wt = w.t().contiguous()
    ref = (x.double() @ w.double().t())
    floor_ms = n * k * 2 / copy_bw * 1e3
    row = dict(shape=name, n=n, k=k, batch=batch, weight_bytes=n * k * 2, floor_ms=floor_ms)
    row["linear_ms"] = graph_bench(lambda: F.linear(x, w), what=f"{name} linear")
    row["transposed_ms"] = graph_bench(lambda: torch.matmul(x, wt), what=f"{name} x @ Wt")
    best = None
    sweep = {}
    for bn, bk, stages, warps in GEMV_CONFIGS:
        if n % bn or k % bk:
            continue
        key = f"{bn}/{bk}/{stages}/{warps}"
        try:
            out = gemv(x, w, bn, bk, stages, warps)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            if err > 1e-2:
                sweep[key] = f"rel err {err:.2e}"
                continue
            ms = graph_bench(lambda: gemv(x, w, bn, bk, stages, warps), rep=30, what=f"{name} gemv {key}")
        except Exception as e:  # e.g. out of shared memory at this tile
            sweep[key] = repr(e)[:80]
            continue
        sweep[key] = ms
        if best is None or ms < best[0]:
            best = (ms, key, err)
    row["gemv_sweep"] = sweep
    if best:
        row.update(gemv_ms=best[0], gemv_config=best[1], gemv_rel_err=best[2])
    for kind in ("linear", "transposed", "gemv"):
        if row.get(f"{kind}_ms"):
            row[f"{kind}_frac_of_copy_bw"] = floor_ms / row[f"{kind}_ms"]
    del w, wt
    torch.cuda.empty_cache()
    return row


def layer_bench(batch, copy_bw):
    """A decoder layer's projections and the kernels around them (attention left out: its output is
    stood in by q's columns), as the engine runs them without and with the fusion, one graph replay
    each; their results compared."""
    import kernels

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, dtype=torch.bfloat16, device="cuda") * scale
    h, q = HIDDEN, HEADS * HEAD_DIM
    w_qkv, w_o = rnd((HEADS + 2 * KV_HEADS) * HEAD_DIM, h, scale=h ** -0.5), rnd(h, q, scale=q ** -0.5)
    w_gu, w_down = rnd(2 * INTER, h, scale=h ** -0.5), rnd(h, INTER, scale=INTER ** -0.5)
    ln1, ln2 = 1 + 0.1 * rnd(h), 1 + 0.1 * rnd(h)
    x0 = rnd(batch, h)

    def unfused():
        x = x0.clone()
        qkv = F.linear(kernels.rms_norm(x, ln1, 1e-5), w_qkv)
        a = kernels.rms_norm(x, ln2, 1e-5, residual_in=F.linear(qkv[:, :q], w_o))  # x += o
        gate, up = F.linear(a, w_gu).chunk(2, dim=-1)
        return x + F.linear(kernels.silu_mul(gate, up), w_down)

    def fused():
        x = x0.clone()
        qkv = kernels.decode_linear(x, w_qkv, norm_weight=ln1, eps=1e-5)
        kernels.decode_linear(qkv[:, :q], w_o, residual=x)
        gate_up = kernels.decode_linear(x, w_gu, norm_weight=ln2, eps=1e-5)
        return kernels.decode_linear(gate_up, w_down, silu_input=True, residual=x)

    want, got = unfused().double(), fused().double()
    weight_bytes = 2 * sum(t.numel() for t in (w_qkv, w_o, w_gu, w_down))
    row = dict(batch=batch, weight_bytes=weight_bytes, floor_ms=weight_bytes / copy_bw * 1e3,
               unfused_ms=graph_bench(unfused, what="layer unfused"), fused_ms=graph_bench(fused, what="layer fused"),
               rel_err=((got - want).norm() / want.norm()).item())
    del w_qkv, w_o, w_gu, w_down
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--vocab", default="49152,128256", help="LM head sizes (the random 8B model's, Llama-3's)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "decode_linear.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    shapes = [("qkv", (HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), ("o", HIDDEN, HEADS * HEAD_DIM),
              ("gate_up", 2 * INTER, HIDDEN), ("down", HIDDEN, INTER)]
    shapes += [(f"lm_head_{v}", v, HIDDEN) for v in map(int, args.vocab.split(","))]
    rows = [run_shape(name, n, k, b, copy_bw) for b in map(int, args.batches.split(",")) for name, n, k in shapes]
    layers = [layer_bench(b, copy_bw) for b in map(int, args.batches.split(","))]
    result = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, command=" ".join(sys.argv), copy_bw_gbps=copy_bw / 1e9, rows=rows,
                  layers=layers)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['gpu']} torch {result['torch']} triton {result['triton']} copy {copy_bw / 1e9:.0f} GB/s")
    print(f"{'shape':>16} {'batch':>5} {'MB':>7} {'floor us':>8} {'linear us':>9} {'x@Wt us':>8} {'gemv us':>8} "
          f"{'gemv cfg':>12} {'lin %bw':>7} {'gemv %bw':>8}")
    for r in rows:
        g = r.get("gemv_ms")
        print(f"{r['shape']:>16} {r['batch']:>5} {r['weight_bytes'] / 1e6:>7.1f} {r['floor_ms'] * 1e3:>8.1f} "
              f"{r['linear_ms'] * 1e3:>9.1f} {r['transposed_ms'] * 1e3:>8.1f} {g * 1e3 if g else float('nan'):>8.1f} "
              f"{r.get('gemv_config', '-'):>12} {100 * r['linear_frac_of_copy_bw']:>6.0f}% "
              f"{100 * r.get('gemv_frac_of_copy_bw', float('nan')):>7.0f}%")
    per_step = {}
    for r in rows:
        if r["batch"] == rows[0]["batch"] and not r["shape"].startswith("lm_head"):
            for kind in ("linear", "gemv"):
                per_step[kind] = per_step.get(kind, 0.0) + 32 * r.get(f"{kind}_ms", r["linear_ms"])
    print(f"32 layers' projections at batch {rows[0]['batch']}: F.linear {per_step['linear']:.3f} ms, "
          f"best GEMV per shape {per_step['gemv']:.3f} ms")
    for r in layers:
        print(f"a layer's projections at batch {r['batch']} (x32 = a step): separate kernels {r['unfused_ms'] * 1e3:.1f} us, "
              f"fused {r['fused_ms'] * 1e3:.1f} us (floor {r['floor_ms'] * 1e3:.1f} us; rel err {r['rel_err']:.1e})")
    print("json:", args.out)


if __name__ == "__main__":
    main()
