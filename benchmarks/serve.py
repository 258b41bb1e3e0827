"""``lsa bench serve``: the served system, and the same workload on the engine alone.

    lsa bench serve model=/tmp/llama3-8b-random device=cuda worker_num_gpus=1 policy=lsa host_dtype=fp8 \\
        prefill_chunk=8192 max_num_seqs=16 --contexts 32768 131072 --concurrency-context 131072 \\
        --sessions max --out serve.json
    lsa bench serve --url http://127.0.0.1:8000 --contexts 4096 --sessions 2 --concurrency-context 4096

The workload (token ids drawn with a fixed seed, the same on both sides):

* single: per context length L, one session of L tokens: TTFT = its creation (the prefill),
  prefill tokens/s; then ``--followups`` questions, each streamed: the turn's TTFT, its
  inter-token latencies (ITL, from the arrival times of the stream's events) and the tokens
  it prefilled (the rest came from the host KV store).
* concurrent: N sessions at the concurrency context, created one after the other (the single
  session of that length, if any, kept as the first: one prefill saved), then one
  question on each, all at once, streamed: aggregate tokens/s (tokens generated / wall time of
  the turns), and ITL median and p99 over all turns, also in steady state (after the last
  turn's first token, before the first turn ends: every turn decoding).

Served: over HTTP with the project's client, against a ``cluster:app`` this command starts
from its key=value arguments (as ``lsa serve`` takes them) and stops afterwards, or against
``--url``. ``--sessions max``: as many sessions as the node's host KV store holds (its
``kv_store_bytes`` over one session's blocks, one session's worth kept free for the turns).

Engine alone (with key=value arguments, after the app has released the GPU and host RAM):
the same workload on a ``DecodeWorkerCore`` over an in-process ``KVStoreCore``, the worker's
own code without Ray and HTTP; ITL from the same text callbacks the stream is made of. Its
concurrent sessions are one prefill and N-1 copies of its blocks in the arena (identical KV,
N-1 prefills saved). The ratio served / engine of aggregate tokens/s is the serving overhead.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from benchmarks import served


@dataclass
class Workload:
    contexts: list[int]
    followups: int
    concurrency_context: int
    sessions: int
    max_tokens: int
    question_tokens: int = 16
    vocab: tuple[int, int] = (4, 260)  # token ids are drawn from [lo, hi)
    seed: int = 0

    def ids(self, n: int, salt: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + salt)
        return torch.randint(self.vocab[0], self.vocab[1], (n,), generator=gen).tolist()

    def context(self, length: int) -> list[int]:
        return self.ids(length, length)

    def question(self, i: int) -> list[int]:
        return self.ids(self.question_tokens, 10_000 + i)


@dataclass
class Turn:
    """One streamed turn: when it was sent, when each piece arrived, what it reported."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    num_tokens: int = 0
    prefill_tokens: int = 0
    done: float = 0.0
    timings: dict = field(default_factory=dict)  # the answer's seconds per phase (ingress, admission, ...)

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.sent if self.arrivals else self.done - self.sent

    def gaps(self, lo: float = float("-inf"), hi: float = float("inf")) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:]) if a >= lo and b <= hi]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(values), "median_ms": 1e3 * statistics.median(ordered),
            "p99_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "max_ms": 1e3 * ordered[-1]}


def phase_medians(turns: list[Turn]) -> dict:
    """Median seconds of each phase the turns' answers report (where a turn's time went)."""
    phases = dict.fromkeys(p for t in turns for p in t.timings)
    return {p: statistics.median(t.timings[p] for t in turns if p in t.timings) for p in phases}


def concurrent_stats(turns: list[Turn]) -> dict:
    start, end = min(t.sent for t in turns), max(t.done for t in turns)
    steady_from = max(t.arrivals[0] for t in turns if t.arrivals)
    steady_to = min(t.done for t in turns)
    tokens = sum(t.num_tokens for t in turns)
    out = {"turns": len(turns), "tokens": tokens, "wall_s": end - start, "tokens_per_s": tokens / (end - start),
           "ttft": percentiles([t.ttft for t in turns]), "itl": percentiles([g for t in turns for g in t.gaps()]),
           "prefill_tokens": [t.prefill_tokens for t in turns], "phases_median_s": phase_medians(turns)}
    if steady_to > steady_from:
        pieces = sum(sum(1 for a in t.arrivals if steady_from <= a <= steady_to) for t in turns)
        out["steady"] = {"seconds": steady_to - steady_from, "pieces_per_s": pieces / (steady_to - steady_from),
                         "itl": percentiles([g for t in turns for g in t.gaps(steady_from, steady_to)])}
    return out


# ------------------------------------------------------------------ the two sides


class Served:
    """The workload's calls over HTTP."""

    def __init__(self, url: str):
        from cluster.client import LSAClient

        self.client = LSAClient(url, timeout_s=3600)

    def create(self, context_ids: list[int]) -> tuple[str, dict]:
        created = self.client.create_session(context_ids)
        return created["id"], {"server_prefill_s": created.get("prefill_s"), "prefill_tokens": created["prefill_tokens"]}

    def ask(self, session_id: str, question_ids: list[int], max_tokens: int) -> Turn:
        turn = Turn(time.perf_counter())
        for event in self.client.stream(f"/v1/sessions/{session_id}/ask",
                                        {"question": question_ids, "max_tokens": max_tokens, "ignore_eos": True}):
            now = time.perf_counter()
            if "num_tokens" in event:  # the last event: the whole answer
                turn.num_tokens, turn.prefill_tokens = event["num_tokens"], event["prefill_tokens"]
                turn.timings = event.get("timings") or {}
            elif event.get("text"):
                turn.arrivals.append(now)
        turn.done = time.perf_counter()
        return turn

    def clone(self, session_id: str, context_ids: list[int]) -> tuple[str, dict]:
        return self.create(context_ids)  # over HTTP a copy is a prefill

    def delete(self, session_id: str) -> None:
        self.client.delete_session(session_id)


class EngineAlone:
    """The workload's calls on a DecodeWorkerCore over an in-process KVStoreCore."""

    def __init__(self, serve_config, kv_dir: str):
        from actors.decode_worker import DecodeWorkerCore
        from actors.kv_store import KVStoreCore, arena_path
        from engine.factory import arena_layout, build_engine

        engine_config = serve_config.engine
        if serve_config.torch_threads:  # as the app's worker runs
            torch.set_num_threads(serve_config.torch_threads)
        if engine_config.device_name.startswith("cuda"):
            wait_for_free_gpu()  # the app's worker process may still be letting go of it
        layout = arena_layout(engine_config)
        self.store = KVStoreCore("bench", layout, serve_config.kv_store_bytes, arena_path("bench", "engine", kv_dir))
        self.core = DecodeWorkerCore.build(lambda arena: build_engine(engine_config, arena), self.store, "bench",
                                           pin=engine_config.device_name.startswith("cuda"))
        self.core.warm_up()
        self.count = 0

    def _name(self) -> str:
        self.count += 1
        return f"bench-{self.count}"

    def create(self, context_ids: list[int]) -> tuple[str, dict]:
        session_id = self._name()
        result = self.core.create_session(session_id, context_ids).result()
        return session_id, {"server_prefill_s": result.prefill_s, "prefill_tokens": result.prefill_tokens}

    def ask(self, session_id: str, question_ids: list[int], max_tokens: int) -> Turn:
        from engine.sampling import SamplingParams

        turn = Turn(time.perf_counter())
        seen = [0]

        def on_text(text: str, done: bool) -> None:
            if len(text) > seen[0] and not done:
                turn.arrivals.append(time.perf_counter())
                seen[0] = len(text)

        result = self.core.ask(session_id, question_ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                               on_text=on_text).result()
        turn.done = time.perf_counter()
        turn.num_tokens, turn.prefill_tokens = len(result.token_ids), result.prefill_tokens
        turn.timings = dict(getattr(result, "timings", None) or {})
        return turn

    def clone(self, session_id: str, context_ids: list[int]) -> tuple[str, dict]:
        """A new session holding a copy of ``session_id``'s blocks (no prefill)."""
        view = self.store.view(session_id)
        ids = self.store.lease("bench", len(view.host_ids))
        self.store.arena.copy(view.host_ids, ids)
        clone_id = self._name()
        self.store.put("bench", clone_id, view.context_ids, ids)
        return clone_id, {"copied_from": session_id}

    def delete(self, session_id: str) -> None:
        self.core.delete_session(session_id).result()

    def close(self) -> None:
        self.core.close()
        import os

        os.unlink(self.store.path)


def wait_for_free_gpu(seconds: int = 60, fraction: float = 0.9) -> None:
    for _ in range(seconds):
        free, total = torch.cuda.mem_get_info()
        if free >= fraction * total:
            return
        time.sleep(1)


def run_workload(side, w: Workload, label: str) -> dict:
    out: dict = {"single": [], "label": label}
    kept = None  # the single session at the concurrency context, the first of the concurrent ones (a prefill saved)
    for length in w.contexts:
        t0 = time.perf_counter()
        session_id, info = side.create(w.context(length))
        seconds = time.perf_counter() - t0
        entry = {"context": length, "ttft_s": seconds, "prefill_tokens_per_s": length / seconds, **info,
                 "followups": []}
        for i in range(w.followups):
            turn = side.ask(session_id, w.question(i), w.max_tokens)
            entry["followups"].append({"ttft_s": turn.ttft, "num_tokens": turn.num_tokens,
                                       "prefill_tokens": turn.prefill_tokens, "itl": percentiles(turn.gaps()),
                                       "timings": turn.timings})
        if length == w.concurrency_context and w.sessions >= 1 and kept is None:
            kept = session_id
        else:
            side.delete(session_id)
        out["single"].append(entry)
        print(f"[{label}] {length:>8} tokens: session in {seconds:.2f} s ({entry['prefill_tokens_per_s']:.0f} tok/s); "
              + ", ".join(f"turn TTFT {f['ttft_s']:.2f} s, ITL median {f['itl'].get('median_ms', 0):.1f} ms "
                          f"({f['prefill_tokens']} prefilled)" for f in entry["followups"]), flush=True)
        if entry["followups"]:
            print(f"[{label}] {length:>8} tokens: last turn's phases {format_phases(entry['followups'][-1]['timings'])}",
                  flush=True)
    if w.sessions < 1:
        return out
    context = w.context(w.concurrency_context)
    t0 = time.perf_counter()
    first = kept if kept is not None else side.create(context)[0]
    out["first_reused"] = kept is not None
    sessions = [first] + [side.clone(first, context)[0] for _ in range(w.sessions - 1)]
    out["setup_s"] = time.perf_counter() - t0
    turns: list[Turn | None] = [None] * len(sessions)

    def ask(i: int) -> None:
        turns[i] = side.ask(sessions[i], w.question(100 + i), w.max_tokens)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["concurrent"] = {"sessions": len(sessions), "context": w.concurrency_context, **concurrent_stats(turns)}
    for session_id in sessions:
        side.delete(session_id)
    c = out["concurrent"]
    print(f"[{label}] {len(sessions)} sessions x {w.concurrency_context} tokens (set up in {out['setup_s']:.1f} s): "
          f"{c['tokens_per_s']:.1f} tok/s, ITL median {c['itl'].get('median_ms', 0):.1f} ms p99 "
          f"{c['itl'].get('p99_ms', 0):.1f} ms" + (f"; steady ITL median {c['steady']['itl'].get('median_ms', 0):.1f} "
                                                   f"p99 {c['steady']['itl'].get('p99_ms', 0):.1f} ms"
                                                   if "steady" in c else ""), flush=True)
    print(f"[{label}] concurrent turns' median phases {format_phases(c['phases_median_s'])}", flush=True)
    return out


def format_phases(timings: dict) -> str:
    return ", ".join(f"{phase} {1e3 * seconds:.0f} ms" for phase, seconds in timings.items()) or "(none reported)"


# ------------------------------------------------------------------ the command


def session_bytes(serve_config, context: int) -> int:
    """Host KV store bytes of one session of ``context`` tokens."""
    from engine.factory import arena_layout

    layout = arena_layout(serve_config.engine)
    return -(-context // layout.block_size) * layout.block_bytes


def max_sessions(serve_config, context: int) -> int:
    """Sessions of ``context`` tokens the node's host KV store holds, one kept free for turns."""
    return max(1, serve_config.kv_store_bytes // session_bytes(serve_config, context) - 1)


def sessions_to_run(sessions: str, serve_config, context: int) -> int:
    """``--sessions``: a number, or max: the sessions of ``context`` tokens the node's host KV store
    holds (``max_sessions``), at most the app's ``max_num_seqs``."""
    if sessions != "max":
        return int(sessions)
    if serve_config is None:
        from engine.errors import InvalidRequestError

        raise InvalidRequestError("--sessions max needs the app's arguments (kv_store_bytes, model)")
    return min(max_sessions(serve_config, context), serve_config.engine.scheduler.max_num_seqs)


def plan_store(app_args: list[str], context: int, budget_bytes: int, sessions: str) -> tuple[int, int, int]:
    """(sessions of ``context`` tokens a store of ``budget_bytes`` holds, sessions to run, the store's
    ``kv_store_bytes``) for the app of ``app_args`` (key=value). ``sessions`` "max": what the budget
    holds, at most the app's max_num_seqs, in the whole budget; a number N: at most that many, in a
    store of N + 1 sessions (no larger than the run needs: the worker page-locks all of it)."""
    from actors.config import ServeConfig
    from cluster.commands import parse_app_args
    from engine.options import build

    config = build(ServeConfig, parse_app_args(app_args))
    per_session = session_bytes(config, context)
    fit = max(1, budget_bytes // per_session - 1)
    if sessions == "max":
        return fit, min(fit, config.engine.scheduler.max_num_seqs), budget_bytes
    run = min(int(sessions), fit)
    return fit, run, min(budget_bytes, (run + 1) * per_session)


def print_table(report: dict) -> None:
    sides = [s for s in ("served", "engine") if s in report]
    print(f"{'':>8} {'context':>8} {'TTFT s':>8} {'prefill tok/s':>13} {'turn TTFT s':>11} {'ITL med ms':>10} "
          f"{'ITL p99 ms':>10}")
    for side in sides:
        for e in report[side]["single"]:
            f = e["followups"][-1] if e["followups"] else {"ttft_s": 0, "itl": {}}
            print(f"{side:>8} {e['context']:>8} {e['ttft_s']:>8.2f} {e['prefill_tokens_per_s']:>13.0f} "
                  f"{f['ttft_s']:>11.2f} {f['itl'].get('median_ms', 0):>10.1f} {f['itl'].get('p99_ms', 0):>10.1f}")
    for side in sides:
        c = report[side].get("concurrent")
        if c:
            steady = c.get("steady", {}).get("itl", {})
            print(f"{side:>8} {c['sessions']} x {c['context']}: {c['tokens_per_s']:.1f} tok/s; ITL median "
                  f"{c['itl'].get('median_ms', 0):.1f} p99 {c['itl'].get('p99_ms', 0):.1f} ms; steady median "
                  f"{steady.get('median_ms', 0):.1f} p99 {steady.get('p99_ms', 0):.1f} ms")
    if "ratio" in report:
        print(f"served / engine alone, aggregate tokens/s: {report['ratio']:.3f}")


def run_bench(args) -> int:
    app_args = served.app_args(args, url_too=True)
    serve_config = None
    vocab = (4, args.vocab or 260)
    if app_args:
        from actors.config import ServeConfig
        from engine.factory import model_layout
        from engine.options import build

        serve_config = build(ServeConfig, app_args)
        if args.vocab is None:
            vocab = (4, min(model_layout(serve_config.engine)[0].vocab_size, 32000))
    sessions = sessions_to_run(args.sessions, serve_config, args.concurrency_context)
    w = Workload(args.contexts, args.followups, args.concurrency_context, sessions, args.max_tokens, vocab=vocab,
                 seed=args.seed)
    report = {"app_args": app_args, "url": args.url, "workload": asdict(w)}
    t0 = time.perf_counter()
    with served.app_url(args, app_args) as url:
        side = Served(url)
        report["served"] = run_workload(side, w, "served")
        report["served"]["health"] = side.client.health()
        print(f"[served] /health: {report['served']['health']!r}", flush=True)
        try:
            report["served"]["host_copy_gbps"] = [line for line in side.client.metrics().splitlines()
                                                  if line.startswith("lsa_host_copy")]
        except Exception as exc:  # /metrics behind an admin key: the bench goes on without it
            report["served"]["host_copy_gbps"] = [f"/metrics: {exc}"]
        print(f"[served] host copies: {report['served']['host_copy_gbps']}", flush=True)
    if serve_config is not None and not args.no_engine:
        import lsa_env

        engine = EngineAlone(serve_config, serve_config.kv_dir or lsa_env.kv_dir())
        try:
            report["engine"] = run_workload(engine, w, "engine")
            report["engine"]["host_copy_gbps"] = dict(engine.core.host_copy)
            print(f"[engine] host copies (GB/s): {engine.core.host_copy}", flush=True)
        finally:
            engine.close()
        over_http, alone = report["served"].get("concurrent"), report["engine"].get("concurrent")
        if over_http and alone:
            report["ratio"] = over_http["tokens_per_s"] / alone["tokens_per_s"]
    report["seconds"] = time.perf_counter() - t0
    return served.finish(report, args.out, print_table)


def add_arguments(p: argparse.ArgumentParser) -> None:
    served.add_arguments(p, url_help="a running app instead (served part only)")
    p.add_argument("--contexts", type=int, nargs="*", default=[32768, 131072], help="one session each")
    p.add_argument("--followups", type=int, default=2, help="questions on each of those sessions")
    p.add_argument("--concurrency-context", type=int, default=131072)
    p.add_argument("--sessions", default="max", help="concurrent sessions (max: what the host KV store holds)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per answer (EOS ignored)")
    p.add_argument("--vocab", type=int, default=None, help="token ids drawn below this (default: the model's, "
                   "at most 32000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-engine", action="store_true", help="skip the engine-alone run")
    p.add_argument("--out", default=None, help="JSON report")


if __name__ == "__main__":
    from benchmarks.commands import main

    raise SystemExit(main("serve"))
