"""Metrics of the serving path, through Ray (``ray.serve.metrics``), right with any number of
ingress replicas.

Two kinds, two sources:

- Per-request events (requests by route and status, time to first token, inter-token latency,
  prompt / prefill / decode / reused tokens, prefix-reuse hits, host-to-device bytes and
  cycles, late blocks, misses) are Ray Counters and Histograms recorded by the ingress replica
  that served the request. Serve tags each series with its replica, and Ray exports them on
  every node's metrics port (``ray start --metrics-export-port``): a request is counted once,
  by one replica, so the sum over replicas is the cluster's total.
- State (sessions held by the node stores, resident fraction, arena bytes used and free per node, queue) is a
  gauge of one truth: the workers' last stats, which they send to the Indexer. Rendered at
  scrape time, labelled per worker replica or node, never recorded by an ingress replica
  (two replicas would report it twice).

``GET /metrics`` on the app returns both: the Ray series read from every alive node's metrics
port (names without Ray's ``ray_`` prefix) and the gauges. Scrape either the app's
``/metrics`` or Ray's metrics ports (the manifests expose 8080), not both.
"""
from __future__ import annotations

import urllib.request

PREFIX = "lsa_"
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28]

COUNTERS = {  # name: (description, tag keys)
    "requests": ("HTTP requests answered, by route and status.", ("route", "status")),
    "prompt_tokens": ("Prompt tokens of answered requests.", ()),
    "prefill_tokens": ("Prompt tokens computed (prefilled).", ()),
    "cached_tokens": ("Prompt tokens whose KV was reused (a session's, or a held prefix): not computed.", ()),
    "prefix_hits": ("Stateless requests that reused a held prefix's KV.", ()),
    "decode_tokens": ("Tokens generated.", ()),
    "bytes_copied": ("Host-to-device KV bytes copied for answered requests.", ()),
    "cycles": ("LSA cycles (Level-1 refreshes) of answered requests.", ()),
    "late_blocks": ("Blocks loaded at a cycle boundary that the prefetch missed.", ()),
    "misses": ("Blocks needed but not in the host mirror.", ()),
}
HISTOGRAMS = {  # name: (description, boundaries, tag keys)
    "time_to_first_token_seconds": ("Request arrival at the ingress to its first token.", LATENCY_BUCKETS, ()),
    "inter_token_latency_seconds": ("Mean time between generated tokens, one sample per request.", ITL_BUCKETS, ()),
    "bytes_copied_per_cycle": ("Host-to-device bytes per LSA cycle, one sample per request.",
                               [2 ** k for k in range(10, 34, 2)], ()),
    "worker_phase_seconds": ("Seconds of each phase of a request in its decode worker: admission (store calls), "
                             "queued, first_token (its prefill), decode, settle (store calls).", LATENCY_BUCKETS,
                             ("phase",)),
}


class EdgeMetrics:
    """The ingress replica's Ray metrics; with ``ray_metrics=False`` (tests without Ray) they
    are kept in plain dicts, read by ``totals``."""

    def __init__(self, ray_metrics: bool = True):
        self.totals: dict[tuple, float] = {}
        self.counters, self.histograms = {}, {}
        if ray_metrics:
            from ray.serve import metrics

            self.counters = {name: metrics.Counter(PREFIX + name, description=d, tag_keys=tags)
                             for name, (d, tags) in COUNTERS.items()}
            self.histograms = {name: metrics.Histogram(PREFIX + name, description=d, boundaries=b, tag_keys=tags)
                               for name, (d, b, tags) in HISTOGRAMS.items()}

    def inc(self, name: str, value: float = 1.0, **tags) -> None:
        if value <= 0:
            return
        key = (name, tuple(sorted(tags.items())))
        self.totals[key] = self.totals.get(key, 0.0) + value
        if name in self.counters:
            self.counters[name].inc(value, tags={k: str(v) for k, v in tags.items()} or None)

    def observe(self, name: str, value: float, **tags) -> None:
        key = (name, "count", *sorted(tags.items()))
        self.totals[key] = self.totals.get(key, 0.0) + 1
        if name in self.histograms:
            self.histograms[name].observe(value, tags={k: str(v) for k, v in tags.items()} or None)

    def answered(self, out, stateless: bool, elapsed_s: float | None, ttft_s: float | None = None) -> None:
        """A worker's ``TurnResult`` reached its client (``elapsed_s`` since the request arrived)."""
        from cluster.openai_api import cached_tokens

        cached, kv = cached_tokens(out), out.kv or {}
        self.inc("prompt_tokens", out.num_prompt_tokens)
        self.inc("prefill_tokens", out.prefill_tokens)
        self.inc("cached_tokens", cached)
        self.inc("prefix_hits", 1 if stateless and cached else 0)
        self.inc("decode_tokens", len(out.token_ids))
        for name, key in (("bytes_copied", "bytes_copied"), ("cycles", "cycles"),
                          ("late_blocks", "blocks_loaded_late"), ("misses", "misses")):
            self.inc(name, float(kv.get(key, 0) or 0))
        if kv.get("cycles"):
            self.observe("bytes_copied_per_cycle", kv.get("bytes_copied", 0) / kv["cycles"])
        if ttft_s is None and elapsed_s is not None:
            ttft_s = max(0.0, elapsed_s - out.decode_s)  # arrival until decoding began
        if ttft_s is not None:
            self.observe("time_to_first_token_seconds", ttft_s)
        if len(out.token_ids) > 1 and out.decode_s > 0:
            self.observe("inter_token_latency_seconds", out.decode_s / (len(out.token_ids) - 1))
        for phase, seconds in (getattr(out, "timings", None) or {}).items():
            self.observe("worker_phase_seconds", seconds, phase=phase)


def scrape_ray_nodes(timeout_s: float = 2.0) -> str:
    """The ``lsa_`` series of every alive node's Ray metrics port, ``ray_`` prefix dropped."""
    import ray

    out: list[str] = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        try:
            with urllib.request.urlopen(f"http://{node['NodeManagerAddress']}:{port}/metrics",
                                        timeout=timeout_s) as resp:
                text = resp.read().decode()
        except OSError:
            continue  # a node going away: its series come back with it, or never
        for line in text.splitlines():
            bare = line.split(" ", 2)[2] if line.startswith("# ") and line.count(" ") >= 2 else line
            if bare.startswith("ray_" + PREFIX):
                out.append(line.replace("ray_" + PREFIX, PREFIX, 1))
    return "\n".join(_dedup_headers(out))


def _dedup_headers(lines: list[str]) -> list[str]:
    """One HELP and one TYPE line per metric (each node repeats them)."""
    seen, kept = set(), []
    for line in lines:
        if line.startswith("#"):
            if line in seen:
                continue
            seen.add(line)
        kept.append(line)
    return kept


def sum_series(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (any labels) in a Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


GAUGES = {  # name: (description, read from, field); from each worker's WorkerStats ("worker"), its
    # memory dict ("memory"), its host copy speeds ("copy"), each node's StoreStats ("node"), or the node
    # stores summed ("stores")
    "sessions": ("Sessions the node stores hold.", "stores", "sessions"),
    "worker_sessions": ("Sessions a worker holds.", "worker", "sessions"),
    "queue_length": ("Requests waiting for admission.", "worker", "queue"),
    "running_requests": ("Requests in the batch.", "worker", "running"),
    "resident_fraction": ("Device KV over full-context KV of running requests.", "worker", "resident_fraction"),
    "device_kv_bytes": ("KV bytes on the device.", "worker", "device_kv_bytes"),
    "generated_tokens": ("Tokens generated by a worker since it started.", "worker", "generated_tokens"),
    "tokens_per_second": ("Generated tokens per busy second.", "worker", "tokens_per_s"),
    "gpu_memory_bytes": ("GPU memory a worker's torch allocated.", "memory", "gpu_allocated_bytes"),
    "pinned_host_bytes": ("Pinned host memory in a worker's torch pool (the arena not counted).", "memory",
                          "pinned_host_bytes"),
    "worker_rss_bytes": ("Resident host memory of a worker process.", "memory", "rss_bytes"),
    "arena_capacity_bytes": ("Host KV arena size, per node store.", "node", "capacity_bytes"),
    "arena_used_bytes": ("Host KV bytes held by sessions, per node store.", "node", "session_bytes"),
    "arena_free_bytes": ("Free host KV bytes, per node store.", "node", "free_bytes"),
    "store_sessions": ("Sessions a node store holds.", "node", "sessions"),
    "prefix_kv_bytes": ("Host KV bytes kept for prefix reuse, per node store.", "node", "prefix_bytes"),
    "spilled_blocks": ("Session blocks held by another node's store.", "node", "spilled_blocks"),
    "evictions": ("Idle sessions evicted since the store started, per node store.", "node", "evictions"),
    "host_copy_arena_gbps": ("GB/s from a worker's host KV arena to its GPU, measured at warm-up (CUDA).", "copy",
                             "arena"),
    "host_copy_layer_gbps": ("GB/s of one layer of each arena row to the GPU (a turn's prefix), at warm-up.", "copy",
                             "arena_layer"),
    "host_copy_pinned_gbps": ("GB/s from the worker's own page-locked memory to its GPU (the reference), at "
                              "warm-up.", "copy", "pinned"),
}


def gauges(workers: dict) -> str:
    """The state gauges (``GAUGES``) from the workers' last stats (``WorkerStats`` by replica, each
    with its node store's ``StoreStats``). Text exposition format 0.0.4."""
    stores = {w.node_id: w.store for w in workers.values() if getattr(w, "store", None) is not None}
    samples = {  # read from -> field -> [(labels, value)]
        "worker": lambda field: [({"replica": r}, getattr(w, field)) for r, w in sorted(workers.items())],
        "memory": lambda field: [({"replica": r}, w.memory.get(field, 0)) for r, w in sorted(workers.items())],
        "copy": lambda field: [({"replica": r}, getattr(w, "host_copy", {})[field]) for r, w in sorted(workers.items())
                               if field in getattr(w, "host_copy", {})],
        "node": lambda field: [({"node": n}, getattr(s, field)) for n, s in sorted(stores.items())],
        "stores": lambda field: [({}, sum(getattr(s, field) for s in stores.values()))],
    }
    lines: list[str] = []
    for name, (help, source, field) in GAUGES.items():
        lines.append(f"# HELP {PREFIX}{name} {help}")
        lines.append(f"# TYPE {PREFIX}{name} gauge")
        for labels, value in samples[source](field):
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{PREFIX}{name}{{{lab}}} {float(value):.6g}" if lab else f"{PREFIX}{name} {float(value):.6g}")
    return "\n".join(lines) + "\n"
