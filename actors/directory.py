"""The session directory: where each session's record lives, outside any ingress replica.

    ingress replica 1 --.                       .-- DecodeWorker (holder) -> node KVStore
    ingress replica 2 ---+--> SessionDirectory --'   (blocks: the node's arena)
    ...                 -'    session_id -> context ids, holder replica, node, turns

Any ingress replica serves any session: it reads the record here (without the context ids) and
passes the holder as a routing hint; a worker that must rebuild a session whose node is gone
reads the context ids here and prefills them again. The actor runs on the head node
(``HEAD``), which outlives worker nodes; ``SessionDirectoryCore`` is plain (tests drive it
without Ray). Context ids are kept packed (int32 bytes): 4 bytes a token.
"""
from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field

from actors.messages import DirectoryEntry

DIRECTORY_NAME = "lsa-sessions"
HEAD = "node:__internal_head__"  # the resource Ray gives the head node (ray._common.constants)


@dataclass
class _Entry:
    context: bytes  # int32 token ids
    replica: str | None  # the DecodeWorker replica that holds its KV
    node_id: str | None
    num_tokens: int
    turns: int = 0
    owner: str | None = None  # who created it (a digest of its API key): others are told it does not exist
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)

    def message(self, session_id: str, with_context: bool = True) -> DirectoryEntry:
        context_ids = array("i", self.context).tolist() if with_context else []
        return DirectoryEntry(session_id, context_ids, self.replica, self.node_id, self.num_tokens, self.turns,
                              self.created, self.last_used, self.owner)


class SessionDirectoryCore:
    def __init__(self):
        self.entries: dict[str, _Entry] = {}

    def create(self, session_id: str, context_ids: list[int], replica: str | None, node_id: str | None,
               owner: str | None = None) -> None:
        self.entries[session_id] = _Entry(array("i", context_ids).tobytes(), replica, node_id, len(context_ids),
                                          owner=owner)

    def get(self, session_id: str, with_context: bool = True) -> DirectoryEntry | None:
        """The session's record (with its context ids, unless ``with_context`` is False), or None
        when it is unknown."""
        entry = self.entries.get(session_id)
        return None if entry is None else entry.message(session_id, with_context)

    def served(self, session_id: str, replica: str, node_id: str) -> None:
        """A turn was answered by ``replica`` on ``node_id`` (which now holds the session)."""
        entry = self.entries.get(session_id)
        if entry is not None:
            entry.replica, entry.node_id = replica, node_id
            entry.turns += 1
            entry.last_used = time.time()

    def delete(self, session_id: str) -> DirectoryEntry | None:
        """The deleted session's record (without its context), or None when it was unknown."""
        entry = self.entries.pop(session_id, None)
        return None if entry is None else entry.message(session_id, with_context=False)

    def count(self) -> int:
        return len(self.entries)

    def expire(self, ttl_s: float, now: float | None = None) -> list[str]:
        """Forget the sessions without a turn for more than ``ttl_s`` seconds (their stores
        expire them by the same rule); returns their ids."""
        now = time.time() if now is None else now
        gone = [s for s, e in list(self.entries.items()) if now - e.last_used > ttl_s]  # a copy: others write
        return [s for s in gone if self.entries.pop(s, None) is not None]


def directory_handle(session_ttl_s: float = 0.0):
    """The cluster's directory actor (created on first use, on the head node); ``session_ttl_s``
    (> 0, used when it is created): idle sessions are forgotten after that many seconds."""
    import threading

    import ray

    @ray.remote(max_concurrency=64)
    class SessionDirectory(SessionDirectoryCore):
        def __init__(self, ttl_s: float):
            super().__init__()
            if ttl_s > 0:
                threading.Thread(target=self._expire_loop, args=(ttl_s,), name="expire", daemon=True).start()

        def _expire_loop(self, ttl_s: float) -> None:
            while True:
                time.sleep(min(10.0, max(0.05, ttl_s / 4)))
                self.expire(ttl_s)

    return SessionDirectory.options(name=DIRECTORY_NAME, get_if_exists=True, lifetime="detached", num_cpus=0,
                                    resources={HEAD: 0.001}).remote(session_ttl_s)
