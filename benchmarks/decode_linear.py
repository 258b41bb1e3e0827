"""Benchmark of a decode step's projections on one GPU: torch's F.linear against alternatives.

    python -m benchmarks.decode_linear [--batches 1,4] [--vocab 49152,128256] [--out PATH]

Llama-3-8B shapes (hidden 4096, 32 query heads, 8 KV heads, intermediate 14336), bf16, at decode
batch sizes: the fused q|k|v, o, gate|up and down projections and the LM head. Per shape: F.linear
as the engine calls it (the weight [N, K] row-major), the same product against the weight stored
transposed ([K, N], x @ Wt), and a Triton GEMV (a program per BLOCK_N output columns, the whole K
loop pipelined; swept over tile sizes, the best reported). Each is a median of do_bench (the L2
cache cleared before every call) over a CUDA graph replay, with the bytes each must read (the
weight) over that time against the device-to-device copy bandwidth measured in the run. The
Triton GEMV's result is checked against a float64 product. Prints a table, writes JSON.
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
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.kernels import copy_bandwidth, graph_bench  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 4096, 32, 8, 128, 14336


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """y[M, N] = x[M, K] @ w[N, K]^T for a few rows of x; K a multiple of BLOCK_K, N of BLOCK_N."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, M_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :])
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=offs_m[:, None] < M, other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=offs_m[:, None] < M)


def gemv(x, w, out, block_n, block_k, stages, warps):
    m, k = x.shape
    n = w.shape[0]
    _gemv_kernel[(n // block_n,)](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
                                  M_PAD=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
                                  NUM_STAGES=stages, num_warps=warps)
    return out


GEMV_CONFIGS = list(itertools.product((16, 32, 64), (128, 256, 512), (3, 5), (4, 8)))


def run_shape(name, n, k, batch, copy_bw):
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k ** -0.5
    x = torch.randn(batch, k, dtype=torch.bfloat16, device="cuda")
    wt = w.t().contiguous()
    out = torch.empty(batch, n, dtype=torch.bfloat16, device="cuda")
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
            gemv(x, w, out, bn, bk, stages, warps)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            if err > 1e-2:
                sweep[key] = f"rel err {err:.2e}"
                continue
            ms = graph_bench(lambda: gemv(x, w, out, bn, bk, stages, warps), rep=30, what=f"{name} gemv {key}")
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
    result = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, command=" ".join(sys.argv), copy_bw_gbps=copy_bw / 1e9, rows=rows)
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
    print("json:", args.out)


if __name__ == "__main__":
    main()
