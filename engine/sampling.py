"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seed."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from engine.errors import InvalidRequestError


MAX_TOKENS = 1 << 31  # larger is never meaningful (engines cap max_tokens at their context anyway)
MAX_STOP = 16


def _bad(param: str, message: str, code: str = "invalid_value") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


def _integer(param: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(param, f"{param} must be an integer, got {value!r}", "invalid_type")
    if not low <= value <= high:
        raise _bad(param, f"{param} must be in [{low}, {high}], got {value}")


def _number(param: str, value, low: float, high: float, open_low: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _bad(param, f"{param} must be a finite number, got {value!r}", "invalid_type")
    if not (low < value if open_low else low <= value) or value > high:
        raise _bad(param, f"{param} must be in {'(' if open_low else '['}{low}, {high}], got {value}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` is greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # record each token's logprob and this many alternatives (engine/logprobs.py)

    def __post_init__(self):
        """Every field checked for type and range; a bad one is an ``InvalidRequestError``
        naming it (``param``), so that nothing malformed reaches an engine step."""
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        else:
            raise _bad("stop", f"stop must be a string or a list of strings, got {type(stop).__name__}", "invalid_type")
        object.__setattr__(self, "stop", stop)
        _integer("max_tokens", self.max_tokens, 1, MAX_TOKENS)
        _number("temperature", self.temperature, 0.0, 100.0)
        _number("top_p", self.top_p, 0.0, 1.0, open_low=True)
        _integer("top_k", self.top_k, 0, 1 << 31)
        if self.seed is not None:
            _integer("seed", self.seed, -(1 << 63), (1 << 64) - 1)
        if len(stop) > MAX_STOP:
            raise _bad("stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str):
                raise _bad("stop", f"stop strings must be strings, got {s!r}", "invalid_type")
            if not s:
                raise _bad("stop", "stop strings must be non-empty")
        if not isinstance(self.ignore_eos, bool):
            raise _bad("ignore_eos", f"ignore_eos must be true or false, got {self.ignore_eos!r}", "invalid_type")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0, 20)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    if params.greedy or params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           on_error: Callable[[int, Exception], None] | None = None) -> list[int | None]:
    """logits [N, V] float32 -> one token id per row. ``on_error(i, exc)``: a row whose sampling
    fails gets None and is reported there, the others are sampled (without it, the error rises)."""
    tokens: list[int | None] = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        try:
            tokens[i] = sample_row(logits[i], p, generators[i])
        except Exception as exc:
            if on_error is None:
                raise
            on_error(i, exc)
            tokens[i] = None
    return tokens


def sample_row(row: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits [V] with temperature, top-k and top-p."""
    row = row / p.temperature  # [V]
    if p.top_k:
        kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p  # keep the token that crosses top_p
        row = row.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(row, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
