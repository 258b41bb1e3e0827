"""A cached turn's prefix loads on one GPU: one layer of every prefix block, host mirror -> device,
for every layer (what ``engine/layerwise.py`` does for a session turn or a reused prefix), with a
copy per block (as before issue 15) and with one 2-D DMA copy per run of consecutive blocks
(``engine/host_copy.py``); the time the host spends issuing the copies and the time until they
have landed, and a check that both give the same bytes.

    python -m benchmarks.prefix_load [--out PATH]

Shapes: SmolLM2-135M at 6K tokens in blocks of 16 (``lsa bench chat``'s GPU runs), Llama-3-8B at
64K tokens in bf16 and at 128K in FP8, blocks of 64; the blocks consecutive (as a session's
leased ids mostly are) and shuffled (every run one block long: the worst case).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

CASES = {  # name: (rows in the arena, layers, KV heads, block size, head dim, prefix blocks, host dtype)
    "smollm2-135m 6K b16": (400, 30, 3, 16, 64, 375, torch.bfloat16),
    "llama3-8b 64K b64 bf16": (1040, 32, 8, 64, 128, 1024, torch.bfloat16),
    "llama3-8b 128K b64 fp8": (2060, 32, 8, 64, 128, 2048, torch.float8_e4m3fn),
}


def per_block(dense: torch.Tensor, table: torch.Tensor, rows: list[int]) -> None:
    for i, r in enumerate(rows):
        dense[i].copy_(table[r], non_blocking=True)


def time_layers(copy, host: torch.Tensor, rows: list[int]) -> tuple[float, float, torch.Tensor]:
    """(seconds issuing, seconds until landed, the last layer's copy) of every layer's rows."""
    outs = [torch.empty((len(rows), *host.shape[2:]), dtype=host.dtype, device="cuda") for _ in range(2)]
    for _ in range(2):  # the second is timed
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for layer in range(host.shape[1]):
            copy(outs[layer % 2], host[:, layer], rows)
        issued = time.perf_counter() - t0
        torch.cuda.synchronize()
        landed = time.perf_counter() - t0
    return issued, landed, outs[(host.shape[1] - 1) % 2]


def main(argv: list[str] | None = None) -> int:
    from engine.host_copy import cuda_runtime, gather_rows
    from engine.host_memory import host_empty

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON report")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 1
    report = {"device": torch.cuda.get_device_name(), "runtime": str(cuda_runtime()), "cases": []}
    for name, (num_rows, layers, heads, block, dim, n, dtype) in CASES.items():
        host = host_empty((num_rows, layers, 2, heads, block, dim), dtype, True)
        raw = (64, *host.shape[1:-1], host.shape[-1] * host.element_size())  # finite values in either dtype
        fill = torch.empty(raw, dtype=torch.uint8, device="cuda").random_(0, 120).view(dtype)
        for a in range(0, num_rows, 64):
            host[a: a + 64].copy_(fill[: min(64, num_rows - a)])
        torch.cuda.synchronize()
        for order, rows in (("consecutive", list(range(7, 7 + n))),
                            ("shuffled", random.Random(0).sample(range(num_rows), n))):
            old_issue, old_done, old = time_layers(per_block, host, rows)
            new_issue, new_done, new = time_layers(gather_rows, host, rows)
            same = torch.equal(old.view(torch.uint8), new.view(torch.uint8))
            gb = n * layers * host[0, 0].numel() * host.element_size() / 1e9
            row = {"case": name, "order": order, "blocks": n, "layers": layers, "gb": gb, "equal": same,
                   "per_block_issue_ms": 1e3 * old_issue, "per_block_ms": 1e3 * old_done,
                   "runs_issue_ms": 1e3 * new_issue, "runs_ms": 1e3 * new_done}
            report["cases"].append(row)
            print(f"{name:>24} {order:>11}: {n} blocks x {layers} layers ({gb:.2f} GB): per block {old_done * 1e3:7.1f} ms "
                  f"(issued in {old_issue * 1e3:.1f}), 2-D runs {new_done * 1e3:7.1f} ms (issued in {new_issue * 1e3:.1f}, "
                  f"{gb / new_done:.0f} GB/s); same bytes: {same}", flush=True)
        del host, fill
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
