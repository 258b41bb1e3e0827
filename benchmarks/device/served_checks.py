"""Checks of the served system on the GPU machine (issue 15), each writing JSON; rehearsed on the
CPU with tiny-random (tests/test_device_session.py, session.sh's rehearsal).

    python benchmarks/device/served_checks.py app OUT.json [--checks demo,restart,leaks] key=value ...
        one local cluster:app (the key=value arguments, as lsa serve takes them), then, in order:
        demo     the demo's documents and questions through the client (cluster.demo's jobs):
                 answers and accuracy
        restart  a session, a turn, the replica's process killed, the same turn again: the new
                 replica maps the node's arena again and answers without prefilling the context
                 (its prefill_tokens equal the first turn's)
        leaks    3 rounds of create / ask / delete: the arena's free blocks, the worker's GPU
                 memory, pinned host memory and RSS after each round against the first
    python benchmarks/device/served_checks.py pooled OUT.json --sessions N --extra K --context T key=value ...
        two Ray nodes on this machine: the head (the GPU, the worker) and a CPU-only node with a KV
        store; each store holds N sessions of T tokens (kv_store_bytes is set here). N sessions,
        then K more (their creation spills idle sessions to the peer store), then one turn on
        each: tokens/s and bytes moved across nodes per turn and per cycle, local against spilled
        (with the staging seconds and GB/s), and a second turn on each spilled session (its
        staged copies stayed: nothing moves).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def worker_stats() -> dict:
    """The Indexer's latest stats of every replica (as /metrics shows them)."""
    import ray

    from actors.worker_deployment import INDEXER_NAME

    namespace = ray.get_runtime_context().namespace
    stats = ray.get(ray.get_actor(INDEXER_NAME, namespace=namespace).worker_stats.remote())
    return {replica: _plain(s) for replica, s in stats.items()}


def _plain(message) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(message) if is_dataclass(message) else dict(message)


def wait_for_stats(seconds: float = 3.0) -> dict:
    time.sleep(seconds)  # replicas publish every routing_stats_period_s (1 s)
    return worker_stats()


# ------------------------------------------------------------------ app checks


def document(phrase: str, tokens: int) -> str:
    """``phrase`` repeated to about ``tokens`` tokens of English (4 characters a token)."""
    return phrase * max(1, 4 * tokens // len(phrase))


def check_demo(client, out: dict, tokens: int) -> None:
    from cluster.batch import run_batch
    from cluster.demo import make_jobs

    import lsa_env

    jobs = make_jobs(2, 3, tokens, lsa_env.haystack_dir(), 24)
    with tempfile.TemporaryDirectory(prefix="lsa-checks-") as tmp:  # removed after (it was left in /tmp)
        work = Path(tmp)
        (work / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
        t0 = time.perf_counter()
        summary = run_batch(client, work / "jobs.jsonl", work / "results.jsonl", concurrency=2, progress=False)
        results = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    out["demo"] = {"seconds": time.perf_counter() - t0, "succeeded": summary.succeeded, "failed": summary.failed,
                   "accuracy": summary.accuracy, "answers": [{"id": r["id"], "answers": r.get("answers"),
                                                             "correct": r.get("correct")} for r in results]}
    print(f"demo: {summary.succeeded} jobs, accuracy {summary.accuracy}", flush=True)


def check_restart(client, out: dict, tokens: int) -> None:
    import ray

    session = client.session(document("The ferry to the island leaves from the north pier every morning at seven. ",
                                      tokens))
    question = {"question": "When does the ferry leave?", "max_tokens": 16}
    path = f"/v1/sessions/{session.session_id}/ask"
    first = client.request("POST", path, question)
    victim = first["replica"]
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"])
    t0 = time.perf_counter()
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)  # the process dies
    again = client.request("POST", path, question)
    out["restart"] = {"context_tokens": session.num_tokens, "first": {k: first[k] for k in ("replica", "prefill_tokens", "text")},
                      "again": {k: again[k] for k in ("replica", "prefill_tokens", "text")},
                      "seconds_to_answer_after_kill": time.perf_counter() - t0,
                      "no_reprefill": again["prefill_tokens"] == first["prefill_tokens"] < session.num_tokens,
                      "same_text": again["text"] == first["text"], "new_replica": again["replica"] != victim}
    session.close()
    print(f"restart: {out['restart']}", flush=True)


def memory_snapshot() -> dict:
    """Free blocks of every node's store, and each worker's process memory (exact counters)."""
    stats = wait_for_stats()
    return {"store_free_blocks": {n: s["free_blocks"] for n, s in store_stats().items()},
            "workers": {r: s.get("memory", {}) for r, s in stats.items()}}


def check_leaks(client, out: dict, tokens: int, rounds: int = 3) -> None:
    docs = [f"Document {d}: " + document("The archive keeps letters, maps and ledgers of the old harbour. ", tokens)
            for d in range(2)]

    def one_round():
        for doc in docs:
            with client.session(doc) as s:
                for q in ("What does the archive keep?", "Which harbour?"):
                    s.ask(q, max_tokens=12)

    one_round()  # warm: graphs captured, pools grown
    snapshots = [memory_snapshot()]
    for _ in range(rounds):
        one_round()
        snapshots.append(memory_snapshot())
    first = snapshots[0]
    flat = {"store_free_blocks": all(s["store_free_blocks"] == first["store_free_blocks"] for s in snapshots)}
    for key in ("gpu_allocated_bytes", "pinned_host_bytes"):
        flat[key] = all(s["workers"].get(r, {}).get(key) == w.get(key)
                        for r, w in first["workers"].items() for s in snapshots)
    # each worker's own growth, last snapshot against first (the replicas' sizes differ by tens of MB:
    # a max - min over all of them, as reported until 2026-12-03, measured that difference, not growth)
    last = snapshots[-1]["workers"]
    growth = {r: last[r].get("rss_bytes", 0) - w.get("rss_bytes", 0) for r, w in first["workers"].items() if r in last}
    out["leaks"] = {"rounds": rounds, "snapshots": snapshots, "flat": flat, "flat_all": all(flat.values()),
                    "rss_growth_bytes": max(growth.values()) if growth else None, "rss_growth_by_worker": growth}
    print(f"leaks: {flat}; store free blocks {[s['store_free_blocks'] for s in snapshots]}; "
          f"worker RSS growth {out['leaks']['rss_growth_bytes']} bytes", flush=True)


def run_app(args, app_args: dict) -> dict:
    from benchmarks import served
    from cluster.client import LSAClient

    out: dict = {"app_args": app_args}
    t0 = time.perf_counter()
    with served.started_app(args, app_args) as url:
        out["startup_s"] = time.perf_counter() - t0
        print(f"app up in {out['startup_s']:.0f} s at {url}", flush=True)
        client = LSAClient(url, timeout_s=900)
        checks = {"demo": check_demo, "restart": check_restart, "leaks": check_leaks}
        for name in args.checks.split(","):
            try:
                checks[name](client, out, args.context_tokens)
            except Exception as exc:  # every check reports, even after another failed
                out[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                print(f"{name}: FAILED {out[name]['error']}", flush=True)
    return out


# ------------------------------------------------------------------ pooled host RAM


def store_stats() -> dict:
    import ray

    from actors.session_store import STORE_PREFIX

    namespace = ray.get_runtime_context().namespace
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(STORE_PREFIX + ":") and a["namespace"] == namespace]
    return {name.split(":", 1)[1]: _plain(ray.get(ray.get_actor(name, namespace=namespace).stats.remote()))
            for name in names}


def moved(before: dict, after: dict, block_bytes: int) -> dict:
    sent = sum(after[n]["blocks_sent"] - before.get(n, {}).get("blocks_sent", 0) for n in after)
    received = sum(after[n]["blocks_received"] - before.get(n, {}).get("blocks_received", 0) for n in after)
    delta = lambda key: sum(after[n].get(key, 0) - before.get(n, {}).get(key, 0) for n in after)  # noqa: E731
    staged, stage_s = delta("blocks_fetched_at_use") + delta("blocks_prefetched"), delta("stage_s")
    return {"blocks_sent": sent, "blocks_received": received, "bytes": (sent + received) * block_bytes,
            "blocks_staged": staged, "stage_s": stage_s,
            "stage_gb_per_s": staged * block_bytes / 1e9 / stage_s if stage_s else None}


def timed_turn(client, session_id: str, question: str, max_tokens: int, cycle: int, block_bytes: int) -> dict:
    before = store_stats()
    t0 = time.perf_counter()
    answer = client.request("POST", f"/v1/sessions/{session_id}/ask",
                            {"question": question, "max_tokens": max_tokens, "ignore_eos": True})
    seconds = time.perf_counter() - t0
    cross = moved(before, store_stats(), block_bytes)
    cycles = max(1, -(-answer["num_tokens"] // cycle))
    return {"session_id": session_id, "seconds": seconds, "num_tokens": answer["num_tokens"],
            "tokens_per_s": answer["num_tokens"] / seconds,
            "decode_tokens_per_s": answer["num_tokens"] / answer["decode_s"] if answer["decode_s"] else None,
            "prefill_tokens": answer["prefill_tokens"], "node_id": answer.get("node_id", answer.get("node")),
            "cross_node_bytes": cross["bytes"], "cross_node_bytes_per_cycle": cross["bytes"] / cycles, **cross}


def run_pooled(args, app_args: dict) -> dict:
    import shutil
    import tempfile

    import ray
    import torch
    from ray import serve
    from ray.cluster_utils import Cluster

    from actors.config import ServeConfig
    from actors.directory import HEAD
    from cluster.client import LSAClient
    from cluster.local import free_port
    from engine.factory import arena_layout, model_layout
    from engine.options import build

    config = build(ServeConfig, app_args)
    layout = arena_layout(config.engine)
    blocks = -(-args.context // layout.block_size)
    turn_blocks = -(-(args.context + 64 + args.max_tokens) // layout.block_size) - blocks + 16 + 2  # + spare
    kv_bytes = (args.sessions * blocks + turn_blocks) * layout.block_bytes
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    saved = dict(os.environ)
    os.environ.update(RAY_TMPDIR=tmp, HOME=tmp)
    os.environ.setdefault("LSA_KV_DIR", "/dev/shm" if os.path.isdir("/dev/shm") else tmp)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([saved["PYTHONPATH"]] if saved.get("PYTHONPATH") else []))
    gpus = 1 if config.engine.device_name.startswith("cuda") else 0
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": args.num_cpus or 8, "num_gpus": gpus,
                                                      "include_dashboard": False})
    c.add_node(num_cpus=2, num_gpus=0, resources={"kv_only": 1})  # the CPU-only node: a KV store, no worker
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="lsa-pooled", log_to_driver=False)
    out: dict = {"app_args": app_args, "context": args.context, "sessions": args.sessions, "extra": args.extra,
                 "kv_store_bytes_per_node": kv_bytes, "block_bytes": layout.block_bytes, "session_blocks": blocks}
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        from cluster import app

        serve.run(app({**app_args, "kv_store_bytes": kv_bytes, "cluster": "pooled", "ingress_resources": {HEAD: 0.001},
                       "worker_resources": {HEAD: 0.001}}), name="lsa", route_prefix="/")
        client = LSAClient(f"http://127.0.0.1:{port}", timeout_s=1800)
        client.models()  # the ingress places a store on every node
        for _ in range(60):
            if len(store_stats()) == 2:
                break
            time.sleep(1)
        out["stores"] = sorted(store_stats())
        gen_ids = torch.Generator().manual_seed(0)
        vocab = min(32000, model_layout(config.engine)[0].vocab_size)

        def context_ids():
            return torch.randint(4, vocab, (args.context,), generator=gen_ids).tolist()

        cycle = config.engine.policy.cycle
        ask = lambda sid, i: timed_turn(client, sid, f"Question {i}?", args.max_tokens, cycle, layout.block_bytes)  # noqa: E731
        local = [client.create_session(context_ids())["id"] for _ in range(args.sessions)]
        out["all_local"] = [ask(sid, i) for i, sid in enumerate(local)]
        before = store_stats()
        extra = [client.create_session(context_ids())["id"] for _ in range(args.extra)]
        out["spill"] = {"stores_before": before, "stores_after": store_stats()}
        home = next(n for n, s in store_stats().items() if s["sessions"])  # the worker's node holds the sessions
        spilled = _spilled_sessions(home, local + extra)
        out["spilled_sessions"] = len(spilled)
        out["spilled_turns"] = [ask(sid, 100 + i) for i, sid in enumerate(spilled)]
        out["spilled_again"] = [ask(sid, 200 + i) for i, sid in enumerate(spilled)]  # its staged copies stayed
        out["stores_end"] = store_stats()
        for sid in local + extra:
            client.delete_session(sid)
        loc = [t["tokens_per_s"] for t in out["all_local"]]
        spl = [t["tokens_per_s"] for t in out["spilled_turns"]]
        again = [t["tokens_per_s"] for t in out["spilled_again"]]
        if loc and spl:
            out["spilled_vs_local_tokens_per_s"] = (sum(spl) / len(spl)) / (sum(loc) / len(loc))
            out["spilled_again_vs_local_tokens_per_s"] = (sum(again) / len(again)) / (sum(loc) / len(loc))
        print(f"pooled: {len(spilled)} spilled of {len(local) + len(extra)}; tokens/s local {loc}, spilled {spl}, "
              f"its next turn {again}; "
              f"cross-node bytes per cycle {[t['cross_node_bytes_per_cycle'] for t in out['spilled_turns']]}; "
              f"staging {[(round(t['stage_s'], 2), t['stage_gb_per_s']) for t in out['spilled_turns']]} (s, GB/s)",
              flush=True)
    finally:
        serve.shutdown()
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith(("kvstore:", "lsa-indexer", "lsa-sessions")):
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
        ray.shutdown()
        c.shutdown()
        for f in Path(os.environ["LSA_KV_DIR"]).glob("lsa-kv-pooled-*.arena"):
            f.unlink(missing_ok=True)
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _spilled_sessions(node_id: str, session_ids: list[str]) -> list[str]:
    """Those of ``session_ids`` held by node ``node_id``'s store with blocks on another store."""
    import ray

    from actors.session_store import store_name

    store = ray.get_actor(store_name(node_id), namespace=ray.get_runtime_context().namespace)
    held = ray.get(store.holding.remote(session_ids))
    return [sid for sid in held if not ray.get(store.view.remote(sid)).complete]


def main(argv: list[str] | None = None) -> int:
    from benchmarks import served
    from cluster.commands import parse_app_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["app", "pooled"])
    p.add_argument("out", help="JSON report")
    served.add_arguments(p, url_help=None)
    p.add_argument("--checks", default="demo,restart,leaks")
    p.add_argument("--context-tokens", type=int, default=2000, help="app: about this many tokens per document")
    p.add_argument("--context", type=int, default=131072, help="pooled: tokens per session")
    p.add_argument("--sessions", type=int, default=1, help="pooled: sessions each node's store holds")
    p.add_argument("--extra", type=int, default=1, help="pooled: sessions created past that")
    p.add_argument("--max-tokens", type=int, default=128, help="pooled: tokens per turn")
    args, rest = p.parse_known_args(argv)  # key=value words may come between the flags
    pairs = [w for w in rest if "=" in w and not w.startswith("-")]
    if len(pairs) != len(rest):
        p.error(f"unrecognized arguments: {' '.join(w for w in rest if w not in pairs)}")
    app_args = parse_app_args(args.app_args + pairs)
    t0 = time.perf_counter()
    out = run_app(args, app_args) if args.mode == "app" else run_pooled(args, app_args)
    out["seconds"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
