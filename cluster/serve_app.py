"""``cluster:app``: the Ray Serve application (``serve run cluster:app model=... policy=...``).

    HTTP -> Ingress (this file: OpenAI API, sessions, msgpack, API keys, /metrics)
              | DeploymentHandle, KVLocalityRouter (session -> holder, new -> most free KV)
              v
            DecodeWorker replicas (actors/worker_deployment.py) -> node KVStore, Indexer (actors/)

Between the ingress and a worker travel typed messages: ``SamplingParams`` in, a
``TurnResult`` (actors/messages.py) back.

Every error is an HTTP 4xx/5xx answer ``{"error": {"message", "type"}}``; the client
(cluster/client.py) implements the other side of the contract.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Optional

import msgpack
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from actors.config import ServeConfig
from actors.directory import directory_handle
from actors.messages import TurnResult, WorkerStats
from actors.worker_deployment import DecodeWorker, indexer_handle
from engine.errors import CacheFullError, InvalidRequestError, LSAError, PromptTooLongError, SessionNotFound
from engine.options import build
from engine.sampling import SamplingParams

MSGPACK = "application/msgpack"
DOC_HEAD = "Read the following document carefully and answer the questions after it.\n\n<document>\n"
DOC_TAIL = "\n</document>\n\n"
QUESTION = "Question: {question} Answer in one short sentence."
SENTINEL = "\x00LSA-SPLIT\x00"


def parse_args(args: dict | ServeConfig | None) -> ServeConfig:
    """Application arguments (``serve run cluster:app key=value``, a config file's ``args``,
    or ``lsa serve key=value``): the engine's flat options plus ServeConfig's own."""
    if isinstance(args, ServeConfig):
        return args
    return build(ServeConfig, dict(args or {}))


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type, headers or {}


def classify(exc: BaseException) -> HTTPError:
    """Map an engine error (possibly wrapped by Ray) to an HTTP answer."""
    cause = exc
    for _ in range(3):
        inner = getattr(cause, "cause", None)
        if inner is None or inner is cause:
            break
        cause = inner
    msg = str(getattr(cause, "args", [""])[0] if getattr(cause, "args", None) else cause)
    if isinstance(cause, HTTPError):
        return cause
    if isinstance(cause, SessionNotFound):
        return HTTPError(404, msg, "session_not_found")
    if isinstance(cause, PromptTooLongError):
        return HTTPError(400, msg, "context_length_exceeded")
    if isinstance(cause, InvalidRequestError):
        return HTTPError(400, msg, "invalid_request_error")
    if isinstance(cause, CacheFullError):
        return HTTPError(503, msg, "overloaded", {"Retry-After": "1"})
    if isinstance(cause, LSAError):
        return HTTPError(400, msg, "invalid_request_error")
    return HTTPError(500, f"{type(cause).__name__}: {msg}"[:1000], "internal_error")


class Ingress:
    def __init__(self, worker, config: ServeConfig):
        from engine.factory import arena_layout

        self.args = config
        self.worker = worker
        self.tokenizer = _load_tokenizer(config)
        layout = arena_layout(config.engine)
        self.kv_bytes_per_token = layout.block_bytes // layout.block_size
        self.directory = directory_handle()  # session records: any ingress replica serves any session
        self.indexer = indexer_handle()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.started = time.time()
        self.requests = 0
        self.errors = 0
        self._layout = layout
        self._placer = None

    async def _place_stores(self, period_s: float = 10.0) -> None:
        from actors.kv_store import KVStore
        from actors.placement import ensure_per_node

        cfg = self.args
        while True:
            try:
                await asyncio.to_thread(ensure_per_node, KVStore, "kvstore", cfg.cluster, cfg.kv_store_bytes,
                                        self._layout, cfg.kv_dir, num_cpus=0)
            except Exception:  # a node going away mid-pass; the next pass retries
                pass
            await asyncio.sleep(period_s)

    # -- plumbing -------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        self.requests += 1
        if self._placer is None:  # a node that joins later gets its KV store within seconds
            self._placer = asyncio.get_running_loop().create_task(self._place_stores())
        try:
            self._authorize(request)
            return await self._route(request)
        except Exception as exc:  # every failure is an answer
            err = classify(exc)
            self.errors += 1
            return self._reply(request, {"error": {"message": err.message, "type": err.type}}, err.status,
                               err.headers)

    def _authorize(self, request: Request) -> None:
        if not self.args.api_keys or request.url.path in ("/metrics", "/health"):
            return
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:].strip() not in self.args.api_keys:
            raise HTTPError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                            "authentication_error")

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        try:
            body = msgpack.unpackb(raw, raw=False) if ctype == MSGPACK else json.loads(raw or b"{}")
        except Exception as e:
            raise HTTPError(400, f"cannot parse the request body ({ctype or 'json'}): {e}", "invalid_request_error")
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be an object", "invalid_request_error")
        return body

    def _reply(self, request: Request, payload: Any, status: int = 200, headers: dict | None = None) -> Response:
        if MSGPACK in request.headers.get("accept", ""):
            return Response(msgpack.packb(payload, use_bin_type=True), status, headers, media_type=MSGPACK)
        return JSONResponse(payload, status, headers)

    async def _route(self, request: Request) -> Response:
        method, parts = request.method, [p for p in request.url.path.split("/") if p]
        if parts == ["health"] or parts == ["-", "healthz"]:
            return PlainTextResponse("ok")
        if parts == ["metrics"]:
            return PlainTextResponse(await self.metrics(), media_type="text/plain; version=0.0.4")
        if parts[:1] != ["v1"]:
            raise HTTPError(404, f"no route {method} {request.url.path}", "not_found")
        route = parts[1:]
        if route == ["models"] and method == "GET":
            return self._reply(request, {"object": "list", "data": [
                {"id": self.args.engine.model, "object": "model", "owned_by": "lsa-serve", "created": int(self.started)}]})
        if route in (["completions"], ["chat", "completions"]) and method == "POST":
            return await self.openai(request, chat=route[0] == "chat")
        if route == ["sessions"] and method == "POST":
            return self._reply(request, await self.create_session(await self._body(request)))
        if len(route) == 3 and route[0] == "sessions" and route[2] == "ask" and method == "POST":
            body = await self._body(request)
            if body.get("stream"):
                return await self.ask_stream(route[1], body)
            return self._reply(request, await self.ask(route[1], body))
        if len(route) == 2 and route[0] == "sessions" and method == "DELETE":
            return self._reply(request, await self.delete_session(route[1]))
        known = ["models"], ["completions"], ["chat", "completions"], ["sessions"]
        if route in known or (route[:1] == ["sessions"] and len(route) in (2, 3)):
            raise HTTPError(405, f"method {method} not allowed on {request.url.path}", "method_not_allowed")
        raise HTTPError(404, f"no route {method} {request.url.path}", "not_found")

    # -- OpenAI ---------------------------------------------------------------------------

    def _params(self, body: dict) -> SamplingParams:
        """The request's sampling parameters, validated here: a bad value is a 400 before any
        worker sees it."""
        params = {k: body.get(k) for k in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                                            "ignore_eos")}
        if params["max_tokens"] is None:
            params["max_tokens"] = body.get("max_completion_tokens") or self.args.default_max_tokens
        for key, kind in (("max_tokens", int), ("temperature", (int, float)), ("top_p", (int, float))):
            if params[key] is not None and (not isinstance(params[key], kind) or isinstance(params[key], bool)):
                raise HTTPError(400, f"{key} must be a number", "invalid_request_error")
        if isinstance(params["stop"], str):
            params["stop"] = [params["stop"]]
        return SamplingParams(**{k: v for k, v in params.items() if v is not None})

    def _prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise HTTPError(400, "'messages' must be a non-empty list", "invalid_request_error")
            return self.tokenizer.encode_chat(messages)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return prompt
        raise HTTPError(400, "'prompt' must be a non-empty string or list of token ids", "invalid_request_error")

    async def openai(self, request: Request, chat: bool) -> Response:
        body = await self._body(request)
        model = body.get("model")
        if model not in (None, self.args.engine.model):
            raise HTTPError(404, f"model {model!r} is not served here; GET /v1/models lists "
                            f"{self.args.engine.model!r}", "model_not_found")
        prompt_ids, params = self._prompt_ids(body, chat), self._params(body)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.args.engine.model}
        if body.get("stream"):
            return await self._stream(prompt_ids, params, head, chat)
        out: TurnResult = await self.worker.options(method_name="generate").remote(prompt_ids, params)
        choice = ({"index": 0, "message": {"role": "assistant", "content": out.text}}
                  if chat else {"index": 0, "text": out.text, "logprobs": None})
        choice["finish_reason"] = out.finish_reason
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(out.token_ids),
                 "total_tokens": len(prompt_ids) + len(out.token_ids)}
        return self._reply(request, {**head, "choices": [choice], "usage": usage})

    async def _stream(self, prompt_ids, params, head, chat) -> Response:
        gen = self.worker.options(method_name="stream", stream=True).remote(prompt_ids, params)
        kind = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        # the first item is awaited here, so that a bad request is a 4xx, not a broken stream
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None

        def event(piece: str | None, finish: str | None = None) -> bytes:
            if chat:
                delta = {"content": piece} if piece is not None else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**kind, 'choices': [choice]})}\n\n".encode()

        async def events():
            item = first
            try:
                if chat:
                    yield f"data: {json.dumps({**kind, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}]})}\n\n".encode()
                while item is not None:
                    if isinstance(item, TurnResult):
                        yield event(None, item.finish_reason)
                        break
                    yield event(item)
                    item = await gen.__anext__()
            except StopAsyncIteration:
                pass
            except Exception as exc:
                err = classify(exc)
                yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type}})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- sessions -------------------------------------------------------------------------

    def _context_ids(self, body: dict) -> list[int]:
        context, context_ids = body.get("context"), body.get("context_ids")
        if isinstance(context, str) and context.strip():
            text = self.tokenizer.chat_prompt([{"role": "user", "content": DOC_HEAD + context + DOC_TAIL + SENTINEL}]) \
                if self.tokenizer.has_chat_template else DOC_HEAD + context + DOC_TAIL + SENTINEL
            return self.tokenizer.encode(text.split(SENTINEL)[0], add_special_tokens=False)
        if isinstance(context_ids, list) and context_ids and all(type(t) is int for t in context_ids):
            return context_ids
        raise HTTPError(400, "a session needs 'context' (non-empty text) or 'context_ids' (token ids)",
                        "invalid_request_error")

    def _question_ids(self, body: dict) -> list[int]:
        question = body.get("question")
        if isinstance(question, list) and question and all(type(t) is int for t in question):
            return question
        if not isinstance(question, str) or not question.strip():
            raise HTTPError(400, "'question' must be non-empty text (or token ids)", "invalid_request_error")
        suffix = ""
        if self.tokenizer.has_chat_template:
            suffix = self.tokenizer.chat_prompt([{"role": "user", "content": SENTINEL}]).split(SENTINEL)[1]
        return self.tokenizer.encode(QUESTION.format(question=question.strip()) + suffix, add_special_tokens=False)

    async def create_session(self, body: dict) -> dict:
        context_ids = self._context_ids(body)
        session_id = uuid.uuid4().hex
        out: TurnResult = await self._call_worker("create_session", session_id=session_id, context_ids=context_ids,
                                                  kv_bytes=len(context_ids) * self.kv_bytes_per_token)
        await self.directory.create.remote(session_id, context_ids, out.replica, out.node_id)
        return {"id": session_id, "num_tokens": len(context_ids), "prefill_tokens": out.prefill_tokens,
                "prefill_s": round(out.prefill_s, 4), "replica": out.replica, "node": out.node_id,
                "ingress": self.replica}

    async def _session_record(self, session_id: str):
        record = await self.directory.get.remote(session_id)
        if record is None:
            raise HTTPError(404, f"no session {session_id} (deleted, evicted or never created): create it with "
                            f"POST /v1/sessions", "session_not_found")
        return record

    def _answer(self, session_id: str, out: TurnResult) -> dict:
        return {"session": session_id, "text": out.text, "num_tokens": len(out.token_ids),
                "prefill_tokens": out.prefill_tokens, "decode_s": round(out.decode_s, 4),
                "prefill_s": round(out.prefill_s, 4), "finish_reason": out.finish_reason,
                "replica": out.replica, "node": out.node_id, "held": out.held, "ingress": self.replica}

    async def ask_stream(self, session_id: str, body: dict) -> Response:
        """A turn as Server-Sent Events: ``{"text": piece}`` as tokens decode, then the answer
        (the fields of a plain ask), then ``[DONE]``."""
        record = await self._session_record(session_id)
        question_ids, params = self._question_ids(body), self._params(body)
        gen = self.worker.options(method_name="ask_stream", stream=True).remote(
            session_id=session_id, question_ids=question_ids, params=params, context_ids=record.context_ids,
            holder=record.replica)
        try:  # the first item is awaited here, so that a bad request is a 4xx, not a broken stream
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as exc:
            err = classify(exc)
            if err.type == "session_not_found":
                await self.directory.delete.remote(session_id)
            raise err from None

        async def events():
            item = first
            try:
                while item is not None:
                    if isinstance(item, TurnResult):
                        self.directory.served.remote(session_id, item.replica, item.node_id)
                        yield f"data: {json.dumps(self._answer(session_id, item))}\n\n".encode()
                        break
                    yield f"data: {json.dumps({'text': item})}\n\n".encode()
                    item = await gen.__anext__()
            except StopAsyncIteration:
                pass
            except Exception as exc:
                err = classify(exc)
                yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type}})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def ask(self, session_id: str, body: dict) -> dict:
        record = await self._session_record(session_id)
        question_ids, params = self._question_ids(body), self._params(body)
        try:
            out: TurnResult = await self._call_worker("ask", session_id=session_id, question_ids=question_ids,
                                                      params=params, context_ids=record.context_ids,
                                                      holder=record.replica)
        except Exception as exc:
            err = classify(exc)
            if err.type == "session_not_found":  # evicted: the client creates it again
                await self.directory.delete.remote(session_id)
            raise err from None
        self.directory.served.remote(session_id, out.replica, out.node_id)
        return self._answer(session_id, out)

    async def delete_session(self, session_id: str) -> dict:
        if await self.directory.delete.remote(session_id) is None:
            raise HTTPError(404, f"no session {session_id}", "session_not_found")
        await self._call_worker("delete_session", session_id=session_id)
        return {"deleted": session_id}

    async def _call_worker(self, method: str, attempts: int = 4, **kwargs):
        """A worker call that survives its replica dying under it (node lost, replica killed):
        Serve drops the dead replica and the next attempt is routed among the live ones."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        for attempt in range(attempts):
            try:
                return await self.worker.options(method_name=method).remote(**kwargs)
            except (ActorDiedError, ActorUnavailableError, RayActorError):
                if attempt == attempts - 1:
                    raise
                kwargs.pop("holder", None)
                await asyncio.sleep(0.5 * 2 ** attempt)

    # -- metrics --------------------------------------------------------------------------

    async def metrics(self) -> str:
        workers = await self.indexer.worker_stats.remote()
        return prometheus(workers, await self.directory.count.remote(), self.requests, self.errors)


def prometheus(workers: dict[str, WorkerStats], sessions: int, requests: int, errors: int) -> str:
    """Text exposition format (version 0.0.4)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP lsa_{name} {help}")
        lines.append(f"# TYPE lsa_{name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"lsa_{name}{{{lab}}} {float(value):.6g}" if lab else f"lsa_{name} {float(value):.6g}")

    stores = {w.node_id: w.store for w in workers.values() if w.store is not None}
    per_worker = lambda key: [({"replica": r}, getattr(w, key)) for r, w in sorted(workers.items())]  # noqa: E731
    metric("sessions", "gauge", "Sessions in the session directory.", [({}, sessions)])
    metric("requests_total", "counter", "HTTP requests.", [({}, requests)])
    metric("request_errors_total", "counter", "HTTP requests answered with an error.", [({}, errors)])
    metric("worker_sessions", "gauge", "Sessions a worker holds.", per_worker("sessions"))
    metric("queue_length", "gauge", "Requests waiting for admission.", per_worker("queue"))
    metric("running_requests", "gauge", "Requests in the batch.", per_worker("running"))
    metric("device_kv_bytes", "gauge", "KV bytes on the device.", per_worker("device_kv_bytes"))
    memory = lambda key: [({"replica": r}, w.memory.get(key, 0)) for r, w in sorted(workers.items())]  # noqa: E731
    metric("gpu_memory_bytes", "gauge", "GPU memory a worker's torch allocated.", memory("gpu_allocated_bytes"))
    metric("pinned_host_bytes", "gauge", "Pinned host memory in a worker's torch pool (the arena not counted).",
           memory("pinned_host_bytes"))
    metric("worker_rss_bytes", "gauge", "Resident host memory of a worker process.", memory("rss_bytes"))
    metric("resident_fraction", "gauge", "Device KV over full-context KV of running requests.",
           per_worker("resident_fraction"))
    metric("blocks_copied_total", "counter", "Single-layer blocks copied host to device.",
           per_worker("blocks_copied"))
    metric("misses_total", "counter", "Blocks needed but not in the host mirror.", per_worker("misses"))
    metric("generated_tokens_total", "counter", "Tokens generated.", per_worker("generated_tokens"))
    metric("prefill_tokens_total", "counter", "Prompt tokens computed (not loaded from a store).",
           per_worker("prefill_tokens"))
    metric("tokens_per_second", "gauge", "Generated tokens per busy second.", per_worker("tokens_per_s"))
    metric("host_kv_bytes", "gauge", "Host KV bytes held by sessions, per node store.",
           [({"node": n}, s.session_bytes) for n, s in sorted(stores.items())])
    metric("host_kv_capacity_bytes", "gauge", "Host KV arena size, per node store.",
           [({"node": n}, s.capacity_bytes) for n, s in sorted(stores.items())])
    metric("host_kv_free_bytes", "gauge", "Free host KV bytes, per node store.",
           [({"node": n}, s.free_bytes) for n, s in sorted(stores.items())])
    metric("evictions_total", "counter", "Idle sessions evicted, per node store.",
           [({"node": n}, s.evictions) for n, s in sorted(stores.items())])
    metric("spilled_blocks", "gauge", "Session blocks held by another node's store.",
           [({"node": n}, s.spilled_blocks) for n, s in sorted(stores.items())])
    return "\n".join(lines) + "\n"


def _load_tokenizer(config: ServeConfig):
    from engine.factory import TINY_RANDOM, ByteTokenizer

    if config.engine.model == TINY_RANDOM:
        return ByteTokenizer()
    from engine.tokenizer import Tokenizer
    from engine.weights import resolve_model

    return Tokenizer(resolve_model(config.engine.model))


def app(args: dict):
    """The application builder Serve calls with the arguments as a dict."""
    config = parse_args(args)  # a bad name, type or value fails here, before deploying
    router = RequestRouterConfig(request_router_class="cluster.router:KVLocalityRouter",
                                 request_routing_stats_period_s=config.routing_stats_period_s)
    options = {"num_cpus": config.worker_num_cpus, "num_gpus": config.worker_num_gpus}
    if config.worker_resources:
        options["resources"] = config.worker_resources
    worker = DecodeWorker.options(num_replicas=config.num_workers, ray_actor_options=options,
                                  request_router_config=router).bind(config)
    ingress_options = {"num_cpus": 0, **({"resources": config.ingress_resources} if config.ingress_resources else {})}
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=config.num_ingress, max_ongoing_requests=256,
                               ray_actor_options=ingress_options)
    return ingress.bind(worker, config)


__all__ = ["app", "parse_args", "Ingress", "prometheus"]
_ = ray  # ray is imported for Serve's worker processes
