"""A worker whose node store died moves to its successor:

    a store call fails (StoreUnavailable), or the health check's ping does
      -> store_lost(): one healer thread asks ``resolve_store()`` for the node's store until one
         answers (placement creates a new one where the old one died), maps its arena
      -> on the decode loop: every sequence in flight is aborted (each request runs once more,
         from admission, on the new store: its session is rebuilt from the directory's context),
         the engine's host mirror is remapped, a fresh SessionManager over the new arena
      -> generation + 1: admissions waiting in ``wait_ready`` go on, against the new store

Requests admitted against the dead store settle with it (their calls fail and are dropped:
what the dead store held is gone with it). While no store answers, ``ready`` is False and the
deployment's health check fails.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable

from actors.session_store import SessionStore
from engine.errors import StoreUnavailable
from engine.host_arena import HostArena
from engine.sessions import SessionManager

log = logging.getLogger(__name__)


class StoreHealing:
    def __init__(self, core, resolve_store: Callable[[], SessionStore] | None, pin: bool = False,
                 wait_s: float = 120.0):
        """``resolve_store()``: the node's store now (None: this worker cannot heal; a dead store
        then fails its requests). ``pin``: page-lock a new arena for DMA."""
        self.core = core
        self.resolve_store = resolve_store
        self.pin = pin
        self.wait_s = wait_s
        self.generation = 0
        self.healings = 0
        self.last_error: str | None = None
        self._ready = threading.Event()
        self._ready.set()
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self) -> tuple[int, SessionStore]:
        """(generation, store) once a live store is mapped; raises StoreUnavailable after ``wait_s``."""
        if not self._ready.wait(self.wait_s):
            raise StoreUnavailable(f"this worker's node KV store died and no new one answered within {self.wait_s:g} "
                                   f"s ({self.last_error}); retry later")
        with self._lock:
            return self.generation, self.core.store

    def store_lost(self) -> None:
        """The store did not answer: heal, once, however many callers saw it."""
        if self.resolve_store is None:
            return
        with self._lock:
            if not self._ready.is_set():
                return
            self._ready.clear()
        threading.Thread(target=self._heal, name="store-healing", daemon=True).start()

    def close(self) -> None:
        self._closed.set()

    def _heal(self) -> None:
        delay = 0.2
        old = self.core.store
        while not self._closed.is_set():
            try:
                store = self.resolve_store()
                info = store.info()
                break
            except Exception as exc:  # no store yet (placement is making one), or it is starting
                self.last_error = f"{type(exc).__name__}: {exc}"
                time.sleep(delay)
                delay = min(2 * delay, 2.0)
        else:
            return
        if store is old or getattr(self.core.arena_info, "path", None) == info.path:
            log.warning("the node's KV store answers again; nothing to heal")
            self._ready.set()
            return
        arena = HostArena.from_file(info.path, info.layout, info.num_blocks, pin=self.pin)
        swapped: Future = Future()
        self.core._commands.put(lambda: self._swap(store, info, arena, swapped))
        swapped.result()
        log.warning("node KV store replaced (generation %d): mapped %s", self.generation, info.path)
        self._ready.set()

    def _swap(self, store: SessionStore, info, arena: HostArena, done: Future) -> None:
        """(The loop) Move the engine to the new store's arena."""
        core = self.core
        try:
            core.abort_all(StoreUnavailable("the node's KV store died while this request ran; it runs again"))
            core.engine.cache.remap_host(arena)
            core.sessions = SessionManager(core.engine, arena.allocator, core.spare_blocks, arena.num_blocks)
            with self._lock:
                core.store, core.arena, core.arena_info = store, arena, info
                self.generation += 1
                self.healings += 1
            done.set_result(None)
        except BaseException as exc:
            done.set_exception(exc)
