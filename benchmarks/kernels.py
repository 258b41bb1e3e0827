"""Benchmark of kernels/ on one GPU: sparse decode attention vs SDPA, and block scoring.

    python benchmarks/kernels.py [--out PATH] [--sweep] [--contexts 32768,131072] ...

Llama-3-8B decode shapes (32 query heads, 8 KV heads, d=128, bf16, blocks of 64 tokens), one
layer. For each context x batch x resident fraction: the sparse kernel reading the resident
blocks in place from a pool laid out as docs/kv-layout.md says, torch SDPA over the full
context, and gather-the-blocks-then-SDPA, all in this run; bytes the sparse kernel must read
over its time (GB/s), and that time over the HBM floor (those bytes at the device-to-device
copy bandwidth measured in this run). Times are medians of triton.testing.do_bench, which
clears the L2 cache (a 256 MB memset) before every timed call, of a CUDA graph replay (the
engine decodes inside CUDA graphs, so launch cost on the host is not kernel time); the sparse
kernel's eager time (two Triton launches from Python) is reported too. Full SDPA is the faster
of two formulations (enable_gqa with one query row, or the G query heads of a KV head as G
query rows). Prints a table, writes JSON.
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
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kernels.scoring import block_scores_triton  # noqa: E402
from kernels.sparse_attention import default_num_splits, sparse_decode_attention_triton  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 64
DT = torch.bfloat16
BYTES_PER_TOKEN = HKV * D * 2 * 2          # K and V of one token, one layer, bf16
FULL_KV_LIMIT = 64 << 30                   # skip full-context SDPA above this many KV bytes
GATHER_LIMIT = 40 << 30                    # skip gather-then-SDPA above this many gathered bytes
SWEEP_AT = {(32768, 1, 0.05), (524288, 1, 0.135), (131072, 32, 0.10), (1048576, 8, 0.10)}
DEV = "cuda"


def bench(fn, rep=60):
    return do_bench(fn, warmup=15, rep=rep, return_mode="median")


GRAPH_FAILURES = []                       # (what, error) where graph capture failed: timed eagerly


def graph_bench(fn, rep=60, what=""):
    """Median time of a CUDA-graph replay of fn (warmed up first, outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # a baseline that cannot be captured is timed eagerly, and said so
        GRAPH_FAILURES.append((what, repr(e)[:200]))
        torch.cuda.synchronize()
        return bench(fn, rep)
    ms = bench(graph.replay, rep)
    del graph
    torch.cuda.empty_cache()
    return ms


def copy_bandwidth():
    """Device-to-device copy of 2 GiB, bytes read + written per second."""
    n = 1 << 30
    src = torch.randn(n, dtype=DT, device=DEV)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * n * 2 / (ms * 1e-3)


def sdpa_grouped(q, k, v, scale):
    """Decode GQA as SDPA: the G query heads of a KV head become G query rows. q [N, Hq, D]."""
    n = q.shape[0]
    qg = q.view(n, HKV, HQ // HKV, D)                                   # [N, Hkv, G, D]
    return F.scaled_dot_product_attention(qg, k, v, scale=scale).reshape(n, HQ, D)


def sdpa_gqa(q, k, v, scale):
    """Decode GQA as SDPA with enable_gqa: one query row per head. k, v [N, Hkv, T, D]."""
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, scale=scale, enable_gqa=True)
    return out[:, :, 0]


SDPA = {"gqa": sdpa_gqa, "grouped": sdpa_grouped}


def run_config(ctx, batch, fracs, copy_bw, rows, sweep, sweep_at=SWEEP_AT):
    scale = D ** -0.5
    q = torch.randn(batch, HQ, D, dtype=DT, device=DEV)
    full_bytes = ctx * batch * BYTES_PER_TOKEN
    full_ms, full_by, sdpa = None, {}, sdpa_gqa
    if full_bytes <= FULL_KV_LIMIT:
        k = torch.randn(batch, HKV, ctx, D, dtype=DT, device=DEV)
        v = torch.randn_like(k)
        for name, fn in SDPA.items():
            try:
                full_by[name] = graph_bench(lambda: fn(q, k, v, scale), what=f"sdpa {name}")
            except Exception as e:  # a formulation this torch cannot run
                GRAPH_FAILURES.append((f"sdpa {name} eager", repr(e)[:200]))
        best = min(full_by, key=full_by.get)
        full_ms, sdpa = full_by[best], SDPA[best]
        del k, v
        torch.cuda.empty_cache()

    max_blocks = math.ceil(ctx * max(fracs) / BLOCK)
    n_slots = batch * max_blocks
    pool = torch.randn(1, 2, n_slots, HKV, BLOCK, D, dtype=DT, device=DEV)   # [L, 2, S, Hkv, B, D]
    k_cache, v_cache = pool[0, 0], pool[0, 1]
    perm = torch.randperm(n_slots, device=DEV).int().view(batch, max_blocks)
    for frac in fracs:
        n_blocks = math.ceil(ctx * frac / BLOCK)
        last = 37                                                       # partial tail block
        table = perm[:, :n_blocks].contiguous()
        nb = torch.full((batch,), n_blocks, dtype=torch.int32, device=DEV)
        ll = torch.full((batch,), last, dtype=torch.int32, device=DEV)
        n_tok = (n_blocks - 1) * BLOCK + last
        read = batch * n_tok * BYTES_PER_TOKEN

        def sparse(**kw):
            return sparse_decode_attention_triton(q, k_cache, v_cache, table, nb, ll, scale, **kw)

        def gather_sdpa():
            idx = table.long()
            kg = k_cache[idx].permute(0, 2, 1, 3, 4).reshape(batch, HKV, n_blocks * BLOCK, D)
            vg = v_cache[idx].permute(0, 2, 1, 3, 4).reshape(batch, HKV, n_blocks * BLOCK, D)
            return sdpa(q, kg[:, :, :n_tok], vg[:, :, :n_tok], scale)

        err = None
        if batch * n_blocks * BLOCK * BYTES_PER_TOKEN <= GATHER_LIMIT:
            ref = gather_sdpa().float()
            err = ((sparse().float() - ref).norm() / ref.norm()).item()
            gather_ms = graph_bench(gather_sdpa, what="gather+sdpa")
        else:
            gather_ms = None
        sparse_ms = graph_bench(sparse, what="sparse")
        eager_ms = bench(sparse)
        floor_ms = read / copy_bw * 1e3
        row = dict(context=ctx, batch=batch, resident=frac, blocks_per_seq=n_blocks,
                   bytes_read=read, sparse_ms=sparse_ms, sparse_eager_ms=eager_ms, gbps=read / sparse_ms / 1e6,
                   frac_of_copy_bw=read / (sparse_ms * 1e-3) / copy_bw, over_floor=sparse_ms / floor_ms,
                   full_sdpa_ms=full_ms, full_sdpa_by_form=full_by, speedup_vs_full=full_ms / sparse_ms if full_ms else None,
                   gather_sdpa_ms=gather_ms,
                   speedup_vs_gather=gather_ms / sparse_ms if gather_ms else None,
                   rel_err_vs_gather_sdpa=err,
                   num_splits=default_num_splits(batch, HKV, q.device))
        rows.append(row)
        if sweep and (ctx, batch, frac) in sweep_at:
            row["sweep"] = sweep_config(sparse, batch, q.device)
    del pool
    torch.cuda.empty_cache()


def sweep_config(sparse, batch, device):
    """Times of other tuning knobs for one config: {"splits/warps/stages": ms}."""
    base = default_num_splits(batch, HKV, device)
    out = {}
    for splits in sorted({max(1, base * f // 8) for f in (1, 2, 3, 4, 6, 8, 16)}):
        for warps in (4, 8):
            for stages in (1, 2, 3):
                try:
                    out[f"{splits}/{warps}/{stages}"] = graph_bench(
                        lambda: sparse(num_splits=splits, num_warps=warps, num_stages=stages), rep=30)
                except Exception as e:  # e.g. out of shared memory
                    out[f"{splits}/{warps}/{stages}"] = repr(e)[:80]
    return out


def scores_bench(ctx, copy_bw, window, sweep):
    n_rows = ctx // BLOCK
    kmin, kmax, kmean = (torch.randn(n_rows, HKV, D, dtype=DT, device=DEV) for _ in range(3))
    q = torch.randn(1, window, HQ, D, dtype=DT, device=DEV)
    table = torch.arange(n_rows, dtype=torch.int32, device=DEV)[None]
    nb = torch.tensor([n_rows], dtype=torch.int32, device=DEV)
    read = 3 * n_rows * HKV * D * 2
    ms = graph_bench(lambda: block_scores_triton(q, kmin, kmax, kmean, table, nb))
    eager_ms = bench(lambda: block_scores_triton(q, kmin, kmax, kmean, table, nb))
    row = dict(context=ctx, window=window, rows=n_rows, bytes_read=read, ms=ms, eager_ms=eager_ms,
               gbps=read / ms / 1e6, over_floor=ms / (read / copy_bw * 1e3))
    if sweep:
        row["sweep"] = {f"{bm}/{w}": graph_bench(lambda: block_scores_triton(
            q, kmin, kmax, kmean, table, nb, block_m=bm, num_warps=w), rep=30)
            for bm in (32, 64, 128) for w in (4, 8)}
    return row


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_out = os.path.join(os.environ.get("OUT", "out"), "kernels_bench.json")
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--contexts", default="32768,131072,524288,1048576")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--fracs", default="0.05,0.10,0.135")
    ap.add_argument("--sweep", action="store_true", help="also time other split/warp/stage choices")
    ap.add_argument("--sweep-at", default=None, help="the configs swept, as ctx:batch:frac,... "
                    "(default: " + ",".join(f"{c}:{b}:{f}" for c, b, f in sorted(SWEEP_AT)) + ")")
    args = ap.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    fracs = [float(x) for x in args.fracs.split(",")]
    sweep_at = SWEEP_AT if args.sweep_at is None else {
        (int(c), int(b), float(f)) for c, b, f in (x.split(":") for x in args.sweep_at.split(","))}

    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    rows = []
    for ctx in contexts:
        for batch in batches:
            try:
                run_config(ctx, batch, fracs, copy_bw, rows, args.sweep, sweep_at)
            except torch.OutOfMemoryError as e:
                rows.append(dict(context=ctx, batch=batch, error=repr(e)[:200]))
                torch.cuda.empty_cache()
    scores = [scores_bench(1 << 20, copy_bw, 1, args.sweep), scores_bench(1 << 20, copy_bw, 4, False)]

    result = dict(
        date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        command=" ".join(sys.argv), shapes=dict(hq=HQ, hkv=HKV, d=D, block=BLOCK, dtype="bf16"),
        copy_bw_gbps=copy_bw / 1e9, attention=rows, block_scores=scores,
        graph_capture_failures=GRAPH_FAILURES)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    print(f"{result['gpu']}  torch {result['torch']}  triton {result['triton']}  "
          f"copy {copy_bw / 1e9:.0f} GB/s (read+write)")
    print(f"{'ctx':>8} {'batch':>5} {'res':>6} {'blk/seq':>7} {'MB read':>8} {'sparse ms':>9} {'eager':>7} "
          f"{'GB/s':>6} {'%copy':>6} {'xfloor':>6} {'full ms':>8} {'vs full':>7} {'gath ms':>8} "
          f"{'vs gath':>7} {'err':>8}")
    for r in rows:
        if r.get("full_sdpa_by_form"):
            print(f"full SDPA ctx {r['context']} batch {r['batch']}: "
                  + " ".join(f"{k} {v:.4f} ms" for k, v in r["full_sdpa_by_form"].items()))
            break
    for r in rows:
        if "error" in r:
            print(f"{r['context']:>8} {r['batch']:>5} error {r['error']}")
            continue
        print(f"{r['context']:>8} {r['batch']:>5} {r['resident']:>6.3f} {r['blocks_per_seq']:>7} "
              f"{r['bytes_read'] / 1e6:>8.1f} {r['sparse_ms']:>9.4f} {r['sparse_eager_ms']:>7.4f} {r['gbps']:>6.0f} "
              f"{100 * r['frac_of_copy_bw']:>5.0f}% {r['over_floor']:>6.2f} {fmt(r['full_sdpa_ms'], '8.4f')} "
              f"{fmt(r['speedup_vs_full'], '7.1f')} {fmt(r['gather_sdpa_ms'], '8.4f')} "
              f"{fmt(r['speedup_vs_gather'], '7.1f')} {fmt(r['rel_err_vs_gather_sdpa'], '8.1e')}")
    for s in scores:
        print(f"block_scores ctx {s['context']} window {s['window']}: {s['rows']} rows x {HKV} heads, "
              f"{s['ms'] * 1e3:.1f} us (eager {s['eager_ms'] * 1e3:.1f} us), {s['gbps']:.0f} GB/s, "
              f"x{s['over_floor']:.2f} floor")
    if args.sweep:
        for r in rows:
            if "sweep" in r:
                best = min((v, k) for k, v in r["sweep"].items() if isinstance(v, float))
                print(f"sweep ctx {r['context']} b {r['batch']} res {r['resident']}: default "
                      f"{r['sparse_ms']:.4f} (splits {r['num_splits']}), best {best[0]:.4f} at {best[1]}")
        s = scores[0]["sweep"]
        print("sweep block_scores:", " ".join(f"{k}:{v * 1e3:.1f}us" for k, v in s.items()))
    for what, err in GRAPH_FAILURES[:5]:
        print("timed eagerly (graph capture failed):", what, err)
    print("json:", args.out)


if __name__ == "__main__":
    main()
