"""``cluster:app``: the Ray Serve application (``serve run cluster:app model=... policy=...``,
``serve deploy serve_config.yaml``).

    HTTP -> Ingress (cluster/ingress.py: FastAPI over the protocol of cluster/protocol.py)
              | DeploymentHandle, KVLocalityRouter (session -> holder, new -> most free KV)
              v
            DecodeWorker replicas (actors/worker_deployment.py) -> node KVStore, Indexer (actors/)
            (tensor_parallel_size > 1: actors/tp_deployment.py, each replica over P rank actors)

With ``prefill_workers > 0`` (disaggregated prefill, docs/cluster.md) the ingress also holds
a handle to ``PrefillWorker`` replicas (the same class in the prefill role, placed by the
``prefill_*`` resources): ``POST /v1/sessions`` goes there (most free KV first), and the
session's turns go to the decode workers, which adopt it from the store.

The application's arguments are ``AppArgs``: a pydantic model generated from ServeConfig's flat
options (engine/options.py), so Serve validates them (types, unknown names with a did-you-mean)
before the builder runs, and no field is written twice. ``decode_autoscaling`` (a dict, as
Serve's ``autoscaling_config``) scales the decode workers instead of ``num_workers``.
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from ray import serve
from ray.serve.config import RequestRouterConfig

from actors.config import ServeConfig
from actors.worker_deployment import PREFILL, DecodeWorker, indexer_handle, place_stores
from engine.options import build, options


def parse_args(args: "dict | AppArgs | ServeConfig | None") -> ServeConfig:
    """Application arguments (``serve run cluster:app key=value``, a config file's ``args``, or
    ``lsa serve key=value``) as the one ServeConfig."""
    if isinstance(args, ServeConfig):
        return args
    if isinstance(args, BaseModel):
        return args.config
    return build(ServeConfig, dict(args or {}))


class _AppArgsBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known(cls, values: Any):
        values = dict(values or {})
        build(ServeConfig, {k: v for k, v in values.items() if k != "decode_autoscaling"})  # did-you-mean
        return values

    @property
    def config(self) -> ServeConfig:
        given = {k: getattr(self, k) for k in self.model_fields_set if k != "decode_autoscaling"}
        return build(ServeConfig, given)


def _app_args_model() -> type[BaseModel]:
    """``AppArgs``: one field per ServeConfig option (its default and help), values parsed by the
    option's own type (``"16"`` from a command line, 16 from YAML); and ``decode_autoscaling``."""
    fields: dict = {o.name: (Any, Field(o.default, description=o.help)) for o in options(ServeConfig)}
    fields["decode_autoscaling"] = (Optional[dict], Field(None, description=(
        "Serve autoscaling_config of the decode workers (min_replicas, max_replicas, target_ongoing_requests, "
        "...); replaces num_workers")))
    return create_model("AppArgs", __base__=_AppArgsBase, **fields)


AppArgs = _app_args_model()


@serve.ingress()
class Ingress:
    """One HTTP ingress replica: an ``Edge`` over the decode workers' handle (and the prefill
    workers', when there are any)."""

    def __init__(self, worker, config: ServeConfig, prefill=None):
        from actors.directory import directory_handle
        from cluster.ingress import Edge
        from engine.factory import arena_layout, load_tokenizer, model_layout

        mc, _ = model_layout(config.engine)
        layout = arena_layout(config.engine)
        max_model_len = min(config.engine.scheduler.max_model_len or mc.max_position_embeddings,
                            mc.max_position_embeddings)
        self.config, self.layout = config, layout
        self.edge = Edge(config, load_tokenizer(config.engine), worker, directory_handle(config.session_ttl_s),
                         indexer=indexer_handle(), prefill=prefill,
                         replica=serve.get_replica_context().replica_id.unique_id, max_model_len=max_model_len,
                         vocab_size=mc.vocab_size, kv_bytes_per_token=layout.block_bytes // layout.block_size)

    def __serve_build_asgi_app__(self):
        from cluster.ingress import build_api

        api = build_api(self.edge)
        if self.config.tensor_parallel_size == 1:  # tensor-parallel ranks keep their own stores (docs/parallel.md)
            self._placer = asyncio.get_event_loop().create_task(self._place_stores())
        return api

    async def _place_stores(self, period_s: float = 10.0) -> None:
        """A node that joins later gets its KV store within seconds (actors/placement.py)."""
        while True:
            try:
                await asyncio.to_thread(place_stores, self.config, self.layout)
            except Exception:  # noqa: BLE001 - a node going away mid-pass; the next pass retries
                pass
            await asyncio.sleep(period_s)


def drain_on_sigterm_under_serve_run() -> bool:
    """``serve run cluster:app ...`` calls this builder in its main thread before it starts Ray;
    ``ray.init`` then installs a SIGTERM handler that aborts the driver (no drain: requests in
    flight are cut). A hook run at the end of ``ray.init`` (Ray's ``_post_init_hooks``) puts a
    handler after it that turns SIGTERM into Ctrl-C, on which ``serve run`` shuts Serve down
    gracefully, as on SIGINT. Nothing when Ray is already up (``lsa serve``, tests, a config file
    built by the controller): those stop their own way. True when the hook was registered."""
    import signal
    import threading

    import ray

    hooks = getattr(getattr(ray, "_private", None) and ray._private.worker, "_post_init_hooks", None)
    if ray.is_initialized() or threading.current_thread() is not threading.main_thread() or hooks is None:
        return False

    def on_term(*_):
        raise KeyboardInterrupt("SIGTERM")

    def install():
        hooks.remove(install)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)

    hooks.append(install)
    return True


def app(args: AppArgs):
    """The application builder Serve calls with the (validated) arguments."""
    drain_on_sigterm_under_serve_run()
    if not isinstance(args, BaseModel):
        args = AppArgs.model_validate(dict(args or {}))
    config = args.config
    router = RequestRouterConfig(request_router_class="cluster.router:KVLocalityRouter",
                                 request_routing_stats_period_s=config.routing_stats_period_s)
    scaling = ({"autoscaling_config": args.decode_autoscaling} if args.decode_autoscaling
               else {"num_replicas": config.num_workers})
    if config.tensor_parallel_size > 1:  # each replica over a placement group of its ranks (docs/parallel.md)
        from actors.tp_deployment import TensorParallelWorker, check_tensor_parallel, deployment_options

        check_tensor_parallel(config)
        worker = TensorParallelWorker.options(request_router_config=router, **deployment_options(config),
                                              **scaling).bind(config)
    else:
        worker = DecodeWorker.options(ray_actor_options=_actor_options(config.worker_num_cpus,
                                                                       config.worker_num_gpus,
                                                                       config.worker_resources),
                                      request_router_config=router, **scaling).bind(config)
    prefill = None
    if config.prefill_workers:  # the same class in the prefill role, a deployment of its own
        prefill = DecodeWorker.options(name="PrefillWorker", num_replicas=config.prefill_workers,
                                       ray_actor_options=_actor_options(config.prefill_num_cpus,
                                                                        config.prefill_num_gpus,
                                                                        config.prefill_resources),
                                       request_router_config=router).bind(config, role=PREFILL)
    ingress_options = {"num_cpus": 0, **({"resources": config.ingress_resources} if config.ingress_resources else {})}
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=config.num_ingress, max_ongoing_requests=256,
                               ray_actor_options=ingress_options)
    return ingress.bind(worker, config, prefill)


def _actor_options(num_cpus: float, num_gpus: float, resources: dict) -> dict:
    return {"num_cpus": num_cpus, "num_gpus": num_gpus, **({"resources": resources} if resources else {})}


__all__ = ["app", "AppArgs", "parse_args", "Ingress"]
