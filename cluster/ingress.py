"""The HTTP edge: FastAPI routes over ``Edge``, which validates every request completely before
a worker sees it, checks keys and session owners, and calls the decode workers.

    HTTP -> build_api(edge) routes -> Edge: auth, body (size limit; decoding, validation and
            tokenization on a thread pool, so the event loop keeps answering) -> DecodeWorker
            handle (KVLocalityRouter picks the replica) -> TurnResult -> JSON | msgpack | SSE

``Ingress`` is the Serve deployment (``@serve.ingress()``, its app built per replica by
``__serve_build_asgi_app__``); tests serve ``build_api(Edge(...))`` with fake handles and no Ray.
Every failure is ``{"error": {"message", "type", "param", "code"}}`` with the status of its kind
(``error_answer``).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.config import ServeConfig
from cluster import openai_api, protocol as p, protocol_sessions as ps
from cluster.metrics import EdgeMetrics, gauges, scrape_ray_nodes
from cluster.sessions_api import SessionsAPI
from cluster.taxonomy import EdgeError, call_worker, error_answer, own_request

MSGPACK = "application/msgpack"


def _answered_errors() -> tuple[type, ...]:
    from engine.errors import LSAError

    try:
        from ray.exceptions import RayError
    except ImportError:
        return (LSAError,)
    return (LSAError, RayError)


def owner_of(key: str) -> str:
    """What the session directory records of a key: a digest, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def key_in(key: str, keys: list[str]) -> bool:
    """Constant time in the key (hmac.compare_digest against every configured key)."""
    found = False
    for k in keys:
        found |= hmac.compare_digest(key.encode(), str(k).encode())
    return found


class Edge:
    """What the routes do, with the worker and directory handles given (Serve's, or fakes)."""

    def __init__(self, config: ServeConfig, tokenizer, worker, directory, *, max_model_len: int, vocab_size: int,
                 kv_bytes_per_token: int, indexer=None, prefill=None, replica: str = "local",
                 ray_metrics: bool = True, threads: int = 4):
        """``worker``: the decode workers' handle; ``prefill``: the prefill workers' (None:
        the decode workers create sessions too)."""
        self.config, self.tokenizer, self.worker, self.indexer = config, tokenizer, worker, indexer
        self.prefill = prefill
        self.replica = replica
        self.model = config.engine.model
        self.max_model_len, self.vocab_size, self.kv_bytes_per_token = max_model_len, vocab_size, kv_bytes_per_token
        self.started = int(time.time())
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="edge")
        self.metrics = EdgeMetrics(ray_metrics)
        self.sessions = SessionsAPI(self, directory)
        self.ray_metrics = ray_metrics

    async def off_loop(self, fn, *args):
        """Run CPU work (decoding, validation, tokenization) on the edge's threads."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # -- auth and bodies ------------------------------------------------------------------

    def principal(self, request: Request) -> str | None:
        """The owner id of the request's key; None when the server has no keys. 401 otherwise."""
        if not self.config.api_keys:
            return None
        key = _bearer(request)
        if key is None or not key_in(key, self.config.api_keys):
            raise EdgeError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                            "authentication_error", code="invalid_api_key")
        return owner_of(key)

    def check_admin(self, request: Request) -> None:
        """/metrics: an admin key when ``admin_api_keys`` is set; open only on a server without keys."""
        admin, keys = self.config.admin_api_keys, self.config.api_keys
        if not admin and not keys:
            return
        key = _bearer(request)
        if admin and key is not None and key_in(key, admin):
            return
        if key is None or not (key_in(key, keys) or (admin and key_in(key, admin))):
            raise EdgeError(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
        raise EdgeError(403, "/metrics needs an admin key (admin_api_keys)" if admin else
                        "/metrics is off on a server with api_keys and no admin_api_keys: set admin_api_keys, or "
                        "scrape Ray's metrics port", "permission_error", code="admin_only")

    async def read(self, request: Request, model: type[p.Request]) -> p.Request:
        """The body, at most ``max_body_bytes`` (413), decoded and validated off the event loop."""
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise _too_large(limit) if length.isdigit() else EdgeError(400, "bad Content-Length",
                                                                       "invalid_request_error")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        return await self.off_loop(_decode_and_parse, b"".join(chunks), media, model)

    def reply(self, request: Request, body: p.Reply | dict, status: int = 200, headers: dict | None = None):
        payload = body.model_dump(exclude_none=False) if isinstance(body, p.Reply) else body
        if MSGPACK in request.headers.get("accept", ""):
            return Response(msgpack.packb(payload, use_bin_type=True), status, headers, media_type=MSGPACK)
        return JSONResponse(payload, status, headers)

    # -- OpenAI ---------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model not in (None, self.model):
            raise EdgeError(404, f"model '{model}' is not served here; GET /v1/models lists '{self.model}'",
                            "invalid_request_error", "model", "model_not_found")

    def _prompt_ids(self, req, chat: bool) -> list[int]:
        if chat:
            return self.tokenizer.encode_chat(openai_api.chat_messages(req))
        if isinstance(req.prompt, str):
            return self.tokenizer.encode(req.prompt)
        return list(req.prompt)

    async def openai(self, request: Request, chat: bool):
        start = time.perf_counter()
        self.principal(request)
        req = await self.read(request, p.ChatCompletionRequest if chat else p.CompletionRequest)
        self.check_model(req.model)
        ids = await self.off_loop(self._prompt_ids, req, chat)
        prompt_param = "messages" if chat else "prompt"
        if not chat and not isinstance(req.prompt, str) and max(ids) >= self.vocab_size:
            raise p.ProtocolError(f"token ids must be below the vocabulary size {self.vocab_size}", "prompt")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise EdgeError(400, f"the prompt has {len(ids)} tokens; this model's context holds {self.max_model_len} "
                            f"including at least one generated token: shorten it", "invalid_request_error",
                            prompt_param, "context_length_exceeded")
        limit = req.token_limit
        if limit is None:
            limit = room if chat else min(room, p.COMPLETION_DEFAULT_MAX_TOKENS)
        if limit > room:
            param = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
            raise EdgeError(400, f"this model's context holds {self.max_model_len} tokens; the prompt has {len(ids)} "
                            f"and {param} asks for {limit}: ask for at most {room}", "invalid_request_error", param,
                            "context_length_exceeded")
        logprobs = req.num_logprobs if chat else req.logprobs
        params = [openai_api.sampling_params(req, limit, i, logprobs=logprobs) for i in range(req.n)]
        key = request.headers.get("x-session-id") or req.user  # a conversation pinned to its holder
        rid, decode = openai_api.new_id(chat), self.tokenizer.decode
        if req.stream:
            handle = self.worker.options(method_name="stream", stream=True, **({"session_id": key} if key else {}))
            # n > 1: each call its own Serve request (cluster.taxonomy.own_request)
            streams = [own_request(handle, prompt_ids=ids, params=params_i) if len(params) > 1
                       else handle.remote(prompt_ids=ids, params=params_i) for params_i in params]
            firsts = await openai_api.first_items(streams)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            ttft = []
            events = openai_api.stream_events(
                chat, rid, self.model, len(ids), streams, firsts, include_usage, decode,
                on_error=lambda exc: error_answer(exc)[1].model_dump(),
                is_result=lambda item: not isinstance(item, str),
                on_token=lambda now: ttft or ttft.append(now - start),
                on_result=lambda out: self.metrics.answered(out, key is None, None, ttft[0] if ttft else None))
            return StreamingResponse(events, media_type="text/event-stream")
        handle = self.worker.options(method_name="generate", **({"session_id": key} if key else {}))
        outs = await asyncio.gather(*(call_worker(handle, prompt_ids=ids, params=params_i, fan_out=len(params) > 1)
                                       for params_i in params))
        for out in outs:
            self.metrics.answered(out, stateless=key is None, elapsed_s=time.perf_counter() - start)
        return self.reply(request, openai_api.answer(chat, rid, self.model, len(ids), outs, decode))

    # -- models and metrics ---------------------------------------------------------------

    def model_card(self) -> p.Model:
        return p.Model(id=self.model, created=self.started, max_model_len=self.max_model_len)

    async def metrics_text(self) -> str:
        workers = await self.indexer.worker_stats.remote() if self.indexer is not None else {}
        text = gauges(workers)
        if self.ray_metrics:
            text += await self.off_loop(scrape_ray_nodes) + "\n"
        return text

    async def health(self) -> str:
        """"ok", then the workers' warnings (e.g. an arena too small for one request), a line each."""
        workers = await self.indexer.worker_stats.remote() if self.indexer is not None else {}
        warnings = sorted({w for stats in workers.values() for w in stats.warnings})
        return "\n".join(["ok"] + [f"warning: {w}" for w in warnings])


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def _too_large(limit: int) -> EdgeError:
    return EdgeError(413, f"the request body is over {limit} bytes (max_body_bytes): send less, or token ids "
                     f"with msgpack", "invalid_request_error", code="request_too_large")


def _decode_and_parse(raw: bytes, media: str, model: type[p.Request]) -> p.Request:
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True) if media == MSGPACK else json.loads(raw or b"{}")
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the client's
        raise p.ProtocolError(f"cannot parse the request body as {'msgpack' if media == MSGPACK else 'JSON'}: "
                              f"{exc}"[:300], None, "invalid_body") from None
    return p.parse(model, body)


def build_api(edge: Edge) -> FastAPI:
    """The routes; every answer, errors included, is JSON or msgpack (``Accept``) or SSE."""
    api = FastAPI(title="lsa-serve", docs_url=None, redoc_url=None)

    async def answer_error(request: Request, exc: Exception):
        status, body, headers = error_answer(exc)
        return edge.reply(request, body, status, headers)

    for kind in (EdgeError, p.ProtocolError, *_answered_errors()):  # the expected failures; anything else is a logged 500
        api.add_exception_handler(kind, answer_error)
    api.add_exception_handler(Exception, answer_error)

    @api.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        err = EdgeError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind, code=kind)
        return await answer_error(request, err)

    api.add_middleware(CountRequests, metrics=edge.metrics)

    @api.get("/health")
    async def health():
        return PlainTextResponse(await edge.health())

    @api.get("/metrics")
    async def metrics(request: Request):
        edge.check_admin(request)
        return PlainTextResponse(await edge.metrics_text(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(request: Request):
        edge.principal(request)
        return edge.reply(request, p.ModelList(data=[edge.model_card()]))

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        edge.principal(request)
        edge.check_model(model_id)
        return edge.reply(request, edge.model_card())

    @api.post("/v1/completions", response_model=p.Completion)
    async def completions(request: Request):
        return await edge.openai(request, chat=False)

    @api.post("/v1/chat/completions", response_model=p.ChatCompletion)
    async def chat(request: Request):
        return await edge.openai(request, chat=True)

    @api.post("/v1/sessions", response_model=ps.SessionCreated)
    async def create_session(request: Request):
        owner = edge.principal(request)
        return edge.reply(request, await edge.sessions.create(await edge.read(request, ps.SessionCreate), owner))

    @api.post("/v1/sessions/{session_id}/ask", response_model=ps.SessionAnswer)
    async def ask(session_id: str, request: Request):
        owner = edge.principal(request)
        req = await edge.read(request, ps.SessionAsk)
        if req.stream:
            return StreamingResponse(await edge.sessions.ask_stream(session_id, req, owner),
                                     media_type="text/event-stream")
        return edge.reply(request, await edge.sessions.ask(session_id, req, owner))

    @api.delete("/v1/sessions/{session_id}", response_model=ps.SessionDeleted)
    async def delete_session(session_id: str, request: Request):
        return edge.reply(request, await edge.sessions.delete(session_id, edge.principal(request)))

    return api


class CountRequests:
    """Counts every answer by route template and status (plain ASGI: streams and cancellation
    pass through untouched)."""

    def __init__(self, app, metrics: EdgeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self.metrics.inc("requests", route=route, status=message["status"])
            await send(message)

        await self.app(scope, receive, counted)
