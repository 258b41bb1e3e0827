"""Python client for the lsa-serve HTTP API (sync and async).

Needs only the standard library, ``msgpack``, pydantic (the contract: cluster/protocol.py and
cluster/protocol_sessions.py) and engine/errors.py; it never imports Ray or torch, so it runs on
any machine that can reach the server.

    client = LSAClient("http://head:8000")
    with client.session(long_document) as s:
        print(s.ask("Who wrote it?", max_tokens=32).text)

Requests are built, and answers read, with the models of the contract (the server
validates with them): a bad argument fails here, before anything is sent. Errors are
``LSAError`` with the server's ``status``, ``type``, ``param`` and ``code``; only what can succeed
later is retried (``max_retries``, honouring ``Retry-After``): 429, 503 and connection errors,
never a 400.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Sequence

import msgpack

import engine.errors as errors  # the server's typed errors: a module that imports nothing
from cluster import protocol as p
from cluster import protocol_sessions as ps

JSON = "application/json"
MSGPACK = "application/msgpack"
TRANSIENT_STATUS = frozenset({429, 503})  # load that passes, a dependency coming back
CONNECTION_ERROR = "connection_error"
MAX_RETRY_WAIT_S = 30.0


class LSAError(errors.LSAError):
    """An error answered by the server (``status`` set) or met on the way (``status`` None:
    a connection error, or a request this client refused to send). The server's errors are
    those of engine/errors.py; here they carry their HTTP answer."""

    def __init__(self, message: str, *, status: int | None = None, type: str = "error",
                 retry_after_s: float | None = None, param: str | None = None, code: str | None = None):
        Exception.__init__(self, f"[{status or '-'} {type}{f' {param}' if param else ''}] {message}")
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    @property
    def transient(self) -> bool:
        """Asking again can succeed: 429 (load), 503 (a dependency down), or no answer at all."""
        return self.status in TRANSIENT_STATUS or self.type == CONNECTION_ERROR

    def body(self) -> dict:
        """The error as the server answers it: ``{"error": {"message", "type", "param", "code"}}``."""
        return p.ErrorResponse(error=p.ErrorDetail(message=self.message, type=self.type, param=self.param,
                                                   code=self.code)).model_dump()


class SessionNotFound(LSAError, errors.SessionNotFound):
    """The server's ``SessionNotFound`` or ``SessionEvicted`` (404 ``session_not_found``):
    the session is unknown to the server or its KV was evicted: create it again."""


@dataclass(frozen=True)
class Answer:
    session_id: str
    text: str
    num_tokens: int
    prefill_tokens: int
    decode_s: float
    cached_tokens: int = 0  # the session's tokens whose KV was reused, not computed


def iter_sse(lines: Iterator[bytes]) -> Iterator[dict]:
    """Yield the JSON payload of each ``data:`` event of a Server-Sent Events stream,
    stopping at ``data: [DONE]``. Multi-line data fields are joined with newlines."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
            continue
        if line or not data:  # comments, event:/id: fields, or a blank line with no data
            continue
        payload, data = "\n".join(data), []
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if "error" in event:
            raise _error_from(event, status=None)
        yield event
    if data and data != ["[DONE]"]:
        yield json.loads("\n".join(data))


def _error_from(body: Any, status: int | None, retry_after_s: float | None = None) -> LSAError:
    try:
        err = p.ErrorResponse.model_validate(body).error
    except ValueError:  # not an error object (a proxy's text, a bug): keep what it said
        err = p.ErrorDetail(message=str(body)[:500], type="http_error")
    cls = SessionNotFound if err.type == "session_not_found" else LSAError
    return cls(err.message, status=status, type=err.type, retry_after_s=retry_after_s, param=err.param,
               code=err.code)


def _request_body(model: type[p.Request], body: dict) -> dict:
    """``body`` checked against the contract before it is sent (a ``LSAError`` naming the param)."""
    try:
        return p.parse(model, body).model_dump(exclude_none=True, exclude_defaults=True)
    except p.ProtocolError as exc:
        raise LSAError(exc.message, type="invalid_request_error", param=exc.param, code=exc.code) from None


def _retry_after(headers) -> float | None:
    try:
        return float(headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


class LSAClient:
    """Blocking client. Thread-safe: it holds no per-request state.

    ``msgpack=True`` sends and accepts ``application/msgpack`` bodies (token ids and long
    contexts are smaller and faster to parse); streams are always SSE. ``max_retries``: how
    often a transient error (429, 503, no connection) is tried again, after the server's
    ``Retry-After`` or a jittered exponential backoff from ``backoff_s``.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 msgpack: bool = False, timeout_s: float = 600.0, model: str | None = None,
                 max_retries: int = 2, backoff_s: float = 0.5):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.msgpack = msgpack
        self.timeout_s = timeout_s
        self.model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s

    # -- transport -------------------------------------------------------------------

    def _open(self, method: str, path: str, body: dict | None, accept: str):
        """The response of one call, after retrying transient errors (``max_retries``)."""
        for attempt in range(self.max_retries + 1):
            try:
                return self._open_once(method, path, body, accept)
            except LSAError as e:
                if not e.transient or attempt == self.max_retries:
                    raise
                time.sleep(retry_delay(e, attempt, self.backoff_s))
        raise AssertionError("unreachable")

    def _open_once(self, method: str, path: str, body: dict | None, accept: str):
        headers = {"Accept": accept}
        data = None
        if body is not None:
            if self.msgpack:
                data, headers["Content-Type"] = msgpack.packb(body, use_bin_type=True), MSGPACK
            else:
                data, headers["Content-Type"] = json.dumps(body).encode(), JSON
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed = _decode(raw, e.headers.get("Content-Type", ""))
            except ValueError:
                parsed = raw.decode("utf-8", "replace")
            raise _error_from(parsed, e.code, _retry_after(e.headers)) from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                socket.timeout, TimeoutError) as e:
            raise LSAError(f"{method} {path}: {e}", type=CONNECTION_ERROR) from None

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """One call of the API; returns the decoded body. Raises ``LSAError``."""
        with self._open(method, path, body, MSGPACK if self.msgpack else JSON) as resp:
            try:
                raw = resp.read()
            except (http.client.HTTPException, ConnectionError, socket.timeout) as e:
                raise LSAError(f"{method} {path}: {e}", type=CONNECTION_ERROR) from None
            return _decode(raw, resp.headers.get("Content-Type", ""))

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """POST with ``"stream": true`` and yield the SSE events as dicts."""
        resp = self._open("POST", path, {**body, "stream": True}, "text/event-stream")
        with resp:
            yield from iter_sse(resp)

    # -- OpenAI-compatible -----------------------------------------------------------

    def _with_model(self, body: dict) -> dict:
        return {"model": self.model, **body} if self.model else body

    def completion(self, prompt: str | Sequence[int], **params) -> p.Completion:
        """The whole answer of ``POST /v1/completions`` (choices, usage with cached_tokens)."""
        body = _request_body(p.CompletionRequest, self._with_model({"prompt": prompt, **params}))
        return p.Completion.model_validate(self.request("POST", "/v1/completions", body))

    def chat_completion(self, messages: list[dict], **params) -> p.ChatCompletion:
        """The whole answer of ``POST /v1/chat/completions``."""
        body = _request_body(p.ChatCompletionRequest, self._with_model({"messages": messages, **params}))
        return p.ChatCompletion.model_validate(self.request("POST", "/v1/chat/completions", body))

    def generate(self, prompt: str | Sequence[int], *, stream: bool = False, **sampling):
        """Completion text of ``prompt`` (text or token ids); with ``stream=True`` an
        iterator of text pieces."""
        if stream:
            body = _request_body(p.CompletionRequest, self._with_model({"prompt": prompt, "stream": True,
                                                                        **sampling}))
            return (p.Completion.model_validate(e).choices[0].text
                    for e in self.stream("/v1/completions", body) if e.get("choices"))
        return self.completion(prompt, **sampling).choices[0].text

    def chat(self, messages: list[dict], *, stream: bool = False, **sampling):
        """Assistant reply to ``messages``; with ``stream=True`` an iterator of pieces."""
        if stream:
            body = _request_body(p.ChatCompletionRequest, self._with_model({"messages": messages, "stream": True,
                                                                            **sampling}))
            return (p.ChatCompletionChunk.model_validate(e).choices[0].delta.content or ""
                    for e in self.stream("/v1/chat/completions", body) if e.get("choices"))
        return self.chat_completion(messages, **sampling).choices[0].message.content or ""

    def models(self) -> list[str]:
        return [m.id for m in p.ModelList.model_validate(self.request("GET", "/v1/models")).data]

    def healthy(self) -> bool:
        """True when ``/-/healthz`` answers 2xx. Behind Ray Serve the proxy itself answers
        this path, with the plain text ``success``."""
        try:
            with self._open_once("GET", "/-/healthz", None, "*/*") as resp:
                resp.read()
            return True
        except LSAError:
            return False

    def health(self) -> str:
        """The app's ``/health`` text: "ok", then the workers' warnings a line each (an arena too
        small for one request, an arena CUDA could not page-lock)."""
        with self._open_once("GET", "/health", None, "text/plain") as resp:
            return resp.read().decode()

    def metrics(self) -> str:
        """The app's ``/metrics`` text (Prometheus exposition: gauges per worker and node store)."""
        with self._open_once("GET", "/metrics", None, "text/plain") as resp:
            return resp.read().decode()

    # -- sessions --------------------------------------------------------------------

    def create_session(self, context: str | Sequence[int]) -> dict:
        body = {"context": context} if isinstance(context, str) else {"context_ids": list(context)}
        created = self.request("POST", "/v1/sessions", _request_body(ps.SessionCreate, body))
        return ps.SessionCreated.model_validate(created).model_dump() | created

    def ask(self, session_id: str, question: str, *, stream: bool = False, **sampling):
        """A turn on the session: its ``Answer``; with ``stream=True`` an iterator of text pieces
        (SSE ``{"text": piece}`` events, then the answer's fields, which are not yielded)."""
        path = f"/v1/sessions/{urllib.parse.quote(session_id, safe='')}/ask"
        body = _request_body(ps.SessionAsk, {"question": question, **sampling})
        if stream:
            return (e["text"] for e in self.stream(path, body) if "text" in e and "session" not in e)
        out = ps.SessionAnswer.model_validate(self.request("POST", path, body))
        return Answer(session_id=out.session, text=out.text, num_tokens=out.num_tokens,
                      prefill_tokens=out.prefill_tokens, decode_s=out.decode_s, cached_tokens=out.cached_tokens)

    def delete_session(self, session_id: str) -> None:
        self.request("DELETE", f"/v1/sessions/{urllib.parse.quote(session_id, safe='')}")

    def session(self, context: str | Sequence[int]) -> "Session":
        """Prefill ``context`` once on the server; ask follow-ups on the returned session."""
        created = self.create_session(context)
        return Session(self, created["id"], created["num_tokens"])


class Session:
    """A long context held by the server. ``close()`` (or leaving ``with``) frees its KV."""

    def __init__(self, client: LSAClient, session_id: str, num_tokens: int):
        self.client, self.session_id, self.num_tokens = client, session_id, num_tokens
        self.closed = False

    def ask(self, question: str, **sampling) -> Answer:
        return self.client.ask(self.session_id, question, **sampling)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.client.delete_session(self.session_id)
        except SessionNotFound:
            pass

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def retry_delay(error: LSAError, attempt: int, backoff_s: float) -> float:
    """Seconds before trying ``error``'s call again: jittered exponential, at least the server's
    ``Retry-After``, at most 30."""
    delay = backoff_s * (2 ** attempt) * random.uniform(0.5, 1.5)
    if error.retry_after_s is not None:
        delay = max(delay, error.retry_after_s)
    return min(delay, MAX_RETRY_WAIT_S)


def _decode(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    media_type = content_type.split(";")[0].strip()
    if media_type.startswith("text/"):
        return raw.decode("utf-8", "replace")
    if media_type == MSGPACK:
        try:
            return msgpack.unpackb(raw, raw=False)
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as e:
            raise ValueError(f"bad msgpack body: {e}") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"bad JSON body: {e}") from None


class AsyncLSAClient:
    """The same API as ``LSAClient`` for asyncio code. Each call runs the blocking client
    in the loop's default thread pool, so no async HTTP library is needed."""

    def __init__(self, url: str = "http://127.0.0.1:8000", **kwargs):
        self.sync = LSAClient(url, **kwargs)

    async def request(self, method: str, path: str, body: dict | None = None) -> Any:
        return await asyncio.to_thread(self.sync.request, method, path, body)

    async def generate(self, prompt, *, stream: bool = False, **sampling):
        if stream:
            return _aiter(self.sync.generate(prompt, stream=True, **sampling))
        return await asyncio.to_thread(self.sync.generate, prompt, **sampling)

    async def chat(self, messages: list[dict], *, stream: bool = False, **sampling):
        if stream:
            return _aiter(self.sync.chat(messages, stream=True, **sampling))
        return await asyncio.to_thread(self.sync.chat, messages, **sampling)

    async def completion(self, prompt, **params) -> p.Completion:
        return await asyncio.to_thread(self.sync.completion, prompt, **params)

    async def chat_completion(self, messages: list[dict], **params) -> p.ChatCompletion:
        return await asyncio.to_thread(self.sync.chat_completion, messages, **params)

    async def models(self) -> list[str]:
        return await asyncio.to_thread(self.sync.models)

    async def healthy(self) -> bool:
        return await asyncio.to_thread(self.sync.healthy)

    async def session(self, context: str | Sequence[int]) -> "AsyncSession":
        created = await asyncio.to_thread(self.sync.create_session, context)
        return AsyncSession(self.sync, created["id"], created["num_tokens"])


class AsyncSession:
    def __init__(self, client: LSAClient, session_id: str, num_tokens: int):
        self._session = Session(client, session_id, num_tokens)
        self.session_id, self.num_tokens = session_id, num_tokens

    async def ask(self, question: str, **sampling) -> Answer:
        return await asyncio.to_thread(self._session.ask, question, **sampling)

    async def close(self) -> None:
        await asyncio.to_thread(self._session.close)

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _aiter(it: Iterator[str]) -> AsyncIterator[str]:
    done = object()
    while True:
        item = await asyncio.to_thread(next, it, done)
        if item is done:
            return
        yield item
