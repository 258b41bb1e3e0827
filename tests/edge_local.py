"""The HTTP edge without Ray: ``build_api(Edge(...))`` served by uvicorn in a thread, over the real
decode worker code (the ``DecodeWorker`` deployment's methods around a ``DecodeWorkerCore``, an
in-process KV store, tiny random model, byte tokenizer) and the real session directory core.
Only Serve's handles are stood in for, by ``LocalHandle`` and ``LocalActor``.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import uvicorn

from actors.config import ServeConfig
from actors.decode_worker import DecodeWorkerCore
from actors.directory import SessionDirectoryCore
from actors.kv_store import KVStoreCore, arena_path
from actors.session_store import LocalStores
from actors.worker_deployment import DecodeWorker
from cluster.ingress import Edge, build_api
from engine.factory import TINY, ByteTokenizer, arena_layout, build_engine
from engine.options import build


class LocalHandle:
    """A DeploymentHandle's surface (``options(...).remote(...)``) over one local worker object."""

    def __init__(self, worker, method_name: str = "__call__", stream: bool = False):
        self.worker, self.method_name, self.stream = worker, method_name, stream
        self.session_ids: list = []

    def options(self, method_name: str | None = None, stream: bool = False, session_id: str | None = None, **_):
        handle = LocalHandle(self.worker, method_name or self.method_name, stream)
        handle.session_ids = self.session_ids
        self.session_ids.append(session_id)
        return handle

    def remote(self, *args, **kwargs):
        method = getattr(self.worker, self.method_name)
        if self.stream:
            return LocalStream(method(*args, **kwargs))
        return asyncio.ensure_future(method(*args, **kwargs))


class LocalStream:
    """A DeploymentResponseGenerator's surface: async iteration and ``cancel()``."""

    def __init__(self, agen):
        self.agen, self.cancelled = agen, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.agen.__anext__()

    def cancel(self):
        self.cancelled = True


class LocalActor:
    """An actor handle's surface (``handle.method.remote(...)`` awaited) over a plain object."""

    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        method = getattr(self.obj, name)

        class Method:
            @staticmethod
            def remote(*args, **kwargs):
                future = asyncio.get_running_loop().create_future()
                future.set_result(method(*args, **kwargs))
                return future

        return Method


def local_worker(config: ServeConfig, kv_dir: str):
    """The DecodeWorker deployment's class around a core on an in-process store (no Ray)."""
    layout = arena_layout(config.engine)
    store = KVStoreCore("local", layout, config.kv_store_bytes, arena_path("edge", "local", kv_dir),
                        LocalStores({}, spill=False))
    worker = object.__new__(DecodeWorker.func_or_class)
    worker.core = DecodeWorkerCore.build(lambda arena: build_engine(config.engine, arena), store, "local-worker")
    worker.replica, worker.node_id, worker.held = "local-worker", "local", set()
    return worker, store


@contextlib.contextmanager
def serve_edge(kv_dir: str, **args):
    """Yields ``(url, edge, worker)``: the edge on a free port, over a local worker."""
    config = build(ServeConfig, {"model": "tiny-random", "block_size": 16, "kv_store_bytes": 16 << 20,
                                 "max_num_seqs": 4, **args})
    worker, _ = local_worker(config, kv_dir)
    layout = arena_layout(config.engine)
    edge = Edge(config, ByteTokenizer(), LocalHandle(worker), LocalActor(SessionDirectoryCore()),
                max_model_len=TINY.max_position_embeddings, vocab_size=TINY.vocab_size,
                kv_bytes_per_token=layout.block_bytes // layout.block_size, ray_metrics=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_api(edge), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", edge, worker
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        worker.core.close()
