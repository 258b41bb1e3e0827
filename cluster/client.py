"""Python client for the lsa-serve HTTP API (sync and async).

Needs only the standard library, ``msgpack`` and engine/errors.py; it never imports Ray
or torch, so it runs on any machine that can reach the server.

    client = LSAClient("http://head:8000")
    with client.session(long_document) as s:
        print(s.ask("Who wrote it?", max_tokens=32).text)

The HTTP contract (the server implements it; docs/cluster.md):

    POST   /v1/completions, /v1/chat/completions   OpenAI JSON; "stream": true gives SSE
    GET    /v1/models, /-/healthz
    POST   /v1/sessions              {"context": str} | {"context_ids": [int]} -> {"id", "num_tokens"}
    POST   /v1/sessions/{id}/ask     {"question", "max_tokens", ...} -> Answer fields; "stream": true
                                     gives SSE: {"text": piece} ..., then the Answer fields
    DELETE /v1/sessions/{id}         -> {"deleted": id}
    errors: 4xx/5xx {"error": {"message", "type"}}; 404 session_not_found; 429/503 transient
"""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Sequence

import msgpack

import engine.errors as errors  # the server's typed errors: a module that imports nothing

JSON = "application/json"
MSGPACK = "application/msgpack"
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class LSAError(errors.LSAError):
    """An error answered by the server (``status`` set) or met on the way (``status`` None).
    The server's errors are those of engine/errors.py; here they carry their HTTP answer."""

    def __init__(self, message: str, *, status: int | None = None, type: str = "error",
                 retry_after_s: float | None = None):
        super().__init__(f"[{status or '-'} {type}] {message}")
        self.message = message
        self.status = status
        self.type = type
        self.retry_after_s = retry_after_s

    @property
    def transient(self) -> bool:
        return self.status is None or self.status in TRANSIENT_STATUS


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
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"message": str(body)[:500], "type": "http_error"}
    kind = str(err.get("type") or "error")
    cls = SessionNotFound if kind == "session_not_found" else LSAError
    return cls(str(err.get("message", "")), status=status, type=kind, retry_after_s=retry_after_s)


def _retry_after(headers) -> float | None:
    try:
        return float(headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


class LSAClient:
    """Blocking client. Thread-safe: it holds no per-request state.

    ``msgpack=True`` sends and accepts ``application/msgpack`` bodies (token ids and long
    contexts are smaller and faster to parse); streams are always SSE.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 msgpack: bool = False, timeout_s: float = 600.0, model: str | None = None):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.msgpack = msgpack
        self.timeout_s = timeout_s
        self.model = model

    # -- transport -------------------------------------------------------------------

    def _open(self, method: str, path: str, body: dict | None, accept: str):
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
            raise LSAError(f"{method} {path}: {e}", type="connection_error") from None

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """One call of the API; returns the decoded body. Raises ``LSAError``."""
        with self._open(method, path, body, MSGPACK if self.msgpack else JSON) as resp:
            try:
                raw = resp.read()
            except (http.client.HTTPException, ConnectionError, socket.timeout) as e:
                raise LSAError(f"{method} {path}: {e}", type="connection_error") from None
            return _decode(raw, resp.headers.get("Content-Type", ""))

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """POST with ``"stream": true`` and yield the SSE events as dicts."""
        resp = self._open("POST", path, {**body, "stream": True}, "text/event-stream")
        with resp:
            yield from iter_sse(resp)

    # -- OpenAI-compatible -----------------------------------------------------------

    def _with_model(self, body: dict) -> dict:
        return {"model": self.model, **body} if self.model else body

    def generate(self, prompt: str | Sequence[int], *, stream: bool = False, **sampling):
        """Completion text of ``prompt`` (text or token ids); with ``stream=True`` an
        iterator of text pieces."""
        body = self._with_model({"prompt": prompt, **sampling})
        if stream:
            return (e["choices"][0].get("text", "") for e in self.stream("/v1/completions", body))
        return self.request("POST", "/v1/completions", body)["choices"][0]["text"]

    def chat(self, messages: list[dict], *, stream: bool = False, **sampling):
        """Assistant reply to ``messages``; with ``stream=True`` an iterator of pieces."""
        body = self._with_model({"messages": messages, **sampling})
        if stream:
            return (e["choices"][0].get("delta", {}).get("content") or ""
                    for e in self.stream("/v1/chat/completions", body))
        return self.request("POST", "/v1/chat/completions", body)["choices"][0]["message"]["content"]

    def models(self) -> list[str]:
        return [m["id"] for m in self.request("GET", "/v1/models")["data"]]

    def healthy(self) -> bool:
        """True when ``/-/healthz`` answers 2xx. Behind Ray Serve the proxy itself answers
        this path, with the plain text ``success``."""
        try:
            with self._open("GET", "/-/healthz", None, "*/*") as resp:
                resp.read()
            return True
        except LSAError:
            return False

    # -- sessions --------------------------------------------------------------------

    def create_session(self, context: str | Sequence[int]) -> dict:
        body = {"context": context} if isinstance(context, str) else {"context_ids": list(context)}
        return self.request("POST", "/v1/sessions", body)

    def ask(self, session_id: str, question: str, *, stream: bool = False, **sampling):
        """A turn on the session: its ``Answer``; with ``stream=True`` an iterator of text pieces."""
        path = f"/v1/sessions/{urllib.parse.quote(session_id, safe='')}/ask"
        if stream:
            return (e["text"] for e in self.stream(path, {"question": question, **sampling}) if "text" in e
                    and "session" not in e)
        out = self.request("POST", path, {"question": question, **sampling})
        return Answer(session_id=out["session"], text=out["text"], num_tokens=out["num_tokens"],
                      prefill_tokens=out["prefill_tokens"], decode_s=out["decode_s"])

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
