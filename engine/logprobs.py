"""Log-probabilities of generated tokens, for requests that ask (``SamplingParams.logprobs``).

A step hook (engine/hooks.py), so the step loop is unchanged and costs nothing for requests
that do not ask: it keeps the log-softmax of each asking sequence's logits row until the token
is chosen, then records ``(token_id, logprob, [(id, logprob), ...])`` with the ``logprobs`` most
likely alternatives. Log-probabilities are of the model's distribution (before temperature,
top-k and top-p), as OpenAI reports them.
"""
from __future__ import annotations

import torch

from engine.hooks import StepHook
from engine.sequence import Sequence

Entry = tuple[int, float, list[tuple[int, float]]]


class LogprobsRecorder(StepHook):
    def __init__(self):
        self.records: dict[int, list[Entry]] = {}
        self._rows: dict[int, torch.Tensor] = {}

    def acts_on(self, seq: Sequence) -> bool:
        return getattr(seq.params, "logprobs", None) is not None

    def observe(self, seq: Sequence, logits: torch.Tensor) -> None:
        if getattr(seq.params, "logprobs", None) is not None:
            self._rows[seq.seq_id] = torch.log_softmax(logits.float(), dim=-1)  # [V]

    def override(self, seq: Sequence, token: int) -> int:
        row = self._rows.pop(seq.seq_id, None)
        if row is None or token is None:
            return token
        k = min(seq.params.logprobs, row.numel())
        alternatives = []
        if k:
            top = torch.topk(row, k)
            alternatives = [(int(i), float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())]
        self.records.setdefault(seq.seq_id, []).append((int(token), float(row[token]), alternatives))
        return token

    def pop(self, seq: Sequence) -> list[Entry] | None:
        """The sequence's entries (None when it did not ask), forgotten here."""
        self._rows.pop(seq.seq_id, None)
        entries = self.records.pop(seq.seq_id, None)
        if entries is None and getattr(seq.params, "logprobs", None) is not None:
            return []
        return entries
