"""The session directory: where each session's record lives, outside any ingress replica.

    ingress replica 1 --.                       .-- DecodeWorker (holder) -> node KVStore
    ingress replica 2 ---+--> SessionDirectory --'   (blocks: the node's arena)
    ...                 -'    sid -> context ids, holder replica, node, turns

Any ingress replica serves any session: it reads the record here, passes the holder as a
routing hint, and the context ids along with the turn, so that a worker can rebuild a
session whose node is gone by prefilling it again. The actor runs on the head node
(``HEAD``), which outlives worker nodes; ``SessionDirectoryCore`` is plain (tests drive it
without Ray). Context ids are kept packed (int32 bytes): 4 bytes a token.
"""
from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field

DIRECTORY_NAME = "lsa-sessions"
HEAD = "node:__internal_head__"  # the resource Ray gives the head node (ray._common.constants)


@dataclass
class SessionEntry:
    id: str
    context: bytes  # int32 token ids
    replica: str | None = None  # the DecodeWorker replica that holds its KV
    node: str | None = None
    num_tokens: int = 0
    turns: int = 0
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)

    def record(self, with_context: bool = True) -> dict:
        out = {"id": self.id, "replica": self.replica, "node": self.node, "num_tokens": self.num_tokens,
               "turns": self.turns, "created": self.created, "last_used": self.last_used}
        if with_context:
            out["context_ids"] = array("i", self.context).tolist()
        return out


class SessionDirectoryCore:
    def __init__(self):
        self.entries: dict[str, SessionEntry] = {}

    def create(self, sid: str, context_ids: list[int], replica: str | None, node: str | None) -> None:
        self.entries[sid] = SessionEntry(sid, array("i", context_ids).tobytes(), replica, node, len(context_ids))

    def get(self, sid: str) -> dict | None:
        """The session's record with its context ids, or None when it is unknown."""
        entry = self.entries.get(sid)
        return None if entry is None else entry.record()

    def served(self, sid: str, replica: str, node: str) -> None:
        """A turn was answered by ``replica`` on ``node`` (which now holds the session)."""
        entry = self.entries.get(sid)
        if entry is not None:
            entry.replica, entry.node = replica, node
            entry.turns += 1
            entry.last_used = time.time()

    def delete(self, sid: str) -> dict | None:
        entry = self.entries.pop(sid, None)
        return None if entry is None else entry.record(with_context=False)

    def count(self) -> int:
        return len(self.entries)


def directory_handle():
    """The cluster's directory actor (created on first use, on the head node)."""
    import ray

    @ray.remote(max_concurrency=64)
    class SessionDirectory(SessionDirectoryCore):
        pass

    return SessionDirectory.options(name=DIRECTORY_NAME, get_if_exists=True, lifetime="detached", num_cpus=0,
                                    resources={HEAD: 0.001}).remote()
