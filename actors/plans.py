"""Per-cycle plans, from a worker's decode loop to the Indexer, without blocking the loop.

    decode loop --offer()--> bounded queue --background thread, batches--> send(batch)
                  (never waits; when full,    (period_s after the first report (Indexer.report_plans:
                   the oldest report drops)    of a batch, or as soon as        prefetch plans to stores)
                                               ``batch`` reports wait; idle
                                               without a report: it sleeps)

A report names the blocks of a session that the next cycle wants (its Level-1 plan:
logical context blocks). The Indexer turns them into prefetch plans: the worker's node
store stages those of them held by another node, before the session's turn needs them.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from actors.messages import PlanReport


class PlanReporter:
    """``send(batch)`` delivers a batch of ``PlanReport`` (to the Indexer)."""

    def __init__(self, send: Callable[[list[PlanReport]], object], capacity: int = 1024, batch: int = 64,
                 period_s: float = 0.05):
        self.send = send
        self.batch = batch
        self.period_s = period_s
        self._queue: deque[PlanReport] = deque()
        self._capacity = capacity
        self._cond = threading.Condition()
        self._busy = False
        self._stop = False
        self.num_sent = self.num_dropped = self.num_failed = 0
        self._thread = threading.Thread(target=self._run, name="plan-reporter", daemon=True)
        self._thread.start()

    def offer(self, report: PlanReport) -> None:
        """Queue a report; never blocks (a full queue drops its oldest report)."""
        with self._cond:
            if len(self._queue) >= self._capacity:
                self._queue.popleft()
                self.num_dropped += 1
            self._queue.append(report)
            if len(self._queue) in (1, self.batch):  # a batch starts (its period runs), or is full
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:  # idle: no wake-ups until a report comes
                    self._cond.wait()
                if len(self._queue) < self.batch and not self._stop:  # gather the period's reports
                    self._cond.wait(self.period_s)
                if self._stop and not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
                self._busy = bool(batch)
            if batch:
                try:
                    self.send(batch)
                    self.num_sent += len(batch)
                except Exception:  # the Indexer is away: plans are hints, the turn stages at use
                    self.num_failed += len(batch)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued report was sent (tests, shutdown)."""
        with self._cond:
            self._cond.notify()
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
