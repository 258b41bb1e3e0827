"""Failures at the edge: the edge's own answers (``EdgeError``), what an engine or Ray error
becomes over HTTP (``error_answer``), and the worker calls that survive a replica's death.

What an engine or Ray error becomes over HTTP: the core's mapping (``engine.errors.http_error``,
which knows each error's kind: FINAL 400, MISSING 404, BUSY 409, OVERLOADED 429 + Retry-After,
UNAVAILABLE 503 + Retry-After) where the core has it; until it lands, the same taxonomy over
the error classes this tree has.
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field, replace

import engine.errors as errors
from cluster import protocol as p

# Ray's errors when an actor a call needed died or cannot be reached (named, not imported)
RAY_UNAVAILABLE = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError", "GetTimeoutError",
                             "NodeDiedError", "OwnerDiedError", "WorkerCrashedError"})


@dataclass(frozen=True)
class HTTPAnswer:
    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    headers: dict = field(default_factory=dict)


def http_error(exc: BaseException):
    """``status, message, type, code, param, headers`` of ``exc`` (possibly wrapped by Ray)."""
    core = getattr(errors, "http_error", None)
    if core is not None:
        return core(exc)
    cause = _root_cause(exc)
    message = str(cause.args[0]) if getattr(cause, "args", None) else str(cause)
    param, code = getattr(cause, "param", None), getattr(cause, "code", None)
    if isinstance(cause, errors.SessionNotFound):
        return HTTPAnswer(404, message, "session_not_found", code or "session_not_found", param)
    if isinstance(cause, errors.PromptTooLongError):
        return HTTPAnswer(400, message, "invalid_request_error", "context_length_exceeded", param)
    if isinstance(cause, errors.CacheFullError):  # load that passes: retry after a while
        return HTTPAnswer(429, message, "overloaded", code or "overloaded", param, {"Retry-After": "1"})
    if isinstance(cause, errors.LSAError):
        return HTTPAnswer(400, message, "invalid_request_error", code, param)
    if {c.__name__ for c in type(cause).__mro__} & RAY_UNAVAILABLE:
        return HTTPAnswer(503, f"a worker or store is unavailable ({type(cause).__name__}); retry", "unavailable",
                          "unavailable", None, {"Retry-After": "2"})
    return HTTPAnswer(500, f"{type(cause).__name__}: {message}"[:1000], "internal_error", "internal_error")


def _root_cause(exc: BaseException) -> BaseException:
    for _ in range(5):
        inner = getattr(exc, "cause", None)
        if inner is None or inner is exc:
            break
        exc = inner
    return exc


class EdgeError(Exception):
    """An answer decided at the edge (auth, size, unknown model or session, context length)."""

    def __init__(self, status: int, message: str, type: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_answer(exc: BaseException) -> tuple[int, p.ErrorResponse, dict]:
    """The one adapter from any error to its HTTP answer: the edge's own, the protocol's
    (400 naming the param), and the engine's and Ray's through ``http_error``."""
    if isinstance(exc, EdgeError):
        status, e = exc.status, exc
    elif isinstance(exc, p.ProtocolError):
        status, e = 400, HTTPAnswer(400, exc.message, "invalid_request_error", exc.code, exc.param)
    else:
        e = http_error(exc)
        status = e.status
    detail = p.ErrorDetail(message=e.message, type=e.type, param=e.param, code=e.code)
    return status, p.ErrorResponse(error=detail), dict(e.headers)


def own_request(handle, *args, **kwargs):
    """``handle.remote(*args, **kwargs)`` as a request of its own to Serve's router.

    A call made while serving an HTTP request inherits that request's internal id, and Ray
    Serve 2.60's router indexes its pending requests by that id (``_pending_requests_by_id``)
    and hands a chosen replica to the pending request of the routed one's id. Two calls of one
    request pending at once (an n=2 completion) share the id: the second is never indexed,
    and whichever routing task finds a replica second finds no request to give it, so that
    call retries with backoff for ever. A fresh internal id per call keeps them apart; the
    user-visible ``request_id`` is kept. The cost: Serve files the call's in-flight record
    under the fresh id, so cancelling the ingress request (a client that hangs up) no longer
    cancels the worker call with it; the worker finishes the turn and its answer is dropped."""
    from ray.serve import context

    parent = context._get_serve_request_context()
    token = context._serve_request_context.set(replace(parent, _internal_request_id=uuid.uuid4().hex))
    try:
        return handle.remote(*args, **kwargs)  # reads the request context now, not when awaited
    finally:
        context._serve_request_context.reset(token)


async def call_worker(handle, *args, attempts: int = 4, **kwargs):
    """``handle.remote(*args, **kwargs)`` (``own_request``), again when the replica died under
    it: Serve drops the dead replica and the next attempt is routed among the live ones
    (without the ``holder`` hint, which named the dead one)."""
    for attempt in range(attempts):
        try:
            return await own_request(handle, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            died = {c.__name__ for c in type(exc).__mro__} & {"ActorDiedError", "ActorUnavailableError",
                                                               "RayActorError"}
            if not died or attempt == attempts - 1:
                raise
            kwargs.pop("holder", None)
            await asyncio.sleep(0.5 * 2 ** attempt)
