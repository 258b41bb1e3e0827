"""A timing log of the engine's batches, for finding where a served turn's time goes.

``LSA_STEP_TRACE=DIR`` in a decode worker's environment makes it write ``DIR/steps-OWNER-PID.jsonl``:
one line per batch the engine ran, ``[start (time.time()), kind, what, seconds]``, where kind is
"decode" (what: the batch's sequences; then the LSA cycle boundaries it ran, and the host's
seconds applying the policy's plan before the launch, launching, and in the policy's work after
the launch: the rest of ``seconds`` is the wait for the device and sampling) or "prefill"
(what: [seq_id, prompt position reached]); and
one line per garbage collection in the process, kind "gc" (what: the generation collected); the host
work around the batches where it took a millisecond or more ("schedule", "postprocess", "land": reading
and post-processing an overlapped decode step's tokens, the wait for the device included, and the
worker's "report_plans", "stream_updates", "finish"); and a turn's marks, "queued" and "first_token"
(what: its seq_id; seconds 0). With overlapped decode (engine/llm.py) a "decode" line is the launch
of a step whose tokens the next call's "land" reads.
``seconds`` is the host's time in ``runner.run`` and sampling: a prefill segment short of its
prompt's end returns once launched, so its GPU time shows up in the batch that next waits.
Lines are written when the worker goes idle. Unset (the default): nothing is recorded.
"""
from __future__ import annotations

import gc
import json
import os
import re
import time


class StepTrace:
    def __init__(self, engine, path: str):
        self.path = path
        self.rows: list = []
        engine.trace = self
        self._gc_start = 0.0
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            seconds = time.perf_counter() - self._gc_start
            self.rows.append([time.time() - seconds, "gc", info.get("generation"), round(seconds, 6)])

    @classmethod
    def from_env(cls, engine, owner: str) -> StepTrace | None:
        folder = os.environ.get("LSA_STEP_TRACE")
        if not folder:
            return None
        os.makedirs(folder, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", owner)
        return cls(engine, os.path.join(folder, f"steps-{name}-{os.getpid()}.jsonl"))

    def note(self, kind: str, what, t0: float, least: float = 1e-3, *extra) -> None:
        """A line for work that began at ``t0`` (time.perf_counter()), where it took ``least`` seconds
        or more; ``extra`` fields follow (a decode batch: the cycle boundaries it ran, its host parts)."""
        seconds = time.perf_counter() - t0
        if seconds >= least:
            self.rows.append([time.time() - seconds, kind, what, round(seconds, 6), *extra])

    def flush(self) -> None:
        if not self.rows:
            return
        rows = list(self.rows)
        del self.rows[: len(rows)]
        with open(self.path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
