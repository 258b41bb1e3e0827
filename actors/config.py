"""The serving config: the engine's config plus what a cluster needs around it.

``serve run cluster:app block_size=16 budget=0.1 num_workers=2``, ``lsa serve ...`` and a
``serve_config.yaml``'s ``args`` all become one ``ServeConfig`` through engine/options.py:
every field of ``EngineConfig`` is an argument under its flat name, beside the fields below.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig, option
from engine.errors import InvalidRequestError


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    num_workers: int = option(1, "decode worker replicas (one per GPU, or per tensor_parallel_size GPUs)")
    tensor_parallel_size: int = option(1, "GPUs (ranks) per decode worker replica, the model split over them "
                                          "(docs/parallel.md); above 1: sessions live in the replica's ranks")
    num_ingress: int = option(1, "HTTP ingress replicas")
    kv_store_bytes: int = option(1 << 30, "host KV arena of each node's store, in bytes (tensor_parallel_size "
                                       "> 1: of each replica, split over its ranks)")
    kv_dir: str | None = option(None, "where stores create their arenas (default: LSA_KV_DIR, else /dev/shm)")
    cluster: str = option("lsa", "names the arenas: two apps on one machine do not share one")
    api_keys: list = option([], "accepted API keys (comma-separated); none: no authentication")
    admin_api_keys: list = option([], "keys for /metrics (comma-separated); none: /metrics is open only when "
                                  "api_keys is empty too")
    max_body_bytes: int = option(32 << 20, "largest request body in bytes (413 above)")
    worker_num_cpus: float = option(1.0, "CPUs each decode worker reserves (with tensor_parallel_size > 1: the "
                                         "replica and each of its ranks)")
    worker_num_gpus: float = option(0.0, "GPUs each decode worker reserves (1 on GPU nodes; with "
                                         "tensor_parallel_size > 1: each rank)")
    worker_resources: dict = option({}, "custom resources each decode worker reserves (name=amount,...)")
    prefill_workers: int = option(0, "prefill worker replicas: they create (prefill) sessions, decode workers take "
                                     "the turns (docs/cluster.md, Disaggregated prefill); 0: decode workers prefill")
    prefill_num_cpus: float = option(1.0, "CPUs each prefill worker reserves")
    prefill_num_gpus: float = option(0.0, "GPUs each prefill worker reserves (1 on GPU nodes)")
    prefill_resources: dict = option({}, "custom resources each prefill worker reserves (e.g. a prefill node group)")
    ingress_resources: dict = option({}, "custom resources each ingress replica reserves (e.g. a CPU node group)")
    torch_threads: int | None = option(None, "CPU threads for torch in each worker (default: torch's)")
    routing_stats_period_s: float = option(1.0, "how often workers publish their sessions and free KV to routers")
    default_max_tokens: int = option(128, "max_tokens of a request that gives none")
    session_ttl_s: float = option(3600.0, "a session idle this long (seconds, refreshed by each turn) is deleted "
                                          "from its store and the directory; 0: never")
    prefix_reuse: bool = option(True, "keep finished requests' KV blocks in the store and reuse them for prompts "
                                      "that start with the same tokens (routed to their holder)")

    def __post_init__(self):
        if self.num_workers < 1 or self.num_ingress < 1:
            raise InvalidRequestError("num_workers and num_ingress must be >= 1")
        if self.tensor_parallel_size < 1:
            raise InvalidRequestError("tensor_parallel_size must be >= 1 (1: one GPU per decode worker)")
        if self.tensor_parallel_size > 1 and self.prefill_workers:
            raise InvalidRequestError("prefill_workers needs sessions, which tensor-parallel decode workers "
                                      "(tensor_parallel_size > 1) do not serve yet: set prefill_workers=0")
        if self.tensor_parallel_size > 1 and self.worker_num_cpus <= 0:
            raise InvalidRequestError("with tensor_parallel_size > 1, worker_num_cpus must be > 0 (the replica "
                                      "and each rank reserve that many CPUs in the replica's placement group)")
        if self.prefill_workers < 0:
            raise InvalidRequestError("prefill_workers must be >= 0 (0: no prefill workers, decode workers prefill)")
        if self.kv_store_bytes < 1:
            raise InvalidRequestError("kv_store_bytes must be positive")
        if self.max_body_bytes < 1:
            raise InvalidRequestError("max_body_bytes must be positive")
        if self.default_max_tokens < 1:
            raise InvalidRequestError("default_max_tokens must be >= 1")
        if self.session_ttl_s < 0:
            raise InvalidRequestError("session_ttl_s must be >= 0 (0: sessions never expire)")


__all__ = ["ServeConfig"]
