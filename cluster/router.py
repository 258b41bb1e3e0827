"""KV-locality request router for Ray Serve 2.60 (``ray.serve.request_router``).

A session's KV lives with one DecodeWorker replica (and that node's KVStore), so every
request of the session must go back there; a new session goes to the replica with the
most free KV capacity. The router runs inside each process that holds a handle to the
worker deployment (the ingress replicas, or the driver in tests), one instance per
handle.

What the router knows, per replica (docs/cluster.md):

    replica_metadata  {"kv_capacity_bytes": int}        once, from record_replica_metadata()
    routing_stats     {"sessions": [id, ...],          every request_routing_stats_period_s,
                       "free_kv_bytes": int}            from record_routing_stats()
    its own records   session -> replica it routed there, and the bytes it reserved for
                      new sessions that the replica's stats do not show yet

Holder hint: the keyword argument ``holder`` (a replica's unique id, from the session
directory), so that an ingress replica that never routed the session, and whose stats
are not fresh yet, still finds the holder.

Routing key: ``RequestMetadata.session_id`` (``handle.options(session_id=...)``, or the
HTTP header ``x-session-id`` at the proxy), else the keyword argument ``session_id``.
A request without a key is placed like a new session (most free capacity).

Deliberately not mixed in: ``FIFOMixin`` (it hands the chosen replica to the *oldest*
pending request, which may belong to another session) and ``LocalityMixin`` (KV
locality beats network locality).
"""
from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional, Tuple

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

SESSIONS = "sessions"
FREE_KV_BYTES = "free_kv_bytes"
KV_CAPACITY_BYTES = "kv_capacity_bytes"


class KVLocalityRouter(RequestRouter):
    """Session affinity first, then most free KV capacity.

    ``request_router_kwargs``: ``session_kwarg`` (default ``"session_id"``), ``size_kwarg``
    (keyword argument carrying a new session's expected KV bytes, default ``"kv_bytes"``),
    ``reservation_ttl_s`` (how long a reservation waits for the replica's stats to show
    the session, default 60), ``max_sessions`` (size of the local session table),
    ``holder_kwarg`` (keyword argument naming the holder replica's unique id: a hint from a
    shared session record, default ``"holder"``).
    """

    def initialize_state(self, session_kwarg: str = "session_id", size_kwarg: str = "kv_bytes",
                         holder_kwarg: str = "holder",
                         reservation_ttl_s: float = 60.0, max_sessions: int = 200_000):
        self._session_kwarg = session_kwarg
        self._size_kwarg = size_kwarg
        self._holder_kwarg = holder_kwarg
        self._reservation_ttl_s = reservation_ttl_s
        self._max_sessions = max_sessions
        self._owner: "OrderedDict[str, ReplicaID]" = OrderedDict()
        # replica -> session_id -> (bytes, time reserved)
        self._reserved: Dict[ReplicaID, Dict[str, Tuple[int, float]]] = defaultdict(dict)

    # -- what the router knows -------------------------------------------------------------

    def session_key(self, pending_request: Optional[PendingRequest]) -> Optional[str]:
        if pending_request is None:
            return None
        key = pending_request.metadata.session_id or pending_request.kwargs.get(self._session_kwarg)
        return str(key) if key else None

    def holder(self, session_id: str, hint: Optional[str] = None) -> Optional[ReplicaID]:
        """The live replica that holds ``session_id``: the ``hint`` (a replica's unique id, from
        the session directory that every ingress replica shares), then this router's own
        record (newer than any stats), then the sessions replicas publish."""
        if hint:
            for replica_id in self._replicas:
                if replica_id.unique_id == hint:
                    return replica_id
        replica_id = self._owner.get(session_id)
        if replica_id in self._replicas:
            return replica_id
        for replica in self._replicas_list:
            if session_id in replica.routing_stats.get(SESSIONS, ()):
                return replica.replica_id
        return None

    def free_bytes(self, replica: RunningReplica) -> Optional[float]:
        """Free KV bytes: the replica's last report (or its capacity when it has not
        reported yet) less what this router placed there since. None when unknown."""
        published = replica.routing_stats.get(SESSIONS, ())
        reserved = self._reserved.get(replica.replica_id, {})
        now = time.monotonic()
        for session_id in [s for s, (_, t) in reserved.items()
                        if s in published or now - t > self._reservation_ttl_s]:
            del reserved[session_id]
        free = replica.routing_stats.get(FREE_KV_BYTES,
                                         replica.replica_metadata.get(KV_CAPACITY_BYTES))
        if free is None:
            return None
        return free - sum(size for size, _ in reserved.values())

    # -- the RequestRouter interface -------------------------------------------------------

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        """Ranks, best first; Serve tries each rank in turn (the shortest queue within a
        rank), then backs off and asks again. A held session gets one rank with only its
        holder: if it is busy the request waits for it rather than lose its KV."""
        if pending_request is not None:
            # Serve asks again when every rank refused; without this flag it asks again at
            # once, a busy loop that starves the router's event loop (the queue-length probes
            # never answer). The n=2 hang once blamed on it was two calls sharing one internal
            # request id: cluster.taxonomy.own_request
            pending_request.routing_context.should_backoff = True
        session_id = self.session_key(pending_request)
        if session_id is not None:
            replica_id = self.holder(session_id, pending_request.kwargs.get(self._holder_kwarg))
            for replica in candidate_replicas:
                if replica.replica_id == replica_id:
                    return [[replica]]

        def rank(replica: RunningReplica):
            free = self.free_bytes(replica)
            unknown_first = float("-inf") if free is None else -free
            return unknown_first, len(self._reserved.get(replica.replica_id, ())), \
                replica.replica_id.unique_id

        return [[replica] for replica in sorted(candidate_replicas, key=rank)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        session_id = self.session_key(pending_request)
        if session_id is None or self._owner.get(session_id) == replica_id:
            if session_id is not None:
                self._owner.move_to_end(session_id)
            return
        self._owner[session_id] = replica_id
        self._owner.move_to_end(session_id)
        while len(self._owner) > self._max_sessions:
            self._owner.popitem(last=False)
        size = pending_request.kwargs.get(self._size_kwarg) or 0
        self._reserved[replica_id][session_id] = (int(size), time.monotonic())

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._reserved.pop(replica_id, None)
        for session_id in [s for s, r in self._owner.items() if r == replica_id]:
            del self._owner[session_id]
