"""Continuous batching: sequences join (prefill in segments) and leave (finish) independently.

Each step runs at most one prefill segment (one sequence moves ``num_cached`` towards its
prompt length) and one decode batch of every sequence that is generating.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from engine.sequence import Sequence, Status


@dataclass
class StepPlan:
    prefill: Sequence | None  # the sequence whose next segment runs this step
    prefill_end: int  # the segment is prompt_ids[prefill.num_cached:prefill_end]
    decode: list[Sequence]


class Scheduler:
    def __init__(self, max_num_seqs: int, prefill_chunk: int,
                 can_admit: Callable[[Sequence], bool], admit: Callable[[Sequence], None]):
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = prefill_chunk
        self._can_admit, self._admit = can_admit, admit
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted: PREFILL or DECODE

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> StepPlan:
        prefilling = [s for s in self.running if s.status is Status.PREFILL]
        if not prefilling and self.waiting and len(self.running) < self.max_num_seqs \
                and self._can_admit(self.waiting[0]):
            seq = self.waiting.popleft()
            self._admit(seq)
            seq.status = Status.PREFILL
            self.running.append(seq)
            prefilling = [seq]
        prefill = prefilling[0] if prefilling else None
        end = min(prefill.prompt_len, prefill.num_cached + self.prefill_chunk) if prefill else 0
        decode = [s for s in self.running if s.status is Status.DECODE]
        return StepPlan(prefill, end, decode)
