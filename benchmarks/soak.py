"""``lsa bench soak``: minutes of mixed traffic at a fixed rate against one node; does anything
fail that should not, drift or leak?

Requests go out at ``--rate`` per second (open loop: one every 1/rate s, whatever the server's
pace), each one of three kinds drawn with a fixed seed:

* session: a session's next step: create one (a context of ``--context`` tokens, about) while
  fewer than ``--sessions`` live, else ask an idle one a question; after ``--turns`` questions
  it is deleted (each step its own request; a turn while all are busy becomes a chat);
* chat: a stateless chat through the OpenAI route (``/v1/chat/completions``), a varied prompt;
* bad: one of ``BAD`` (malformed JSON, bad parameters, an unknown session, ...), each with the
  status it must get.

Reported: requests served, statuses by kind (good requests must get 200, bad ones their 4xx:
any other answer is a mismatch), per ``--window-s`` window the median and p99 latency of the
good requests (by when they were sent), and memory at the start, every window and the end
(after the live sessions are deleted; the first window's end is the reference: the first
requests warm allocators and caches up): the app's ``/metrics`` (workers' RSS, GPU memory torch
allocated, the stores' arena free/used bytes, sessions, prefix KV), this machine's used memory
(MemTotal - MemAvailable), and the RSS of the Ray processes (those this command started, with
``--url`` every ``ray::`` process, raylet and gcs_server of the machine): anonymous memory and
the arena's shared pages apart. Flat is the target. Not in CI: it runs for minutes.

    lsa bench soak model=smollm2-135m num_workers=2 --minutes 30 --rate 0.3 --out soak.json
    lsa bench soak --url http://127.0.0.1:8000 --minutes 5 --api-key KEY --admin-key ADMIN
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.serve import percentiles

M = [{"role": "user", "content": "hi"}]
BAD = [  # (name, method, path, body: JSON-able or raw bytes, the status it must get)
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"', 400),
    ("temperature 5", "POST", "/v1/chat/completions", {"messages": M, "temperature": 5}, 400),
    ("top_k 1.5", "POST", "/v1/chat/completions", {"messages": M, "top_k": 1.5, "temperature": 0.7}, 400),
    ("stop [1]", "POST", "/v1/chat/completions", {"messages": M, "stop": [1]}, 400),
    ("max_tokens 10**12", "POST", "/v1/chat/completions", {"messages": M, "max_tokens": 10 ** 12}, 400),
    ("unknown parameter", "POST", "/v1/chat/completions", {"messages": M, "foo": 1}, 400),
    ("unknown model", "POST", "/v1/chat/completions", {"messages": M, "model": "gpt-4"}, 404),
    ("empty context", "POST", "/v1/sessions", {"context": ""}, 400),
    ("ask unknown session", "POST", "/v1/sessions/soak-no-such-session/ask", {"question": "q"}, 404),
    ("delete unknown session", "DELETE", "/v1/sessions/soak-no-such-session", None, 404),
]
QUESTIONS = ["What is this text about?", "Name one thing the text mentions.", "Give the text a title.",
             "What happens at the end?", "Quote a short phrase from it."]


@dataclass(frozen=True)
class SoakPlan:
    minutes: float = 30.0
    rate: float = 0.3  # requests a second
    weights: tuple[float, float, float] = (0.4, 0.4, 0.2)  # session, chat, bad
    sessions: int = 4  # live at most
    turns: int = 3  # questions per session, then deleted
    context: int = 400  # tokens of a session's context, about
    chat_tokens: int = 40  # tokens of a chat prompt, about
    max_tokens: int = 16
    window_s: float = 60.0
    timeout_s: float = 600.0
    seed: int = 0


# ------------------------------------------------------------------ one request


def call(url: str, method: str, path: str, body, api_key: str | None, timeout_s: float) -> tuple[int, bytes]:
    """(status, body) of one request, no retries; status 0: no answer (connection, timeout)."""
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, str(e).encode()


class Traffic:
    """The requests of a soak: which one comes next, sent and recorded. Thread-safe."""

    def __init__(self, url: str, plan: SoakPlan, api_key: str | None, text: str):
        self.url, self.plan, self.api_key, self.text = url, plan, api_key, text
        self.rng = random.Random(plan.seed)
        self.lock = threading.Lock()
        self.live: dict[str, int] = {}  # session id: questions asked
        self.busy: set[str] = set()
        self.creating = 0
        self.records: list[dict] = []
        self.ops_done = 0
        self.start = time.monotonic()

    def send(self, kind: str, method: str, path: str, body, expect: int, due: float | None) -> tuple[int, bytes]:
        """One request; ``due``: when the rate wanted it sent (None: it follows another one)."""
        sent = time.monotonic()
        status, payload = call(self.url, method, path, body, self.api_key, self.plan.timeout_s)
        record = {"t": round(sent - self.start, 3), "kind": kind, "expect": expect, "status": status,
                  "latency_s": round(time.monotonic() - sent, 4)}
        if due is not None:
            record["late_s"] = round(sent - self.start - due, 3)
        if status != expect:
            record["answer"] = payload[:300].decode(errors="replace")
        with self.lock:
            self.records.append(record)
        return status, payload

    def snippet(self, tokens: int) -> str:
        chars = 4 * tokens
        with self.lock:
            at = self.rng.randrange(0, len(self.text) - chars)
        return self.text[at:at + chars]

    def next_op(self, i: int, due: float) -> None:
        try:
            self._next_op(i, due)
        finally:
            with self.lock:
                self.ops_done += 1

    def _next_op(self, i: int, due: float) -> None:
        with self.lock:
            kind = self.rng.choices(("session", "chat", "bad"), self.plan.weights)[0]
            bad = self.rng.choice(BAD)
        if kind == "bad":
            name, method, path, body, expect = bad
            self.send(f"bad: {name}", method, path, body, expect, due)
        elif kind == "session" and self.session_step(due):
            return
        else:
            messages = [{"role": "user", "content": f"Request {i}. {self.snippet(self.plan.chat_tokens)} Summarize."}]
            self.send("chat", "POST", "/v1/chat/completions",
                      {"messages": messages, "max_tokens": self.plan.max_tokens, "temperature": 0}, 200, due)

    def session_step(self, due: float) -> bool:
        """Create, ask or (after the last question) delete; False when every session is busy."""
        with self.lock:
            idle = [s for s in self.live if s not in self.busy]
            create = len(self.live) + self.creating < self.plan.sessions
            if create:
                self.creating += 1
            elif idle:
                session_id = self.rng.choice(idle)
                self.busy.add(session_id)
            else:
                return False
        if create:
            try:
                status, payload = self.send("create", "POST", "/v1/sessions",
                                            {"context": self.snippet(self.plan.context)}, 200, due)
            finally:
                with self.lock:
                    self.creating -= 1
            if status == 200:
                with self.lock:
                    self.live[json.loads(payload)["id"]] = 0
            return True
        question = self.rng.choice(QUESTIONS)
        status, _ = self.send("ask", "POST", f"/v1/sessions/{session_id}/ask",
                              {"question": question, "max_tokens": self.plan.max_tokens, "temperature": 0}, 200, due)
        with self.lock:
            self.live[session_id] += 1
            last = self.live[session_id] >= self.plan.turns or status == 404
        if last:
            self.delete(session_id, expect=404 if status == 404 else 200)
        with self.lock:
            self.busy.discard(session_id)
        return True

    def delete(self, session_id: str, expect: int = 200) -> None:
        self.send("delete", "DELETE", f"/v1/sessions/{session_id}", None, expect, None)
        with self.lock:
            self.live.pop(session_id, None)


# ------------------------------------------------------------------ memory


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssShmem", "VmRSS"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def ray_processes(root: int | None) -> list[int]:
    """Pids of the Ray processes: ``root``'s descendants (the cluster this command started), or
    with no root every ``ray::`` worker, raylet and gcs_server of the machine."""
    parents, names = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        pid = int(stat.parent.name)
        names[pid] = text[text.index("(") + 1:text.rindex(")")]
        parents[pid] = int(text[text.rindex(")") + 2:].split()[1])
    if root is None:
        return [pid for pid, name in names.items()
                if name in ("raylet", "gcs_server") or _cmdline(pid).startswith(b"ray::")]
    tree, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        tree += children
        frontier = children
    return tree


def memory_sample(url: str, admin_key: str | None, root: int | None) -> dict:
    from cluster.metrics import sum_series

    sample: dict = {"t": time.time()}
    status, text = call(url, "GET", "/metrics", None, admin_key, 30)
    if status == 200:
        metrics = text.decode()
        for name in ("worker_rss_bytes", "gpu_memory_bytes", "arena_free_bytes", "arena_used_bytes", "sessions",
                     "prefix_kv_bytes"):
            sample[name] = sum_series(metrics, "lsa_" + name)
    meminfo = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    sample["node_used_bytes"] = (meminfo["MemTotal"] - meminfo["MemAvailable"]) << 10
    pids = ray_processes(root)
    kb = [_status_kb(pid) for pid in pids]
    sample["ray_processes"] = len(pids)
    sample["ray_rss_bytes"] = sum(k.get("VmRSS", 0) for k in kb) << 10
    sample["ray_rss_anon_bytes"] = sum(k.get("RssAnon", 0) for k in kb) << 10
    sample["ray_rss_shmem_bytes"] = sum(k.get("RssShmem", 0) for k in kb) << 10
    try:
        used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30).stdout.split()
        sample["gpu_used_bytes"] = sum(int(x) for x in used) << 20
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    return sample


# ------------------------------------------------------------------ the run


def window_row(records: list[dict], index: int) -> dict:
    good = [r for r in records if not r["kind"].startswith("bad")]
    return {"window": index, "requests": len(records), "good": len(good), "bad": len(records) - len(good),
            "statuses": dict(sorted(collections.Counter(str(r["status"]) for r in records).items())),
            "mismatches": sum(r["status"] != r["expect"] for r in records),
            "latency": percentiles([r["latency_s"] for r in good])}


def run_soak(url: str, plan: SoakPlan, api_key: str | None, admin_key: str | None, root: int | None,
             text: str) -> dict:
    traffic = Traffic(url, plan, api_key, text)
    duration = 60 * plan.minutes
    memory = [memory_sample(url, admin_key, root)]
    print(f"[soak] {plan.minutes:g} min at {plan.rate:g} requests/s against {url}", flush=True)
    pool = ThreadPoolExecutor(max_workers=64)
    i, windows_done = 0, 0
    while True:
        now = time.monotonic() - traffic.start
        if now >= (windows_done + 1) * plan.window_s or now >= duration:
            windows_done += 1
            memory.append(memory_sample(url, admin_key, root))
            with traffic.lock:
                done = list(traffic.records)
            row = window_row([r for r in done if (windows_done - 1) * plan.window_s <= r["t"]], windows_done)
            print(f"[soak {now / 60:5.1f}/{plan.minutes:g} min] {len(done)} answered, "
                  f"{i - traffic.ops_done} in flight; "
                  f"window: {row['requests']} ({row['statuses']}), p99 {row['latency'].get('p99_ms', 0) / 1e3:.2f} s; "
                  f"mismatches so far {sum(r['status'] != r['expect'] for r in done)}; ray RSS "
                  f"{memory[-1]['ray_rss_bytes'] / 2**20:.0f} MiB, arena free "
                  f"{memory[-1].get('arena_free_bytes', 0) / 2**20:.0f} MiB", flush=True)
        if now >= duration:
            break
        due = i / plan.rate
        if due > now:
            time.sleep(min(due - now, (windows_done + 1) * plan.window_s - now, duration - now))
            continue
        pool.submit(traffic.next_op, i, due)
        i += 1
    pool.shutdown(wait=True)
    for session_id in list(traffic.live):  # the sessions still live: memory at the end holds none
        traffic.delete(session_id)
    time.sleep(5)  # workers publish their stats about once a second
    memory.append(memory_sample(url, admin_key, root))
    return report(plan, traffic.records, memory)


def report(plan: SoakPlan, records: list[dict], memory: list[dict]) -> dict:
    records = sorted(records, key=lambda r: r["t"])
    windows = collections.defaultdict(list)
    for r in records:
        windows[int(r["t"] // plan.window_s)].append(r)
    by_kind = collections.defaultdict(collections.Counter)
    for r in records:
        by_kind["bad" if r["kind"].startswith("bad") else r["kind"]][str(r["status"])] += 1
    start, warm, end = memory[0], memory[min(1, len(memory) - 1)], memory[-1]
    change = lambda a, b: {k: b[k] - a[k] for k in b if k != "t" and isinstance(a.get(k), (int, float))}  # noqa: E731
    return {
        "plan": asdict(plan), "requests": len(records),
        "statuses_by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "mismatches": [r for r in records if r["status"] != r["expect"]],
        "latency_by_kind": {k: percentiles([r["latency_s"] for r in records if r["kind"] == k])
                            for k in ("create", "ask", "delete", "chat")},
        "late_s_max": max((r["late_s"] for r in records if "late_s" in r), default=0.0),
        "windows": [window_row(rows, index + 1) for index, rows in sorted(windows.items())],
        "memory": memory,
        "memory_change": change(start, end),
        "memory_change_after_first_window": change(warm, end),
        "records": records,
    }


def print_table(r: dict) -> None:
    print(f"{r['requests']} requests; statuses by kind: {r['statuses_by_kind']}; mismatches (a good request not "
          f"200, a bad one not its 4xx): {len(r['mismatches'])}; latest start {r['late_s_max']:.1f} s after due")
    print("| window | requests | good | bad | statuses | good p50 s | good p99 s |")
    print("|---:|---:|---:|---:|---|---:|---:|")
    for w in r["windows"]:
        lat = w["latency"]
        print(f"| {w['window']} | {w['requests']} | {w['good']} | {w['bad']} | "
              f"{' '.join(f'{k}: {v}' for k, v in w['statuses'].items())} | {lat.get('median_ms', 0) / 1e3:.2f} | "
              f"{lat.get('p99_ms', 0) / 1e3:.2f} |")
    start, warm, end = r["memory"][0], r["memory"][min(1, len(r["memory"]) - 1)], r["memory"][-1]
    print("| memory | start MiB | after window 1 MiB | end MiB | change since window 1 MiB |")
    print("|---|---:|---:|---:|---:|")
    for key in start:
        if key.endswith("_bytes") and key in end and key in warm:
            print(f"| {key[:-6]} | {start[key] / 2**20:.1f} | {warm[key] / 2**20:.1f} | {end[key] / 2**20:.1f} | "
                  f"{(end[key] - warm[key]) / 2**20:+.1f} |")


def run_bench(args) -> int:
    import os

    from benchmarks import served
    from engine.errors import InvalidRequestError
    from lab.haystack import load_haystack

    app_args = served.app_args(args)
    if args.minutes <= 0 or args.rate <= 0 or args.sessions < 1 or args.turns < 1:
        raise InvalidRequestError("--minutes and --rate must be positive, --sessions and --turns at least 1")
    plan = SoakPlan(minutes=args.minutes, rate=args.rate, sessions=args.sessions, turns=args.turns,
                    context=args.context, chat_tokens=args.chat_tokens, max_tokens=args.max_tokens,
                    window_s=args.window_s, seed=args.seed)
    text = load_haystack(args.haystack, min_chars=8 * max(plan.context, plan.chat_tokens) + 1)
    admin_key = args.admin_key or args.api_key
    with served.app_url(args, app_args) as url:  # the Ray processes this command starts are its children
        result = run_soak(url, plan, args.api_key, admin_key, None if args.url else os.getpid(), text)
    result.update(app_args=app_args, url=args.url)
    return served.finish(result, args.out, print_table)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks import served

    served.add_arguments(p)
    p.add_argument("--api-key", default=None, help="the app's API key, if it has keys")
    p.add_argument("--admin-key", default=None, help="the key of /metrics (default: --api-key)")
    p.add_argument("--minutes", type=float, default=30.0, help="how long requests are sent")
    p.add_argument("--rate", type=float, default=0.3, help="requests a second")
    p.add_argument("--sessions", type=int, default=4, help="live sessions at most")
    p.add_argument("--turns", type=int, default=3, help="questions per session before it is deleted")
    p.add_argument("--context", type=int, default=400, help="tokens of a session's context (about)")
    p.add_argument("--chat-tokens", type=int, default=40, help="tokens of a chat prompt (about)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens of each answer (at most)")
    p.add_argument("--window-s", type=float, default=60.0, help="latency and memory per window of this length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", default=None, help="folder of texts (default: the shared haystack, else filler)")
    p.add_argument("--out", default=None, help="JSON report")


if __name__ == "__main__":
    from benchmarks.commands import main

    raise SystemExit(main("soak"))
