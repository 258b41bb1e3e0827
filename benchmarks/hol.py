"""``lsa bench hol``: head-of-line blocking. How long does a short request wait for its first
token while another request's long prompt is being prefilled?

Against one app (started from key=value arguments, or ``--url``), streamed ``/v1/completions``
of token ids (drawn with a fixed seed, each prompt its own: no prefix reuse), EOS ignored:

1. long alone: one prompt of ``--long`` tokens, one token out: its prefill time (TTFT);
2. idle: ``--shorts`` short requests (``--short-tokens`` in, ``--short-max-tokens`` out) sent
   one every 1/``--rate`` s on the idle server: each one's TTFT, the baseline;
3. behind: another long prompt, and ``--delay-s`` later the same short requests at the same
   rate: each short's TTFT, and whether it was sent before the long's first token (behind
   the prefill; only those count), and the long's prefill time in company.

``--rate auto`` spreads the shorts over 80% of the long's prefill time alone. Reported: p50,
p99 and max TTFT of the shorts idle and behind the prefill, and the long's prefill time alone
and with the shorts (what interleaving costs it). Issue 11 asks for the p99 behind a 32K
prefill; without chunked prefill interleaved with decode a short waits for the whole prefill.

    lsa bench hol model=/tmp/tiny-40k kv_store_bytes=1073741824 --long 32768 --out hol.json
    lsa bench hol --url http://127.0.0.1:8000 --long 32768 --shorts 50 --rate 2
"""
from __future__ import annotations

import argparse
import random
import threading
import time

from benchmarks.serve import percentiles


def prompt(n: int, salt: int, vocab: tuple[int, int], seed: int) -> list[int]:
    rng = random.Random(seed * 1_000_003 + salt)
    return [rng.randrange(*vocab) for _ in range(n)]


def streamed(client, ids: list[int], max_tokens: int) -> dict:
    """One streamed completion: when it was sent, its TTFT (the first chunk) and total time."""
    sent = time.perf_counter()
    first = None
    body = {"prompt": ids, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    for event in client.stream("/v1/completions", body):
        if first is None and event.get("choices"):
            first = time.perf_counter()
    done = time.perf_counter()
    return {"sent": sent, "ttft_s": (first or done) - sent, "seconds": done - sent}


def shorts_at_rate(client, prompts: list[list[int]], max_tokens: int, rate: float, start: float) -> list[dict]:
    """The short requests, the k-th sent at ``start + k / rate`` (open loop), each in a thread."""
    out: list[dict | None] = [None] * len(prompts)

    def one(k: int) -> None:
        out[k] = streamed(client, prompts[k], max_tokens)

    threads = []
    for k in range(len(prompts)):
        time.sleep(max(0.0, start + k / rate - time.perf_counter()))
        threads.append(threading.Thread(target=one, args=(k,)))
        threads[-1].start()
    for t in threads:
        t.join()
    return out


def run_phases(url: str, args, vocab: tuple[int, int]) -> dict:
    from cluster.client import LSAClient

    client = LSAClient(url, api_key=args.api_key, timeout_s=3600, max_retries=0)
    ids = lambda n, salt: prompt(n, salt, vocab, args.seed)  # noqa: E731
    streamed(client, ids(args.short_tokens, 1), args.short_max_tokens)  # warm-up
    alone = streamed(client, ids(args.long, 2), 1)
    print(f"[hol] long alone: {args.long} tokens prefilled in {alone['ttft_s']:.2f} s", flush=True)
    rate = args.shorts / (0.8 * alone["ttft_s"]) if args.rate == "auto" else float(args.rate)
    idle = shorts_at_rate(client, [ids(args.short_tokens, 100 + k) for k in range(args.shorts)],
                          args.short_max_tokens, rate, time.perf_counter())
    print(f"[hol] idle: {args.shorts} shorts at {rate:.2f}/s, TTFT p99 "
          f"{percentiles([s['ttft_s'] for s in idle])['p99_ms']:.0f} ms", flush=True)
    long_out: dict = {}
    long_thread = threading.Thread(target=lambda: long_out.update(streamed(client, ids(args.long, 3), 1)))
    long_thread.start()
    time.sleep(0.05)
    behind = shorts_at_rate(client, [ids(args.short_tokens, 1000 + k) for k in range(args.shorts)],
                            args.short_max_tokens, rate, time.perf_counter() + args.delay_s)
    long_thread.join()
    long_first = long_out["sent"] + long_out["ttft_s"]
    for s in behind:
        s["behind_prefill"] = s["sent"] < long_first
    origin = long_out["sent"]
    for s in [alone, long_out, *idle, *behind]:
        s["sent"] -= origin  # seconds from the second long request's start
    return {"rate": rate, "long_alone": alone, "long_with_shorts": long_out, "idle": idle, "behind": behind}


def summarize(phases: dict) -> dict:
    behind = [s["ttft_s"] for s in phases["behind"] if s["behind_prefill"]]
    idle = [s["ttft_s"] for s in phases["idle"]]
    out = {"idle_ttft": percentiles(idle), "behind_ttft": percentiles(behind),
           "behind_count": len(behind), "after_prefill_count": len(phases["behind"]) - len(behind),
           "long_alone_prefill_s": phases["long_alone"]["ttft_s"],
           "long_with_shorts_prefill_s": phases["long_with_shorts"]["ttft_s"]}
    if behind:
        out["p99_ratio"] = out["behind_ttft"]["p99_ms"] / out["idle_ttft"]["p99_ms"]
        out["p99_over_long_prefill"] = out["behind_ttft"]["p99_ms"] / 1e3 / out["long_alone_prefill_s"]
    return out


def print_table(report: dict) -> None:
    phases, s = report["phases"], report["summary"]
    print("| short | sent s | idle TTFT ms | behind TTFT ms | behind the prefill |")
    print("|---:|---:|---:|---:|---|")
    for k, (idle, behind) in enumerate(zip(phases["idle"], phases["behind"])):
        print(f"| {k} | {behind['sent']:.2f} | {1e3 * idle['ttft_s']:.0f} | {1e3 * behind['ttft_s']:.0f} | "
              f"{'yes' if behind['behind_prefill'] else 'no'} |")

    def row(p: dict) -> str:
        return f"p50 {p.get('median_ms', 0):.0f} ms, p99 {p.get('p99_ms', 0):.0f} ms, max {p.get('max_ms', 0):.0f} ms"

    print(f"shorts idle ({s['idle_ttft']['n']}): {row(s['idle_ttft'])}")
    print(f"shorts behind a {report['long']}-token prefill ({s['behind_count']}; {s['after_prefill_count']} sent after "
          f"it): {row(s['behind_ttft'])}")
    print(f"long prefill: alone {s['long_alone_prefill_s']:.2f} s, with the shorts "
          f"{s['long_with_shorts_prefill_s']:.2f} s")
    if "p99_ratio" in s:
        print(f"p99 behind / idle: {s['p99_ratio']:.2f}; p99 behind / the long's prefill: "
              f"{s['p99_over_long_prefill']:.3f}")


def run_bench(args) -> int:
    from benchmarks import served
    from engine.errors import InvalidRequestError

    app_args = served.app_args(args)
    if args.long < 1 or args.shorts < 1 or args.short_tokens < 1 or args.short_max_tokens < 1:
        raise InvalidRequestError("--long, --shorts, --short-tokens and --short-max-tokens must be positive")
    if args.rate != "auto" and float(args.rate) <= 0:
        raise InvalidRequestError("--rate must be positive or auto")
    vocab = (4, args.vocab)
    t0 = time.perf_counter()
    with served.app_url(args, app_args) as url:
        phases = run_phases(url, args, vocab)
    report = {"app_args": app_args, "url": args.url, "long": args.long, "shorts": args.shorts,
              "short_tokens": args.short_tokens, "short_max_tokens": args.short_max_tokens, "delay_s": args.delay_s,
              "seed": args.seed, "phases": phases, "summary": summarize(phases), "seconds": time.perf_counter() - t0}
    return served.finish(report, args.out, print_table)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks import served

    served.add_arguments(p)
    p.add_argument("--api-key", default=None, help="the app's API key, if it has keys")
    p.add_argument("--long", type=int, default=32768, help="tokens of the long prompt")
    p.add_argument("--shorts", type=int, default=30, help="short requests, idle and behind the prefill each")
    p.add_argument("--short-tokens", type=int, default=30, help="tokens of a short prompt")
    p.add_argument("--short-max-tokens", type=int, default=4, help="tokens of a short answer")
    p.add_argument("--rate", default="auto", help="short requests a second (auto: over 80%% of the long's prefill)")
    p.add_argument("--delay-s", type=float, default=0.5, help="after the long request, the first short one")
    p.add_argument("--vocab", type=int, default=260, help="token ids are drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON report")


if __name__ == "__main__":
    from benchmarks.commands import main

    raise SystemExit(main("hol"))
