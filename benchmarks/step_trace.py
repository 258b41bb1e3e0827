"""Summarize the batch timing logs a worker writes with ``LSA_STEP_TRACE=DIR`` (engine/trace.py).

    python -m benchmarks.step_trace DIR [--gap 0.5] [--turns] [--out summary.json]

Per log (a worker process), the batches are cut into bursts wherever the worker sat idle for
``--gap`` seconds (a turn, or turns run together); per burst: its wall time, the time inside
batches (prefill and decode, host side), what lies between batches (the loop's own work, waiting
for commands), and the batch counts. Served and engine-alone logs of one ``lsa bench serve`` run
list their bursts in the same order, so a turn's time can be compared where it is spent. ``--turns``:
a line per prefilled sequence (a turn, a session's creation): its segments and their host times.
Per burst, the decode steps' median, p99 and max, those that ran an LSA cycle boundary apart from
the others (where an ITL tail comes from), and the cadence at the burst's largest batch (start to
start of consecutive decode batches: the inter-token gap the worker produces, before the stream),
each decode step split into its host parts (plan applied, launch, the policy's work after the launch,
the rest: the device wait and sampling) where the log has them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def bursts(rows: list, gap: float, collections: list = ()) -> list[dict]:
    """``rows``: the batches; ``collections``: the garbage collections, counted in the burst they fall in."""
    out, cur = [], []
    for row in rows:
        if cur and row[0] - (cur[-1][0] + cur[-1][3]) > gap:
            out.append(cur)
            cur = []
        cur.append(row)
    if cur:
        out.append(cur)
    summary = []
    for b in out:
        wall = b[-1][0] + b[-1][3] - b[0][0]
        inside_gc = [r for r in collections if b[0][0] <= r[0] <= b[-1][0] + b[-1][3]]
        prefill = [r for r in b if r[1] == "prefill"]
        decode = [r for r in b if r[1] == "decode"]
        inside = sum(r[3] for r in b)
        summary.append({"start": b[0][0], "wall_s": wall, "prefill_s": sum(r[3] for r in prefill),
                        "decode_s": sum(r[3] for r in decode), "between_s": wall - inside,
                        "prefill_batches": len(prefill), "decode_batches": len(decode),
                        "max_decode_batch": max((r[2] for r in decode), default=0),
                        "gc_s": sum(r[3] for r in inside_gc), "gc_max_s": max((r[3] for r in inside_gc), default=0),
                        **decode_steps(decode), "cadence": cadence(b)})
    return summary


def cadence(burst: list) -> dict:
    """The token cadence where every sequence of the burst decodes: between consecutive decode
    batches of the burst's largest batch with nothing else between them, the time from one
    batch's start to the next (what a client's inter-token gap is at best) and the part of it
    outside the batches (the loop's own work), ms: median, p99, max; the five slowest periods
    with their step's time, the time outside it, whether the step ran a cycle boundary and its
    host parts (``host_parts``)."""
    decode = [r for r in burst if r[1] == "decode"]
    if not decode:
        return {"n": 0}
    full = max(r[2] for r in decode)
    period, idle, pairs = [], [], []
    for a, b in zip(burst, burst[1:]):
        if a[1] == b[1] == "decode" and a[2] == b[2] == full:
            period.append(b[0] - a[0])
            idle.append(b[0] - (a[0] + a[3]))
            pairs.append((b[0] - a[0], a))
    slowest = [{"period_ms": 1e3 * p, "step_ms": 1e3 * a[3], "outside_ms": 1e3 * (p - a[3]),
                "boundary": int(ran_boundary(a)), **host_parts(a)}
               for p, a in sorted(pairs, key=lambda x: -x[0])[:5]]
    return {"n": len(period), "batch": full, "period": pct(period), "outside": pct(idle), "slowest": slowest}


def ran_boundary(row: list) -> bool:
    """A decode row's fifth field: it ran an LSA cycle boundary (older logs have none)."""
    return len(row) > 4 and bool(row[4])


def host_parts(row: list) -> dict:
    """A decode row's host parts in ms (logs that have them): the plan applied before the launch,
    the launch, the policy's work after it, and the rest (waiting for the device, sampling)."""
    if len(row) < 8:
        return {}
    before, launch, after = row[5:8]
    return {"before_ms": 1e3 * before, "launch_ms": 1e3 * launch, "after_ms": 1e3 * after,
            "rest_ms": 1e3 * (row[3] - before - launch - after)}


def pct(values: list[float]) -> dict:
    """Seconds -> their count and median, p99 and max in ms."""
    if not values:
        return {"n": 0}
    v = sorted(values)
    return {"n": len(v), "median_ms": 1e3 * v[len(v) // 2], "p99_ms": 1e3 * v[min(len(v) - 1, int(0.99 * len(v)))],
            "max_ms": 1e3 * v[-1]}


def decode_steps(decode: list) -> dict:
    """A burst's decode batches, ms: median, p99 and max of all, and of those that ran an LSA cycle
    boundary (a row's fifth field; logs without it count none) against those that did not."""
    at = [r for r in decode if ran_boundary(r)]
    rest = [r for r in decode if not ran_boundary(r)]
    return {"decode_steps": pct([r[3] for r in decode]),
            "boundary_steps": {**pct([r[3] for r in at]), **median_parts(at)},
            "other_steps": {**pct([r[3] for r in rest]), **median_parts(rest)}}


def median_parts(rows: list) -> dict:
    """The median of each host part (``host_parts``) over decode rows that have them, in ms."""
    parts = [host_parts(r) for r in rows if len(r) >= 8]
    return {f"median_{k}": sorted(p[k] for p in parts)[len(parts) // 2] for k in parts[0]} if parts else {}


def turns(rows: list, marks: dict | None = None) -> list[dict]:
    """Per sequence that prefilled: its segments, the wall time from its first segment to the end of
    the next batch after its last (the one that samples its first token, or its own last segment),
    the host time inside its segments, every segment's (start offset, host time) in ms, and from
    the worker's marks (``marks``: (kind, seq_id) -> time) the time from "queued" to its first
    segment and from its last segment's end to "first_token" (-1: not marked)."""
    marks = marks or {}
    out = []
    by_seq: dict[int, list] = {}
    for row in rows:
        if row[1] == "prefill":
            by_seq.setdefault(row[2][0], []).append(row)
    for seq_id, segs in by_seq.items():
        start, last_end = segs[0][0], segs[-1][0] + segs[-1][3]
        after = next((r for r in rows if r[0] >= last_end - 1e-6 and r is not segs[-1]), None)
        end = last_end if after is None or after[0] - last_end > 0.05 else after[0] + after[3]
        out.append({"seq": seq_id, "tokens": max(r[2][1] for r in segs), "segments": len(segs),
                    "wall_ms": round((end - start) * 1e3, 1), "host_ms": round(sum(r[3] for r in segs) * 1e3, 1),
                    "detail": [(round((r[0] - start) * 1e3, 1), round(r[3] * 1e3, 1)) for r in segs],
                    "queued_ms": round((start - marks[("queued", seq_id)]) * 1e3, 1)
                    if ("queued", seq_id) in marks else -1.0,
                    "first_token_ms": round((marks[("first_token", seq_id)] - last_end) * 1e3, 1)
                    if ("first_token", seq_id) in marks else -1.0})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--gap", type=float, default=0.5)
    p.add_argument("--turns", action="store_true", help="a line per prefilled sequence (its segments)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    report = {}
    for path in sorted(Path(args.folder).glob("steps-*.jsonl")):
        rows = sorted(json.loads(line) for line in path.read_text().splitlines() if line.strip())
        collections = [r for r in rows if r[1] == "gc"]
        marks = {(r[1], r[2]): r[0] for r in rows if r[1] in ("queued", "first_token")}
        other = [r for r in rows if r[1] not in ("gc", "queued", "first_token", "prefill", "decode")]
        rows = [r for r in rows if r[1] in ("prefill", "decode")]
        report[path.name] = bursts(rows, args.gap, collections)
        print(f"\n{path.name}: {len(rows)} batches")
        print(f"{'burst':>5} {'wall ms':>9} {'prefill ms':>10} {'decode ms':>10} {'between ms':>10} "
              f"{'prefills':>8} {'decodes':>8} {'batch':>5} {'gc ms':>7} {'gc max':>7}")
        for i, b in enumerate(report[path.name]):
            print(f"{i:5d} {b['wall_s'] * 1e3:9.1f} {b['prefill_s'] * 1e3:10.1f} {b['decode_s'] * 1e3:10.1f} "
                  f"{b['between_s'] * 1e3:10.1f} {b['prefill_batches']:8d} {b['decode_batches']:8d} "
                  f"{b['max_decode_batch']:5d} {b['gc_s'] * 1e3:7.1f} {b['gc_max_s'] * 1e3:7.1f}")
        for i, b in enumerate(report[path.name]):  # decode steps: boundaries against the rest
            parts = [f"{name} n={p['n']} median {p['median_ms']:.2f} p99 {p['p99_ms']:.2f} max {p['max_ms']:.2f} ms"
                     + (f" (host before / launch / after / rest medians {p['median_before_ms']:.2f} / "
                        f"{p['median_launch_ms']:.2f} / {p['median_after_ms']:.2f} / {p['median_rest_ms']:.2f})"
                        if "median_before_ms" in p else "")
                     for name in ("boundary_steps", "other_steps") for p in [b[name]] if p["n"]]
            if parts:
                print(f"  burst {i} decode steps: " + "; ".join(parts))
            c = b["cadence"]
            if c["n"]:
                print(f"  burst {i} cadence at batch {c['batch']} (n={c['n']}): start to start median "
                      f"{c['period']['median_ms']:.2f} p99 {c['period']['p99_ms']:.2f} max {c['period']['max_ms']:.2f} ms; "
                      f"outside the batches median {c['outside']['median_ms']:.2f} p99 {c['outside']['p99_ms']:.2f} ms")
                print("    slowest (period, its step, outside, boundary; step's host before / launch / after / rest): "
                      + ", ".join(f"({x['period_ms']:.2f}, {x['step_ms']:.2f}, {x['outside_ms']:.2f}, {x['boundary']}"
                                  + (f"; {x['before_ms']:.2f} / {x['launch_ms']:.2f} / {x['after_ms']:.2f} / "
                                     f"{x['rest_ms']:.2f}" if "before_ms" in x else "") + ")" for x in c["slowest"]))
        if args.turns:
            report[path.name + ":turns"] = found = turns(rows, marks)
            print(f"{'seq':>5} {'tokens':>8} {'segments':>8} {'wall ms':>9} {'host ms':>9} {'queued>':>8} "
                  f"{'>first':>7}  segments (start, host ms) > 10 ms")
            for t in found:
                slow = [d for d in t["detail"] if d[1] > 10]
                print(f"{t['seq']:5d} {t['tokens']:8d} {t['segments']:8d} {t['wall_ms']:9.1f} {t['host_ms']:9.1f} "
                      f"{t['queued_ms']:8.1f} {t['first_token_ms']:7.1f}  {slow[:8]}")
            slow = sorted(other, key=lambda r: -r[3])[:12]
            report[path.name + ":host_work"] = slow
            print("slowest host work around the batches (kind, what, ms):",
                  [(r[1], r[2], round(r[3] * 1e3, 1)) for r in slow])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
