"""OpenAI's Batch file format for ``lsa batch`` / ``cluster.batch.run_batch``.

Input, one request a line (``BatchRequestLine``)::

    {"custom_id": "q-1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...]}}

Output, one line per request (``BatchOutputLine``), as OpenAI writes it::

    {"id": "batch_req_...", "custom_id": "q-1",
     "response": {"status_code": 200, "request_id": "chatcmpl-...", "body": {...the answer...}},
     "error": null}

A request the server refused for good (a 4xx) gets its error answer as ``response`` (status
and ``{"error": ...}`` body), as OpenAI reports failed requests; one that got no answer after
its retries (connection errors, 429, 503) gets ``error`` ``{"code", "message"}`` and runs again
on a resumed run. Each body is checked against the contract before anything is sent.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Literal, Optional

from pydantic import ConfigDict, Field

from cluster import protocol as p
from cluster.client import LSAClient, LSAError

BODIES = {"/v1/chat/completions": p.ChatCompletionRequest, "/v1/completions": p.CompletionRequest}


class BatchRequestLine(p.Request):
    """A line of an OpenAI Batch input file."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    custom_id: str = Field(min_length=1)
    method: Literal["POST"]
    url: Literal["/v1/chat/completions", "/v1/completions"]
    body: dict


class BatchResponse(p.Reply):
    status_code: int
    request_id: str
    body: dict


class BatchError(p.Reply):
    code: str
    message: str


class BatchOutputLine(p.Reply):
    """A line of an OpenAI Batch output file: ``response`` when the server answered (any
    status), ``error`` when no answer came back."""

    id: str
    custom_id: str
    response: Optional[BatchResponse] = None
    error: Optional[BatchError] = None


def is_openai_batch(path: str | os.PathLike) -> bool:
    """True when the first non-blank line is an object with ``custom_id``."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except ValueError:
                    return False
                return isinstance(first, dict) and "custom_id" in first
    return False


def read_requests(path: str | os.PathLike) -> list[BatchRequestLine]:
    """Parse and validate every line (and its body) before anything is sent; ``JobLineError``
    names the line and the param at fault."""
    from cluster.batch import JobLineError

    path, out, seen = Path(path), [], set()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                request = p.parse(BatchRequestLine, json.loads(line))
            except ValueError as exc:  # ProtocolError, json.JSONDecodeError
                raise JobLineError(path, line_no, getattr(exc, "message", str(exc))) from None
            try:
                body = p.parse(BODIES[request.url], request.body)
            except p.ProtocolError as exc:
                raise JobLineError(path, line_no, f"body: {exc.message}") from None
            if body.stream:
                raise JobLineError(path, line_no, "body.stream: a batch request cannot stream")
            if request.custom_id in seen:
                raise JobLineError(path, line_no, f"duplicate custom_id {request.custom_id!r}")
            seen.add(request.custom_id)
            out.append(request)
    return out


def run_request(client: LSAClient, request: BatchRequestLine, retries: int, backoff_s: float) -> dict:
    """One request, retried while it can succeed; never raises ``LSAError``."""
    from cluster.batch import with_retries

    line_id = f"batch_req_{uuid.uuid4().hex}"
    try:
        body = with_retries(lambda: client.request("POST", request.url, request.body), retries, backoff_s)
        response = BatchResponse(status_code=200, request_id=str(body.get("id", "")), body=body)
        line = BatchOutputLine(id=line_id, custom_id=request.custom_id, response=response)
    except LSAError as exc:
        if exc.status is None or exc.transient:  # no answer that counts: run it again on resume
            error = BatchError(code=exc.type if exc.status is None else str(exc.status), message=exc.message)
            line = BatchOutputLine(id=line_id, custom_id=request.custom_id, error=error)
        else:
            response = BatchResponse(status_code=exc.status, request_id="", body=exc.body())
            line = BatchOutputLine(id=line_id, custom_id=request.custom_id, response=response)
    return line.model_dump()


def finished(rec: dict) -> bool:
    """A line whose request needs no new try: answered (2xx, or a final 4xx)."""
    return rec.get("error") is None and isinstance(rec.get("response"), dict)


def tally(t, rec: dict) -> None:
    ok = rec.get("error") is None and rec["response"]["status_code"] < 400
    t.succeeded += ok
    t.failed += not ok
