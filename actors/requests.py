"""A decode worker's request and the plumbing of its futures: a request's future stays pending
until its answer (so that cancelling it works), following the admission future that resolves
to the turn's future; plus what the worker reports of its process's memory."""
from __future__ import annotations

import os
import time
from concurrent.futures import Future
from typing import Callable

import torch

from actors.session_store import SessionStore


class Request:
    """One caller's request. ``future`` stays pending until the answer, so that cancelling it
    works; ``admit`` (run on an admission thread) starts it and returns its turn's result future."""

    def __init__(self, admit: Callable[[Request], Future], retries: int = 1):
        self.future: Future = Future()
        self.admit = admit
        self.retries = retries  # runs again after a failure of its node's store
        self.attempt = 0
        self.seq_id: int | None = None  # the sequence running for it now
        self.generation = 0  # the store generation it was admitted under...
        self.store: SessionStore | None = None  # ... and that store, which its turn settles with
        self.prompt_hashes: list[str] = []  # chain keys of its prompt's complete blocks (engine/prefix.py)
        self.prefix_hashes: list[str] = []  # ... the first of them, pinned for it in the store
        self.cancelled = False
        self.marks: dict[str, float] = {"received": time.perf_counter()}  # phase -> when it ended

    def mark(self, phase: str) -> None:
        """``phase`` ended now (the first time only: a retried request keeps its first marks)."""
        self.marks.setdefault(phase, time.perf_counter())

    def timings(self) -> dict[str, float]:
        """Seconds per phase, in order: ``admission`` (pin or prefix match, lease: the store
        calls), ``queued`` (until the decode loop took it), ``first_token`` (its prefill over the
        cached prefix, in engine steps), ``decode`` (the other tokens), ``settle`` (the store
        calls after it); phases it never reached are left out."""
        out, last = {}, self.marks["received"]
        for phase in ("admission", "queued", "first_token", "decode", "settle"):
            if phase in self.marks:
                out[phase] = round(self.marks[phase] - last, 6)
                last = self.marks[phase]
        return out


def process_memory(device: torch.device) -> dict[str, int]:
    """This process's memory: what a leak would grow (host RSS, GPU memory, torch's pinned pool)."""
    rss = 0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    out = {"pid": os.getpid(), "rss_bytes": rss}
    if device.type == "cuda":
        out["gpu_allocated_bytes"] = torch.cuda.memory_allocated(device)
        out["gpu_reserved_bytes"] = torch.cuda.memory_reserved(device)
        try:
            out["pinned_host_bytes"] = int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))
        except (RuntimeError, AttributeError):
            pass
    return out


def relay(inner: Future, request: Request, attempt: int) -> None:
    """Complete the request's future from attempt ``attempt``'s admission, following a future
    that resolves to a future; a later attempt (a retry) makes this one's outcome moot."""
    outer = request.future
    if outer.done() or request.attempt != attempt:
        return
    exc = inner.exception()
    if exc is not None:
        complete(outer, exc=exc)
        return
    value = inner.result()
    if isinstance(value, Future):
        value.add_done_callback(lambda f: relay(f, request, attempt))
    else:
        complete(outer, value=value)


def complete(future: Future, value=None, exc: BaseException | None = None) -> None:
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
    except Exception:  # cancelled meanwhile (InvalidStateError)
        pass


def copy_outcome(source: Future, target: Future) -> None:
    exc = source.exception()
    complete(target, value=None if exc else source.result(), exc=exc)
