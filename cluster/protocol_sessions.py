"""The bodies of the sessions API, this server's own (a part of the contract of
cluster/protocol.py: pydantic only; the server's routes are in cluster/sessions_api.py).

    POST   /v1/sessions           SessionCreate  -> SessionCreated
    POST   /v1/sessions/{id}/ask  SessionAsk     -> SessionAnswer (or SSE: {"text": piece} events, then its fields)
    DELETE /v1/sessions/{id}                     -> SessionDeleted

Turns are greedy unless a temperature is given.
"""
from __future__ import annotations

from typing import Optional, Union

from pydantic import Field, field_validator, model_validator

from cluster.protocol import Reply, Request, Sampling


class SessionCreate(Request):
    """A long context, prefilled once: text (framed as a document) or token ids."""

    context: Optional[str] = Field(None, min_length=1)
    context_ids: Optional[list[int]] = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self):
        if (self.context is None) == (self.context_ids is None):
            raise ValueError("give exactly one of 'context' (text) and 'context_ids' (token ids)")
        if self.context is not None and not self.context.strip():
            raise ValueError("'context' is blank")
        if self.context_ids is not None and any(t < 0 for t in self.context_ids):
            raise ValueError("token ids are non-negative integers")
        return self


class SessionAsk(Sampling):
    question: Union[str, list[int]]
    stream: bool = False  # SSE: {"text": piece} events, then the SessionAnswer's fields, then [DONE]

    @field_validator("question")
    @classmethod
    def _question(cls, question):
        if isinstance(question, str) and not question.strip():
            raise ValueError("the question is empty")
        if isinstance(question, list) and (not question or any(t < 0 for t in question)):
            raise ValueError("give non-empty text or non-negative token ids")
        return question


class SessionCreated(Reply):
    id: str
    num_tokens: int
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    replica: str = ""
    node: str = ""
    ingress: str = ""


class SessionAnswer(Reply):
    session: str
    text: str
    num_tokens: int
    prefill_tokens: int
    cached_tokens: int = 0
    decode_s: float = 0.0
    prefill_s: float = 0.0
    finish_reason: Optional[str] = None
    replica: str = ""
    node: str = ""
    held: bool = False
    ingress: str = ""
    timings: dict = {}  # seconds per phase: ``ingress`` (to the worker call), then the worker's (admission, ...)


class SessionDeleted(Reply):
    deleted: str
