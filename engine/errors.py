"""Typed errors. Every message says what went wrong and what to do about it."""


class LSAError(Exception):
    """Base class of every error lsa-serve raises on purpose."""


class ModelNotFoundError(LSAError, FileNotFoundError):
    """The model name or path does not resolve to a model on this machine."""


class ModelFormatError(LSAError, ValueError):
    """A weights or config file exists but cannot be read (truncated, corrupt, inconsistent)."""


class UnsupportedModelError(LSAError, ValueError):
    """The model is readable but uses an architecture or feature lsa-serve does not implement."""


class InvalidRequestError(LSAError, ValueError):
    """A request is malformed: empty prompt, bad sampling parameters, unknown session..."""


class PromptTooLongError(InvalidRequestError):
    """Prompt plus requested tokens exceed the model's context or the configured limit."""


class CacheFullError(LSAError, RuntimeError):
    """No KV cache capacity is left for a request that would otherwise be valid."""


class SessionNotFound(LSAError):
    """No session with this id is held here: it was never created, or it was deleted."""


class SessionEvicted(SessionNotFound):
    """The session's KV was evicted to make room for others: create it again."""
