"""``KVStore``: the Ray actor around ``KVStoreCore`` (actors/kv_store.py), exactly one per node
(``ensure_per_node``, actors/placement.py). Its arena file has a name of its own per incarnation
and goes with the process however it ends; the leases of workers whose actor died are freed."""
from __future__ import annotations

import atexit
import contextlib
import glob
import os
import subprocess
import threading
import time
import uuid

from actors import lazy_attr
from actors.kv_store import KVStoreCore, arena_path
from actors.messages import ArenaInfo
from engine.host_arena import ArenaLayout


def unlink_when_dead(path: str) -> subprocess.Popen:
    """A tiny watcher that removes ``path`` once this process is gone, however it goes (a
    ``ray.kill`` or SIGKILL runs no atexit): it reads its stdin, a pipe from this process, until
    EOF. Keep the returned object alive as long as the file should stay."""
    return subprocess.Popen(["sh", "-c", 'read _ignored; rm -f "$0"', path], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _make_actor():
    import ray

    from actors.session_store import RayStores

    @ray.remote(max_concurrency=16)
    class KVStore(KVStoreCore):
        """One per node: ``ensure_per_node(KVStore, "kvstore", cluster, capacity, layout, ...)``."""

        def __init__(self, cluster: str, capacity_bytes: int, layout: ArenaLayout, directory: str | None = None,
                     session_ttl_s: float = 0.0):
            context = ray.get_runtime_context()
            node_id = context.get_node_id()
            stale = glob.glob(arena_path(cluster, node_id, directory).removesuffix(".arena") + "*.arena")
            path = arena_path(cluster, node_id, directory, uuid.uuid4().hex[:8])
            super().__init__(node_id, layout, capacity_bytes, path, stores=RayStores(context.namespace))
            for old in stale:  # arenas of stores that died here; workers mapping one keep their mapping
                with contextlib.suppress(OSError):
                    os.unlink(old)
            self._watcher = unlink_when_dead(path)  # the arena goes with this process, however it ends
            atexit.register(self.close)
            self.owners: dict[str, str] = {}  # lease owner -> actor id, to reap dead workers
            if session_ttl_s > 0:
                threading.Thread(target=self._expire_loop, args=(session_ttl_s,), name="expire",
                                 daemon=True).start()

        def _expire_loop(self, ttl_s: float) -> None:
            while True:
                time.sleep(min(10.0, max(0.05, ttl_s / 4)))
                self.expire(ttl_s)

        def ping(self) -> str:
            """Answers at once (health checks): the node id."""
            return self.node_id

        def attach(self, owner: str, actor_id: str | None) -> ArenaInfo:
            """A worker starts: its leases are freed when its actor dies."""
            self.reap()
            if actor_id:
                self.owners[owner] = actor_id
            return self.info()

        def reap(self) -> int:
            """Free the leases of workers whose actor died."""
            freed = 0
            for owner, actor_id in list(self.owners.items()):
                info = ray._private.state.state.actor_table(actor_id)
                if info and info.get("State") == "DEAD":
                    freed += self.drop_owner(owner)
                    del self.owners[owner]
            return freed

        def lease(self, owner: str, n: int) -> list[int]:
            if self.table.num_free < n:
                self.reap()  # blocks leased to dead workers first
            return super().lease(owner, n)

    return KVStore


__getattr__ = lazy_attr("KVStore", _make_actor)
