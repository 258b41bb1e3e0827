"""Failures at the edge: the edge's own answers (``EdgeError``), what an engine or Ray error
becomes over HTTP (``error_answer``), and the worker calls that survive a replica's death.

What an engine or Ray error becomes over HTTP is the core's one mapping,
``engine.errors.http_error``, which knows each error's kind: FINAL 400, MISSING 404, BUSY 409,
OVERLOADED 429 + Retry-After (a full arena), UNAVAILABLE 503 + Retry-After (a dead store),
499 for a cancelled request.
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

from cluster import protocol as p
from engine.errors import HTTPError, http_error


class EdgeError(Exception):
    """An answer decided at the edge (auth, size, unknown model or session, context length)."""

    def __init__(self, status: int, message: str, type: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_answer(exc: BaseException) -> tuple[int, p.ErrorResponse, dict]:
    """The one adapter from any error to its HTTP answer: the edge's own, the protocol's
    (400 naming the param), and the engine's and Ray's through ``engine.errors.http_error``."""
    if isinstance(exc, EdgeError):
        status, e = exc.status, exc
    elif isinstance(exc, p.ProtocolError):
        status, e = 400, HTTPError(400, exc.message, "invalid_request_error", exc.code, exc.param)
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
    under the fresh id, so cancelling the ingress request (a client that hangs up) does not
    cancel these calls with it: used only for fan-out (n > 1), whose turns then finish and
    their answers are dropped."""
    from ray.serve import context

    parent = context._get_serve_request_context()
    token = context._serve_request_context.set(replace(parent, _internal_request_id=uuid.uuid4().hex))
    try:
        return handle.remote(*args, **kwargs)  # reads the request context now, not when awaited
    finally:
        context._serve_request_context.reset(token)


async def call_worker(handle, *args, attempts: int = 4, fan_out: bool = False, **kwargs):
    """``handle.remote(*args, **kwargs)``, again when the replica died under it: Serve drops the
    dead replica and the next attempt is routed among the live ones (without the ``holder``
    hint, which named the dead one). ``fan_out``: one of several calls of this request pending
    at once (n > 1): sent as a request of its own (``own_request``); a single call keeps the
    request's id, so that a client hanging up cancels it."""
    for attempt in range(attempts):
        try:
            return await (own_request(handle, *args, **kwargs) if fan_out else handle.remote(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001
            died = {c.__name__ for c in type(exc).__mro__} & {"ActorDiedError", "ActorUnavailableError",
                                                               "RayActorError"}
            if not died or attempt == attempts - 1:
                raise
            kwargs.pop("holder", None)
            await asyncio.sleep(0.5 * 2 ** attempt)
