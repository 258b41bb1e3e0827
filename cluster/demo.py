"""``lsa cluster-demo``: the whole system on one machine.

Starts a local Ray cluster and ``cluster:app`` on the embedded SmolLM2 (CPU), writes a batch
of long-context jobs (documents from the shared haystack, or synthetic filler, each with
facts hidden at several depths and one question per fact), runs them through the client as
sessions (each document prefilled once, every question a turn on it), prints the answers,
the accuracy and the KV numbers from /metrics, and shuts everything down.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

FACTS = (
    ("The secret passphrase for the archive is 'blue lantern'.", "What is the secret passphrase for the archive?",
     "blue lantern"),
    ("Maria's favourite fruit is the mango.", "What is Maria's favourite fruit?", "mango"),
    ("The lighthouse keeper's cat is named Pickles.", "What is the name of the lighthouse keeper's cat?",
     "Pickles"),
    ("The meeting with the architects will take place in Lisbon.", "In which city will the meeting with the "
     "architects take place?", "Lisbon"),
    ("The password to the garden shed is 'copper kettle'.", "What is the password to the garden shed?",
     "copper kettle"),
    ("Captain Ortega's ship is called the Silver Heron.", "What is Captain Ortega's ship called?", "Silver Heron"),
)


DEMO_APP_ARGS = {"max_num_seqs": 4}  # where the demo's app differs from ServeConfig's defaults


def add_parser(sub) -> None:
    from actors.config import ServeConfig
    from engine.options import add_arguments

    p = sub.add_parser("cluster-demo", help="local Ray cluster + cluster:app + a batch of long-context sessions",
                       description="Start a local Ray cluster and cluster:app, run documents with hidden facts "
                       "through the client as sessions, print the answers and the KV numbers, shut down.")
    p.add_argument("--docs", type=int, default=2, help="documents (sessions)")
    p.add_argument("--facts", type=int, default=3, help="hidden facts (questions) per document")
    p.add_argument("--context-tokens", type=int, default=2000, help="about this many tokens per document")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per answer at most")
    p.add_argument("--haystack", default=None, help="directory of .txt files (default: shared essays, else "
                   "synthetic filler)")
    p.add_argument("--concurrency", type=int, default=2, help="documents asked at once")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    add_arguments(p.add_argument_group("application (every field of ServeConfig)"), ServeConfig,
                  exclude=("default_max_tokens",), defaults=DEMO_APP_ARGS, suppress=True)
    p.set_defaults(func=run)


def app_args(args) -> dict:
    """The served app's arguments: the demo's defaults, then the flags given; checked here,
    before Ray starts."""
    from actors.config import ServeConfig
    from engine.options import build, given_values

    values = {**DEMO_APP_ARGS, **given_values(args, ServeConfig), "default_max_tokens": args.max_tokens}
    build(ServeConfig, values)
    return values


def make_jobs(num_docs: int, facts_per_doc: int, context_tokens: int, haystack: str | None,
              max_tokens: int) -> list[dict]:
    from lab.haystack import load_haystack

    chars = context_tokens * 4  # about 4 characters a token for English prose
    text = load_haystack(haystack, min_chars=chars * num_docs + 1)
    jobs = []
    for d in range(num_docs):
        body = text[d * chars:(d + 1) * chars]
        facts = [FACTS[(d * facts_per_doc + i) % len(FACTS)] for i in range(facts_per_doc)]
        pieces, prev = [], 0
        for i, (fact, _, _) in enumerate(facts):  # spread from 10% to 90% of the document
            at = int(len(body) * (0.1 + 0.8 * i / max(1, len(facts) - 1)))
            cut = body.rfind(". ", prev, at)
            at = cut + 1 if cut > prev else at
            pieces += [body[prev:at], " " + fact + " "]
            prev = at
        pieces.append(body[prev:])
        jobs.append({"id": f"doc-{d}", "context": "".join(pieces).strip(), "questions": [q for _, q, _ in facts],
                     "answers": [a for _, _, a in facts], "max_tokens": max_tokens})
    return jobs


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            base = name.split("{")[0]
            out[base] = out.get(base, 0.0) + float(value)
    return out


# what the KV line reads from /metrics (cluster/metrics.py: Ray counters get "_total")
KV_METRICS = ("lsa_arena_capacity_bytes", "lsa_evictions", "lsa_prefill_tokens_total", "lsa_cached_tokens_total",
              "lsa_bytes_copied_total", "lsa_misses_total", "lsa_decode_tokens_total", "lsa_tokens_per_second")


def kv_line(metrics: dict[str, float]) -> str:
    m = {name: metrics.get(name, 0.0) for name in KV_METRICS}
    mib = 1 / 2 ** 20
    return (f"KV: host store arena {m['lsa_arena_capacity_bytes'] * mib:.0f} MiB, {m['lsa_evictions']:.0f} evictions; "
            f"prompt tokens computed {m['lsa_prefill_tokens_total']:.0f} (the documents once, then only each "
            f"question), reused {m['lsa_cached_tokens_total']:.0f}; host->device KV copied "
            f"{m['lsa_bytes_copied_total'] * mib:.1f} MiB; misses {m['lsa_misses_total']:.0f}; "
            f"{m['lsa_decode_tokens_total']:.0f} tokens generated, {m['lsa_tokens_per_second']:.1f} tokens/s "
            f"per busy worker")


def settled_metrics(url: str, wait_s: float = 30.0) -> dict[str, float]:
    """/metrics once the demo's work shows in it: workers publish their gauges about once a
    second and Ray exports the ingress counters every few seconds, so a scrape right after the
    last answer may still read zeros."""
    deadline = time.monotonic() + wait_s
    while True:
        metrics = scrape(url)
        if all(metrics.get(name, 0) > 0 for name in SETTLED) or time.monotonic() > deadline:
            return metrics
        time.sleep(1.0)


SETTLED = ("lsa_arena_capacity_bytes", "lsa_prefill_tokens_total", "lsa_cached_tokens_total",
           "lsa_decode_tokens_total", "lsa_tokens_per_second")  # not zero after any demo


def run_demo(args, work: Path) -> tuple:
    """Serve, run the jobs, scrape the metrics: (jobs, summary, results by id, metrics)."""
    from cluster.batch import run_batch
    from cluster.client import LSAClient
    from cluster.local import local_app

    served = app_args(args)
    jobs = make_jobs(args.docs, args.facts, args.context_tokens, args.haystack, args.max_tokens)
    jobs_path, out_path = work / "jobs.jsonl", work / "results.jsonl"
    jobs_path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    print(f"starting a local Ray cluster and cluster:app ({_describe(served)})...", file=sys.stderr)
    t0 = time.perf_counter()
    with local_app(served, num_cpus=args.num_cpus, port=args.port) as url:
        print(f"serving at {url} after {time.perf_counter() - t0:.0f} s; {len(jobs)} documents x "
              f"{args.facts} questions", file=sys.stderr)
        client = LSAClient(url, timeout_s=900)
        summary = run_batch(client, jobs_path, out_path, concurrency=args.concurrency, progress=True)
        metrics = settled_metrics(url)
    results = {r["id"]: r for r in map(json.loads, out_path.read_text().splitlines())}
    return jobs, summary, results, metrics


def _describe(served: dict) -> str:
    from actors.config import ServeConfig
    from engine.options import build

    config = build(ServeConfig, served)
    policy = config.engine.policy
    budget = "" if policy.name == "full" else f" at budget {policy.budget}"
    return f"{config.engine.model}, policy {policy.name}{budget}, {config.num_workers} worker(s)"


def run(args) -> int:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lsa-demo-") as tmp:
        try:
            jobs, summary, results, metrics = run_demo(args, Path(tmp))
        except KeyboardInterrupt:
            print("interrupted: the cluster is shut down", file=sys.stderr)
            return 130
    for job in jobs:
        r = results.get(job["id"], {})
        print(f"\n{job['id']} ({len(job['context'])} characters)")
        if r.get("error"):
            print(f"  error: {r['error']}")
            continue
        for q, a, want, ok in zip(job["questions"], r["answers"], job["answers"], r["correct"]):
            print(f"  Q: {q}\n  A: {a.strip()!r}  [{'correct' if ok else 'expected ' + repr(want)}]")
    acc = "n/a" if summary.accuracy is None else f"{summary.num_correct}/{summary.num_checked} " \
                                                  f"({summary.accuracy:.0%})"
    print(f"\naccuracy {acc} with {_describe(app_args(args))}; {summary.succeeded} jobs done, "
          f"{summary.failed} failed; {time.perf_counter() - t0:.0f} s in all")
    print(kv_line(metrics))
    return 0 if summary.failed == 0 else 1
