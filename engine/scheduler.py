"""Continuous batching: sequences join (prefill in segments) and leave (finish) independently.

A step is a decode batch and some prefill segments, each scheduled, run, then post-processed
in this order:

    DecodeBatch       every sequence that is generating: one token each
    PrefillSegment    a sequence moves ``num_cached`` towards its prompt length; the last
                      segment of a prompt gives the sequence its first token

Up to ``max_prefill_seqs`` sequences prefill side by side. A step's prefill segments share
``prefill_chunk`` tokens, the sequence with the fewest prompt tokens left first, so a short
prompt is prefilled in the next step even behind a long one, and decoding sequences get a
token between any two segments of a long prompt:

    step     decode batch     prefill segments (prefill_chunk = 1024)
    t        A B              long[0:1024]
    t+1      A B              short[0:30]  long[1024:2018]       <- short arrives
    t+2      A B short        long[2018:3042]

Post-processing appends each sampled token, decodes the text, and finishes the sequences a
stop condition holds for (EOS, ``max_tokens``, a stop string), releasing their KV; so the
sequences a decode batch finishes have left before the step's prefill segment runs.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from engine.sequence import Sequence, Status


@dataclass
class DecodeBatch:
    seqs: list[Sequence]

    def add_time(self, seconds: float) -> None:
        for seq in self.seqs:
            seq.decode_s += seconds


@dataclass
class PrefillSegment:
    seq: Sequence
    end: int  # the segment is seq.prompt_ids[seq.num_cached:end]

    @property
    def seqs(self) -> list[Sequence]:
        return [self.seq]

    def add_time(self, seconds: float) -> None:
        self.seq.prefill_s += seconds


Batch = DecodeBatch | PrefillSegment


class OutputRules:
    """When a sequence is done, and its text: EOS (unless ignored), ``max_tokens``, stop strings
    (the text is cut before the first one); text only with a tokenizer."""

    def __init__(self, eos_ids: set[int], tokenizer=None):
        self.eos_ids = eos_ids
        self.tokenizer = tokenizer

    def append(self, seq: Sequence, token: int) -> str | None:
        """Append a generated token; the finish reason if a stop condition now holds."""
        seq.output_ids.append(token)
        reason = None
        if token in self.eos_ids and not seq.params.ignore_eos:
            reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens:
            reason = "length"
        if self.tokenizer is not None:
            before = len(seq.text)
            seq.text += self.new_text(seq, final=reason is not None)
            for stop in seq.params.stop:  # the text before held none: look where the new text may complete one
                cut = seq.text.find(stop, max(0, before - len(stop) + 1))
                if cut >= 0:
                    seq.text, reason = seq.text[:cut], "stop"
                    break
        return reason

    def new_text(self, seq: Sequence, final: bool = False) -> str:
        """The text the newest token adds, from two decodes of a few tokens (decoding the whole
        output at every token costs O(n) per token: ~1 ms per sequence and step at 4,000 tokens).
        Decoded from the window's start, a few tokens back, so that text that depends on the token
        before (a leading space) comes out as in the whole output's decode; held back while it ends
        in an incomplete character (a byte-level token split it), unless ``final``."""
        start, end = seq.text_offsets
        ids = seq.output_ids
        known = self.tokenizer.decode(ids[start:end])
        grown = self.tokenizer.decode(ids[start:])
        if len(grown) <= len(known) or (grown.endswith("\ufffd") and not final):
            return ""
        seq.text_offsets = (end, len(ids))
        return grown[len(known):]


class Scheduler:
    def __init__(self, max_num_seqs: int, prefill_chunk: int, rules: OutputRules,
                 can_admit: Callable[[Sequence], bool], admit: Callable[[Sequence], None],
                 release: Callable[[Sequence], None], max_prefill_seqs: int = 1):
        """``admit`` reserves a sequence's KV (``can_admit`` says whether it fits now);
        ``release`` gives it back when the sequence finishes (called in any status)."""
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = prefill_chunk
        self.max_prefill_seqs = max_prefill_seqs
        self.rules = rules
        self._can_admit, self._admit, self._release = can_admit, admit, release
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted: PREFILL or DECODE

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Batch]:
        """This step's batches: the decode batch, then prefill segments (each only if any)."""
        prefilling = [s for s in self.running if s.status is Status.PREFILL]
        while self.waiting and len(prefilling) < self.max_prefill_seqs and len(self.running) < self.max_num_seqs \
                and self._can_admit(self.waiting[0]):
            seq = self.waiting.popleft()
            self._admit(seq)
            seq.status = Status.PREFILL
            self.running.append(seq)
            prefilling.append(seq)
        batches: list[Batch] = []
        decode = [s for s in self.running if s.status is Status.DECODE]
        if decode:
            batches.append(DecodeBatch(decode))
        budget = self.prefill_chunk
        for seq in sorted(prefilling, key=lambda s: s.prompt_len - s.num_cached):  # shortest first, then oldest
            if budget <= 0:
                break
            end = min(seq.prompt_len, seq.num_cached + budget)
            batches.append(PrefillSegment(seq, end))
            budget -= end - seq.num_cached
        return batches

    def postprocess(self, seqs: list[Sequence], tokens: list[int]) -> list[Sequence]:
        """Append each sequence's new token; returns the sequences that finished (a sequence
        whose token or text cannot be processed fails alone)."""
        finished = []
        for seq, token in zip(seqs, tokens):
            seq.status = Status.DECODE  # a prefilled sequence decodes from its first token on
            try:
                reason = self.rules.append(seq, token)
            except Exception as exc:
                finished += self.fail([seq], exc)
                continue
            if reason:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def fail(self, seqs: list[Sequence], error: Exception) -> list[Sequence]:
        """End ``seqs`` because of ``error`` (finish reason "error"); returns them."""
        for seq in seqs:
            if seq.status is not Status.FINISHED:
                seq.error = error
                self.finish(seq, "error")
        return list(seqs)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (``reason``: stop, length, abort) in whatever status it is."""
        seq.finish_reason = reason
        self._release(seq)
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
