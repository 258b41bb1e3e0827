"""A tensor-parallel engine on Ray: P rank actors in one placement group, driven in lockstep.

As vLLM's Ray executor does, the driver owns (or is given) a STRICT_PACK placement group of P
bundles, one rank actor per bundle; rank 0 names the rendezvous (its node address and a free
port) and every rank joins one torch.distributed group (NCCL on CUDA, gloo on CPU). The driver
sends every rank the same call through one choke point, ``_call_all(method, *args)``, and
returns rank 0's answer (the logits are all-gathered, so every rank computes the same tokens).

A rank that dies or does not answer within ``call_timeout_s`` fails the whole group: the driver
kills every rank (a survivor may be blocked in a collective) and raises
``TensorParallelGroupError`` now and on every later call. A request every rank refuses alike
(an ``LSAError`` such as an empty prompt) is raised as itself and the group stays usable.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.messages import StoreStats
from actors.tp_sessions import SessionRank
from engine.config import EngineConfig
from engine.errors import LSAError, UnavailableError
from engine.parallel.rank import TokenUpdate, free_port
from engine.sampling import SamplingParams


class TensorParallelGroupError(UnavailableError, RuntimeError):
    """A rank of the tensor-parallel group died or stopped answering: the group is gone (HTTP 503:
    a served replica's health check then fails, and Serve replaces it with a new group)."""

    code = "tensor_parallel_group_failed"


@dataclass(frozen=True)
class RankRefusal:
    """A rank refused a call with a typed error before any collective ran."""

    error: LSAError


@ray.remote
class RankActor:
    """A thin actor around ``SessionRank`` (a ``RankWorker``): every call goes through ``execute``."""

    def __init__(self, rank: int, size: int):
        self.worker = SessionRank(rank, size)

    def rendezvous(self) -> tuple[str, int]:
        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def execute(self, method: str, *args):
        try:
            return getattr(self.worker, method)(*args)
        except LSAError as exc:
            return RankRefusal(exc)


@dataclass(frozen=True)
class RankResources:
    """What each rank's bundle asks for: one GPU per rank on CUDA, CPUs only on CPU."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def bundle(self) -> dict:
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {})}


class TensorParallelEngine:
    """``size`` rank actors that build ``make_model(device, dtype)`` sharded with ``config``.

    ``placement_group``: the group to place the ranks in, bundles ``first_bundle ..
    first_bundle + size - 1`` (a Serve replica passes its own); None makes and owns one.
    ``store_bytes``: each rank's KV store (actors/tp_sessions.py), for sessions; 0: none."""

    def __init__(self, size: int, make_model: Callable, config: EngineConfig, tokenizer=None,
                 resources: RankResources = RankResources(), call_timeout_s: float = 120.0,
                 placement_group=None, first_bundle: int = 0, store_bytes: int = 0):
        if size < 1:
            raise ValueError(f"tensor-parallel size must be >= 1, got {size}")
        self.size = size
        self.call_timeout_s = call_timeout_s
        self._failure: str | None = None
        self._owns_group = placement_group is None
        if placement_group is None:
            placement_group = _make_placement_group(size, resources, call_timeout_s)
        self.placement_group = placement_group
        self.ranks = [
            RankActor.options(
                num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=first_bundle + rank),
            ).remote(rank, size)
            for rank in range(size)]
        try:
            host, port = self._get([self.ranks[0].rendezvous.remote()], "rendezvous")[0]
            self._call_all("join", host, port, config.device_name, call_timeout_s)
            self.build(make_model, config, tokenizer, store_bytes)
        except BaseException:
            self.shutdown()
            raise

    @property
    def failure(self) -> str | None:
        """Why the group is gone (later calls raise ``TensorParallelGroupError``); None while it serves."""
        return self._failure

    # ------------------------------------------------------------ lockstep calls

    def build(self, make_model: Callable, config: EngineConfig, tokenizer=None, store_bytes: int = 0) -> None:
        """A new engine shard on every rank (same group; earlier requests and sessions are dropped)."""
        self._call_all("build", make_model, config, tokenizer, store_bytes)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str) -> str:
        return self._call_all("add_request", prompt, params, request_id)

    def abort(self, request_id: str) -> bool:
        """Finish a running request on every rank (its KV freed); False when none runs by that id."""
        return self._call_all("abort", request_id)

    def create_session(self, session_id: str, context_ids: list[int], request_id: str) -> str:
        """Prefill the session's context on every rank (request ``request_id``, one token)."""
        return self._call_all("create_session", session_id, context_ids, request_id)

    def ask(self, session_id: str, question_ids: list[int], params: SamplingParams, request_id: str) -> str:
        """A turn on the session on every rank, its context loaded from each rank's store."""
        return self._call_all("ask", session_id, question_ids, params, request_id)

    def delete_session(self, session_id: str) -> bool:
        """Cancel the session's turns and delete its blocks on every rank."""
        return self._call_all("delete_session", session_id)

    def store_report(self, session_ids: list[str]) -> tuple[StoreStats, list[str]]:
        """Rank 0's store counters, and which of ``session_ids`` the ranks hold. Every rank's
        store must agree with rank 0's (sessions, blocks held, leased and free, the sessions
        held): ranks that disagree are out of step, and the group fails."""
        reports = self._call_every("store_report", session_ids)
        books = [(s.sessions, s.session_blocks, s.leased_blocks, s.free_blocks, held) for s, held in reports]
        if any(b != books[0] for b in books):
            self._fail(f"the ranks' KV stores disagree (sessions, session / leased / free blocks, held): {books}")
        return reports[0]

    def has_work(self) -> bool:
        return self._call_all("has_work")

    def step(self) -> list[TokenUpdate]:
        return self._call_all("step")

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Every prompt to its end; the generated token ids, in the order of ``prompts``."""
        ids = [self.add_request(p, params, f"gen-{i}") for i, p in enumerate(prompts)]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_work():
            for update in self.step():
                tokens[update.request_id] += update.new_token_ids
        return [tokens[i] for i in ids]

    def _call_all(self, method: str, *args):
        """``method(*args)`` on every rank; rank 0's result. A refusal on every rank is raised
        as itself; a dead, hung or disagreeing rank fails the group."""
        return self._call_every(method, *args)[0]

    def _call_every(self, method: str, *args) -> list:
        """``_call_all``, but every rank's result."""
        if self._failure:
            raise TensorParallelGroupError(self._failure)
        results = self._get([rank.execute.remote(method, *args) for rank in self.ranks], method)
        refused = [isinstance(r, RankRefusal) for r in results]
        if all(refused):
            raise results[0].error
        if any(refused):
            self._fail(f"ranks {[i for i, r in enumerate(refused) if r]} of {self.size} refused {method} and "
                       f"the others did not: the ranks are out of step")
        return results

    def _get(self, refs: list, method: str) -> list:
        """The results of ``refs`` (one per rank), failing the group on the first rank error or at
        the deadline (a rank's death is seen as soon as it happens, not after a collective's timeout)."""
        pending, deadline = list(refs), time.monotonic() + self.call_timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                hung = [rank for rank, ref in enumerate(refs) if ref in pending]
                self._fail(f"ranks {hung} of {self.size} did not answer {method} within {self.call_timeout_s} s "
                           f"(a rank waiting for a hung one in a collective does not answer either)")
            try:
                ray.get(ready)
            except RayError as exc:
                rank = refs.index(ready[0])
                first_line = (str(exc).strip().splitlines() or [""])[0]
                self._fail(f"rank {rank} of {self.size} failed during {method}: {type(exc).__name__}: {first_line}")
        return ray.get(refs)

    def _fail(self, message: str):
        message += "; the tensor-parallel group is shut down: make a new TensorParallelEngine"
        self._failure = message
        self.shutdown()
        raise TensorParallelGroupError(message)

    def shutdown(self) -> None:
        """Kill every rank (no graceful close: a survivor may be blocked in a collective)."""
        for rank in self.ranks if hasattr(self, "ranks") else ():
            ray.kill(rank, no_restart=True)
        self.ranks = []
        if self._owns_group and self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None
        self._failure = self._failure or "the tensor-parallel engine was shut down"


def _make_placement_group(size: int, resources: RankResources, timeout_s: float):
    group = placement_group([resources.bundle() for _ in range(size)], strategy="STRICT_PACK")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except GetTimeoutError:
        remove_placement_group(group)
        raise TensorParallelGroupError(
            f"no node has room for {size} ranks of {resources.bundle()} within {timeout_s} s "
            f"(STRICT_PACK: all on one node)") from None
    return group
