"""Summarize the batch timing logs a worker writes with ``LSA_STEP_TRACE=DIR`` (engine/trace.py).

    python -m benchmarks.step_trace DIR [--gap 0.5] [--out summary.json]

Per log (a worker process), the batches are cut into bursts wherever the worker sat idle for
``--gap`` seconds (a turn, or turns run together); per burst: its wall time, the time inside
batches (prefill and decode, host side), what lies between batches (the loop's own work, waiting
for commands), and the batch counts. Served and engine-alone logs of one ``lsa bench serve`` run
list their bursts in the same order, so a turn's time can be compared where it is spent.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def bursts(rows: list, gap: float) -> list[dict]:
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
        prefill = [r for r in b if r[1] == "prefill"]
        decode = [r for r in b if r[1] == "decode"]
        inside = sum(r[3] for r in b)
        summary.append({"start": b[0][0], "wall_s": wall, "prefill_s": sum(r[3] for r in prefill),
                        "decode_s": sum(r[3] for r in decode), "between_s": wall - inside,
                        "prefill_batches": len(prefill), "decode_batches": len(decode),
                        "max_decode_batch": max((r[2] for r in decode), default=0)})
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--gap", type=float, default=0.5)
    p.add_argument("--out")
    args = p.parse_args(argv)
    report = {}
    for path in sorted(Path(args.folder).glob("steps-*.jsonl")):
        rows = sorted(json.loads(line) for line in path.read_text().splitlines() if line.strip())
        report[path.name] = bursts(rows, args.gap)
        print(f"\n{path.name}: {len(rows)} batches")
        print(f"{'burst':>5} {'wall ms':>9} {'prefill ms':>10} {'decode ms':>10} {'between ms':>10} "
              f"{'prefills':>8} {'decodes':>8} {'batch':>5}")
        for i, b in enumerate(report[path.name]):
            print(f"{i:5d} {b['wall_s'] * 1e3:9.1f} {b['prefill_s'] * 1e3:10.1f} {b['decode_s'] * 1e3:10.1f} "
                  f"{b['between_s'] * 1e3:10.1f} {b['prefill_batches']:8d} {b['decode_batches']:8d} "
                  f"{b['max_decode_batch']:5d}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
