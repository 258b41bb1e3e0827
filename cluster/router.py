"""KV-locality request router for Ray Serve 2.60 (``ray.serve.request_router``).

A session's KV lives with one DecodeWorker replica (and that node's KVStore), so every
request of the session must go back there; a new session goes to the replica with the
most free KV capacity. A request without a session (an OpenAI completion or chat) goes to
the replica whose store holds the longest prefix of its prompt (prefix blocks, keyed by
block hash chains: engine/prefix.py), as Ray Serve's prefix-aware router does for its LLM
apps, else to the shortest queue among the replicas with room. The router runs inside each process that holds a handle to
the worker deployment (the ingress replicas, or the driver in tests), one instance per
handle.

What the router knows, per replica (docs/cluster.md):

    replica_metadata  {"kv_capacity_bytes": int}        once, from record_replica_metadata()
    replica_metadata  {"block_size": int}              for the prompt's block hash chain
    routing_stats     {"sessions": [id, ...],          every request_routing_stats_period_s,
                       "prefixes": [key, ...],          from record_routing_stats(): the routing
                       "free_kv_bytes": int}            keys of the prefix blocks its store holds
    its own records   session -> replica it routed there, and the bytes it reserved for
                      new sessions that the replica's stats do not show yet; prompt routing
                      key -> replica it routed that prompt to

Holder hint: the keyword argument ``holder`` (a replica's unique id, from the session
directory), so that an ingress replica that never routed the session, and whose stats
are not fresh yet, still finds the holder.

Routing key: ``RequestMetadata.session_id`` (``handle.options(session_id=...)``, or the
HTTP header ``x-session-id`` at the proxy), else the keyword argument ``session_id``.
A request without a key is routed by its prompt (the keyword argument ``prompt_ids``, or a
first positional argument that is a list of token ids): the replica holding the deepest of the
prompt's routing keys (the chain keys at block depths 1, 2, 4, ...) ranks first, the others
follow by free capacity (so a busy holder passes the request on); with no holder, the
replicas with room (at least half the most free KV) share the first rank, where Serve picks
the shortest queue (``spread``): such a request's KV lives only while it runs.

Deliberately not mixed in: ``FIFOMixin`` (it hands the chosen replica to the *oldest*
pending request, which may belong to another session) and ``LocalityMixin`` (KV
locality beats network locality).
"""
from __future__ import annotations

import random
import time
import weakref
from collections import Counter, OrderedDict, defaultdict
from typing import Dict, List, Optional, Tuple

from engine.prefix import block_hashes, routing_depths, routing_keys
from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

SESSIONS = "sessions"
PREFIXES = "prefixes"
BLOCK_SIZE = "block_size"
FREE_KV_BYTES = "free_kv_bytes"
KV_CAPACITY_BYTES = "kv_capacity_bytes"


class KVLocalityRouter(RequestRouter):
    """Session affinity first, then most free KV capacity (a stateless request: the replica
    holding its prompt's longest prefix, else the shortest queue among the replicas with room).

    ``request_router_kwargs``: ``session_kwarg`` (default ``"session_id"``), ``size_kwarg``
    (keyword argument carrying a new session's expected KV bytes, default ``"kv_bytes"``),
    ``reservation_ttl_s`` (how long a reservation waits for the replica's stats to show
    the session, default 60), ``max_sessions`` (size of the local session table),
    ``holder_kwarg`` (keyword argument naming the holder replica's unique id: a hint from a
    shared session record, default ``"holder"``), ``prompt_kwarg`` (a stateless request's
    token ids, default ``"prompt_ids"``), ``min_match_rate`` (the least share of a prompt's
    blocks a holder's prefix must cover to attract it, default 0.1 as Ray's prefix-aware router).
    """

    def initialize_state(self, session_kwarg: str = "session_id", size_kwarg: str = "kv_bytes",
                         holder_kwarg: str = "holder", prompt_kwarg: str = "prompt_ids",
                         min_match_rate: float = 0.1,
                         reservation_ttl_s: float = 60.0, max_sessions: int = 200_000):
        self._session_kwarg = session_kwarg
        self._prompt_kwarg = prompt_kwarg
        self._min_match_rate = min_match_rate
        self._prefix_owner: "OrderedDict[str, ReplicaID]" = OrderedDict()  # prompt routing key -> replica
        self._keys_on: Counter = Counter()  # replica -> routing keys it holds by _prefix_owner
        self._size_kwarg = size_kwarg
        self._holder_kwarg = holder_kwarg
        self._reservation_ttl_s = reservation_ttl_s
        self._max_sessions = max_sessions
        self._owner: "OrderedDict[str, ReplicaID]" = OrderedDict()
        # replica -> session_id -> (bytes, time reserved)
        self._reserved: Dict[ReplicaID, Dict[str, Tuple[int, float]]] = defaultdict(dict)
        # id(pending request) -> (a weak reference to it, its prompt keys): hashed once, when first routed, not again when
        # Serve asks again (a busy replica) or when it is routed
        self._prompt_keys: "OrderedDict[int, tuple]" = OrderedDict()

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

        ranked = sorted(candidate_replicas, key=rank)
        if session_id is None:
            holder = self.prefix_holder(pending_request, candidate_replicas)
            if holder is not None:
                return [[holder]] + [[replica] for replica in ranked if replica is not holder]
            return self.spread(ranked)
        return [[replica] for replica in ranked]

    def spread(self, ranked: List[RunningReplica]) -> List[List[RunningReplica]]:
        """Ranks for a request without a session whose prompt no replica holds (a new
        conversation): every replica with room (at least half the most free KV, or not reported
        yet) is in the first rank, where Serve picks the shortest queue (the first of equal
        ones); the rest follow one by one, most free first. Within the first rank the replicas
        this router has placed the fewest prompts on come first (counted by the routing keys it
        recorded), equal ones in random order: two new conversations on idle replicas go to
        two replicas, where the published free KV (reported every few seconds) would not yet
        tell them apart. (Ranking these by free KV alone sent every such request to one replica
        while the others idled.)"""
        frees = [self.free_bytes(replica) for replica in ranked]
        known = [free for free in frees if free is not None]
        most = max(known, default=0.0)
        floor = most / 2 if most > 0 else most
        roomy = [free is None or free >= floor for free in frees]
        first = [replica for replica, ok in zip(ranked, roomy) if ok]
        random.shuffle(first)  # Serve takes the first of equal queues: idle replicas share the load
        first.sort(key=lambda replica: self._keys_on[replica.replica_id])  # stable: random among equals
        return [first] + [[replica] for replica, ok in zip(ranked, roomy) if not ok]

    def prompt_keys(self, pending_request: Optional[PendingRequest]) -> Tuple[List[str], int]:
        """The routing keys of a request's prompt (engine/prefix.py: the chain keys at block
        depths 1, 2, 4, ...), shallowest first, and the prompt's number of complete blocks."""
        if pending_request is None:
            return [], 0
        cached = self._prompt_keys.get(id(pending_request))
        if cached is not None and cached[0]() is pending_request:
            return cached[1]
        keys = self._hash_prompt(pending_request)
        if keys[0]:
            self._prompt_keys[id(pending_request)] = (weakref.ref(pending_request), keys)
            while len(self._prompt_keys) > 256:
                self._prompt_keys.popitem(last=False)
        return keys

    def _hash_prompt(self, pending_request: PendingRequest) -> Tuple[List[str], int]:
        prompt = pending_request.kwargs.get(self._prompt_kwarg)
        if prompt is None and pending_request.args and isinstance(pending_request.args[0], list):
            prompt = pending_request.args[0]
        block_size = next((r.replica_metadata.get(BLOCK_SIZE) for r in self._replicas_list
                           if r.replica_metadata.get(BLOCK_SIZE)), None)
        if not prompt or not block_size or not isinstance(prompt[0], int):
            return [], 0
        num_blocks = len(prompt) // block_size
        depths = routing_depths(num_blocks)
        return routing_keys(block_hashes(prompt, block_size, depths[-1] if depths else 0)), num_blocks

    def prefix_holder(self, pending_request: Optional[PendingRequest],
                      candidate_replicas: List[RunningReplica]) -> Optional[RunningReplica]:
        """The candidate holding the deepest routing key of the request's prompt, by this
        router's own record (newer than any stats), else by what replicas publish; only keys
        deep enough to cover ``min_match_rate`` of the prompt count."""
        keys, num_blocks = self.prompt_keys(pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        published = [(r, set(r.routing_stats.get(PREFIXES, ()))) for r in candidate_replicas]
        for depth, key in reversed(list(zip(routing_depths(num_blocks), keys))):
            if depth < self._min_match_rate * num_blocks:
                break
            owner = by_id.get(self._prefix_owner.get(key))
            if owner is not None:
                return owner
            for replica, held in published:
                if key in held:
                    return replica
        return None

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        session_id = self.session_key(pending_request)
        if session_id is None:
            keys = self.prompt_keys(pending_request)[0]
            self._prompt_keys.pop(id(pending_request), None)
            for key in keys:  # its blocks will be held there
                previous = self._prefix_owner.get(key)
                if previous != replica_id:
                    if previous is not None:
                        self._keys_on[previous] -= 1
                    self._keys_on[replica_id] += 1
                self._prefix_owner[key] = replica_id
                self._prefix_owner.move_to_end(key)
            while len(self._prefix_owner) > self._max_sessions:
                self._keys_on[self._prefix_owner.popitem(last=False)[1]] -= 1
            return
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
        for key in [k for k, r in self._prefix_owner.items() if r == replica_id]:
            del self._prefix_owner[key]
        self._keys_on.pop(replica_id, None)
