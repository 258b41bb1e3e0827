"""One tensor-parallel rank as a plain class: join the group, build the engine shard, step.

A driver (``actors/tp_engine.py`` over Ray, or a test over processes) makes one ``RankWorker``
per rank and calls the same methods on all of them in the same order; the collectives inside
``step`` pair up because every rank schedules the same requests identically. No Ray here.

    driver ──add_request / step──▶ rank 0 ─┐
           ──add_request / step──▶ rank 1 ─┼─ torch.distributed (gloo | nccl)
           ──add_request / step──▶ rank P-1┘
    driver ◀── rank 0's TokenUpdates (every rank computes the same ones)
"""
from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.errors import InvalidRequestError, RequestCancelled
from engine.logprobs import LogprobsRecorder
from engine.parallel.engine import build_tp_engine
from engine.parallel.group import TensorParallel
from engine.sampling import SamplingParams
from engine.sequence import Sequence, Status


@dataclass(frozen=True)
class Finished:
    """What a request's last update adds: its whole text, timings, KV accounting (this rank's),
    the log-probabilities it asked for, the error that failed it alone (finish reason "error"),
    and its prompt's tokens: all, those prefilled, those loaded from the host arena instead."""

    text: str
    prefill_s: float
    decode_s: float
    kv: dict
    logprobs: list | None = None
    error: Exception | None = None
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class TokenUpdate:
    """The tokens one request produced in one ``step``; ``finish_reason`` once it has finished.
    ``text``: what its text grew by (the engine's text, stop strings cut; "" without a tokenizer)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    text: str = ""
    finished: Finished | None = None


def backend_for(device: str) -> str:
    """NCCL where the ranks run on CUDA, gloo on CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (rank 0 binds it for the group's rendezvous)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RankWorker:
    """Rank ``rank`` of ``size``: ``join`` the group, ``build`` an engine, then lockstep calls."""

    def __init__(self, rank: int, size: int):
        self.tp = TensorParallel(rank, size)
        self.engine = None
        self._seqs: dict[str, Sequence] = {}
        self._emitted: dict[str, tuple[int, int]] = {}  # request_id -> (tokens, text characters) sent
        self.logprobs: LogprobsRecorder | None = None

    def join(self, host: str, port: int, device: str, timeout_s: float) -> None:
        """Join the group whose rendezvous is rank 0's ``host:port`` (blocks until all ranks have)."""
        if device == "cpu":
            torch.set_num_threads(1)  # P ranks share the host's cores
        dist.init_process_group(backend_for(device), init_method=f"tcp://{host}:{port}", rank=self.tp.rank,
                                world_size=self.tp.size, timeout=datetime.timedelta(seconds=timeout_s))

    def build(self, make_model: Callable[[str, torch.dtype], torch.nn.Module], config: EngineConfig,
              tokenizer=None) -> None:
        """Build this rank's engine shard from ``make_model(device, dtype)`` (whole weights, sliced
        here; e.g. ``partial(load_model, source)``). Replaces an earlier engine and its requests."""
        model = make_model(config.device_name, config.torch_dtype)
        self._install(build_tp_engine(model, config, self.tp, tokenizer))

    def _install(self, engine) -> None:
        """``engine`` replaces this rank's engine; earlier requests are dropped."""
        self.engine = engine
        self.logprobs = LogprobsRecorder()  # for requests that ask (SamplingParams.logprobs)
        self.engine.hooks.append(self.logprobs)
        self._seqs.clear()
        self._emitted.clear()

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str) -> str:
        if self.engine is None:
            raise InvalidRequestError("this rank has no engine yet: call build first")
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        seq = self.engine.add_request(prompt, params, request_id=request_id)
        self._seqs[request_id] = seq
        self._emitted[request_id] = (0, 0)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Finish the request now (its KV freed) and forget it; False when it is not running."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        del self._emitted[request_id]
        self.engine.abort(seq, RequestCancelled(f"request {request_id} was cancelled"))
        self.logprobs.pop(seq)
        return True

    def has_work(self) -> bool:
        return self.engine is not None and self.engine.has_work()

    def step(self) -> list[TokenUpdate]:
        """One engine step; the new tokens of every request that moved, finished ones last seen."""
        self._advance()
        updates = []
        for request_id, seq in list(self._seqs.items()):
            done = seq.status is Status.FINISHED
            tokens, chars = self._emitted[request_id]
            new = seq.output_ids[tokens:]
            if new or done:
                finished = Finished(seq.text, seq.prefill_s, seq.decode_s, dict(seq.kv), self.logprobs.pop(seq),
                                    seq.error, *self._prompt_tokens(request_id, seq)) if done else None
                updates.append(TokenUpdate(request_id, list(new), seq.finish_reason if done else None,
                                           seq.text[chars:], finished))
                self._emitted[request_id] = (len(seq.output_ids), max(chars, len(seq.text)))
            if done:
                del self._seqs[request_id], self._emitted[request_id]
        return updates

    def _advance(self) -> None:
        self.engine.step()

    def _prompt_tokens(self, request_id: str, seq: Sequence) -> tuple[int, int, int]:
        """(prompt, prefilled, loaded) tokens of a finished request: here all prefilled."""
        return seq.prompt_len, seq.prompt_len, 0

    def close(self) -> None:
        self.engine = None
        if dist.is_initialized():
            dist.destroy_process_group()
