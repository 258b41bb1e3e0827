"""Typed errors. Every message says what went wrong and what to do about it.

Each error says what kind of failure it is, which decides whether asking again can help:

    kind          can it succeed later?                       HTTP (``http_error``)
    FINAL         never: the request itself is wrong           400 (or 404 for an unknown model)
    MISSING       not as asked: the session is unknown         404
    BUSY          yes, once the other turn is done             409
    OVERLOADED    yes, when load passes (``retry_after_s``)     429 + Retry-After
    UNAVAILABLE   yes, when a dependency is back               503 + Retry-After
    UNSUPPORTED   not on this deployment: it does not serve it  501

``param`` names the request field at fault (OpenAI's ``param``), ``code`` a machine-readable
reason (``context_length_exceeded``, ``session_evicted``, ...). This module imports nothing, so
that the HTTP client can reuse it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

FINAL, MISSING, BUSY, OVERLOADED, UNAVAILABLE = "final", "missing", "busy", "overloaded", "unavailable"
UNSUPPORTED = "unsupported"


class LSAError(Exception):
    """Base class of every error lsa-serve raises on purpose."""

    kind = FINAL
    code: str | None = None

    def __init__(self, message: str = "", *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class ModelNotFoundError(LSAError, FileNotFoundError):
    """The model name or path does not resolve to a model on this machine."""


class ModelFormatError(LSAError, ValueError):
    """A weights or config file exists but cannot be read (truncated, corrupt, inconsistent)."""


class UnsupportedModelError(LSAError, ValueError):
    """The model is readable but uses an architecture or feature lsa-serve does not implement."""


class InvalidRequestError(LSAError, ValueError):
    """A request is malformed: empty prompt, bad sampling parameters... (FINAL)."""


class PromptTooLongError(InvalidRequestError):
    """The request can never fit: its prompt (or ``max_tokens``) is over the model's context, the
    largest host arena or the device pool (FINAL)."""

    code = "context_length_exceeded"


class CacheFullError(LSAError, RuntimeError):
    """No KV capacity is free now for a request that fits when others finish (OVERLOADED)."""

    kind = OVERLOADED
    code = "overloaded"

    def __init__(self, message: str = "", *, retry_after_s: float = 1.0, **kw):
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class SessionNotFound(LSAError):
    """No session with this id is held here: it was never created, or it was deleted (MISSING)."""

    kind = MISSING
    code = "session_not_found"


class SessionEvicted(SessionNotFound):
    """The session's KV was evicted to make room for others, or expired: create it again."""

    code = "session_evicted"


class SessionBusy(LSAError):
    """The session is busy with another operation (being rebuilt, deleted): ask again (BUSY)."""

    kind = BUSY
    code = "session_busy"


class UnavailableError(LSAError):
    """A dependency (a node's KV store, the session directory) is down (UNAVAILABLE)."""

    kind = UNAVAILABLE
    code = "unavailable"

    def __init__(self, message: str = "", *, retry_after_s: float = 2.0, **kw):
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class StoreUnavailable(UnavailableError):
    """A node's KV store does not answer (it died, or its node is going away)."""


class NotServedError(LSAError):
    """This deployment does not serve the route (e.g. sessions on tensor-parallel decode workers) (UNSUPPORTED)."""

    kind = UNSUPPORTED
    code = "not_implemented"


class RequestCancelled(LSAError):
    """The request was cancelled (its client went away, or its session was deleted)."""

    code = "cancelled"


# -------------------------------------------------------------------------------- HTTP

STATUS = {FINAL: 400, MISSING: 404, BUSY: 409, OVERLOADED: 429, UNAVAILABLE: 503, UNSUPPORTED: 501}
# the wire's ``type`` of each (kept from the first HTTP contract; ``code`` is the finer reason)
TYPES = {FINAL: "invalid_request_error", MISSING: "session_not_found", BUSY: "session_busy",
         OVERLOADED: "overloaded", UNAVAILABLE: "unavailable", UNSUPPORTED: "not_implemented_error"}
# Ray's errors when an actor a call needed died or cannot be reached (named, not imported)
RAY_UNAVAILABLE = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError", "GetTimeoutError",
                             "NodeDiedError", "OwnerDiedError", "WorkerCrashedError"})


@dataclass(frozen=True)
class HTTPError:
    """An error as an HTTP answer: ``status``, ``body()`` ``{"error": {...}}``, ``headers``."""

    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    headers: dict = field(default_factory=dict)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def root_cause(exc: BaseException) -> BaseException:
    """The error under Ray's wrappers (``RayTaskError.cause``, chained a few times)."""
    for _ in range(5):
        inner = getattr(exc, "cause", None)
        if inner is None or inner is exc:
            break
        exc = inner
    return exc


def http_error(exc: BaseException) -> HTTPError:
    """The one mapping of an error (possibly wrapped by Ray) to its HTTP answer."""
    cause = root_cause(exc)
    if isinstance(cause, LSAError):
        kind = cause.kind
        headers = {}
        if kind in (OVERLOADED, UNAVAILABLE):
            headers["Retry-After"] = str(max(1, math.ceil(getattr(cause, "retry_after_s", 1.0))))
        kind_type = "context_length_exceeded" if isinstance(cause, PromptTooLongError) else TYPES[kind]
        if isinstance(cause, RequestCancelled):
            return HTTPError(499, cause.message, "cancelled", cause.code)
        return HTTPError(STATUS[kind], cause.message, kind_type, cause.code, cause.param, headers)
    names = {c.__name__ for c in type(cause).__mro__}
    if names & RAY_UNAVAILABLE:
        return HTTPError(503, f"a worker or store is unavailable ({type(cause).__name__}); retry",
                         TYPES[UNAVAILABLE], "unavailable", None, {"Retry-After": "2"})
    text = str(cause.args[0]) if getattr(cause, "args", None) else str(cause)
    return HTTPError(500, f"{type(cause).__name__}: {text}"[:1000], "internal_error", "internal_error")
