"""Hooks: how tools outside the serving path watch or steer decoding (the lab's eval, tests).

An engine calls its ``hooks`` (none when serving) for every sequence that gets a token in a step:

    run the batch -> logits [n, V]
    hook.observe(seq, logits[i])           each hook, each row: the logits that predict the token
    sample -> tokens
    token = hook.override(seq, token)      each hook in turn: the token actually appended
    post-process (append, stop conditions, finish)

``teacher_force`` / ``score_continuation`` feed a fixed continuation through the decode path
with a ``TeacherForcing`` hook, so that what they measure is the attention policy at work.
"""
from __future__ import annotations

from typing import Callable

import torch

from engine.errors import InvalidRequestError, PromptTooLongError
from engine.sampling import SamplingParams
from engine.sequence import Sequence, Status


class StepHook:
    """Base of the hooks: observes nothing, overrides nothing."""

    def acts_on(self, seq: Sequence) -> bool:
        """Whether the hook may observe or override ``seq``'s tokens. A sequence no hook acts on
        may decode with its next step launched before its token is read (engine/llm.py)."""
        return True

    def observe(self, seq: Sequence, logits: torch.Tensor) -> None:
        """``logits`` [V] float32 predict ``seq``'s next token (called before it is sampled)."""

    def override(self, seq: Sequence, token: int) -> int:
        """The token to append to ``seq`` instead of the sampled ``token``."""
        return token


class LogitsObserver(StepHook):
    """Calls ``fn(seq, logits [V])`` for every token the engine samples."""

    def __init__(self, fn: Callable[[Sequence, torch.Tensor], None]):
        self.fn = fn

    def observe(self, seq: Sequence, logits: torch.Tensor) -> None:
        self.fn(seq, logits)


class TeacherForcing(StepHook):
    """Appends ``continuation`` to ``seq`` whatever is sampled, calling ``visit(i, logits [V])``
    with the logits that predict ``continuation[i]``; other sequences are left alone."""

    def __init__(self, seq: Sequence, continuation: list[int], visit: Callable[[int, torch.Tensor], None]):
        self.seq, self.continuation, self.visit = seq, list(continuation), visit

    def acts_on(self, seq: Sequence) -> bool:
        return seq is self.seq

    def observe(self, seq: Sequence, logits: torch.Tensor) -> None:
        if seq is self.seq:
            self.visit(len(seq.output_ids), logits)

    def override(self, seq: Sequence, token: int) -> int:
        return self.continuation[len(seq.output_ids)] if seq is self.seq else token


def teacher_force(engine, context: list[int], continuation: list[int],
                  visit: Callable[[int, torch.Tensor], None]) -> None:
    """Feed ``continuation`` after ``context`` through ``engine``'s decode path whatever the model
    would choose, calling ``visit(i, logits [V])`` with the logits that predict ``continuation[i]``
    (i = 0 from the prefill). Other sequences on the engine go on as usual meanwhile."""
    if not continuation:
        raise InvalidRequestError("continuation is empty")
    seq = engine.add_request(context, SamplingParams(max_tokens=len(continuation), ignore_eos=True))
    if seq.params.max_tokens < len(continuation):
        engine.abort(seq)
        raise PromptTooLongError("context plus continuation exceed the model's context")
    hook = TeacherForcing(seq, continuation, visit)
    engine.hooks.append(hook)
    try:
        while seq.status is not Status.FINISHED:
            engine.step()
    finally:
        engine.hooks.remove(hook)
    if seq.error is not None:
        raise seq.error


def score_continuation(engine, context: list[int], continuation: list[int]) -> torch.Tensor:
    """Log-probabilities [len(continuation)] of ``continuation`` after ``context``, teacher-forced
    through ``engine``'s decode path (so the attention policy is what is measured; the first
    token is scored from the prefill)."""
    logprobs: list[torch.Tensor] = []
    teacher_force(engine, context, continuation,
                  lambda i, row: logprobs.append(torch.log_softmax(row.float(), -1)[continuation[i]]))
    return torch.stack(logprobs).cpu()
