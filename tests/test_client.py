"""cluster.client against a fake lsa-serve that implements the HTTP contract in a thread.

The fake server (``FakeLSAServer``) is shared with test_client_batch.py. It reads requests and
writes answers with the models of cluster/protocol.py, the contract the real server uses, so
the client is tested against the contract itself (a bad body is the same 400 naming the param). It answers a
session question by looking it up in the context, which holds lines ``question => answer``,
and injects faults where the context says so:

    [flaky-create]   the first 2 creations of this context answer 503
    [flaky-ask]      the first 2 asks on each session answer 429 (Retry-After: 0)
    [evict]          the session is evicted after its first answer (next ask: 404)
    [slow]           each ask takes 50 ms
"""
import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgpack
import pytest

from cluster import protocol as p
from cluster import protocol_sessions as ps
from cluster.client import AsyncLSAClient, LSAClient, LSAError, SessionNotFound, iter_sse

REPO = Path(__file__).resolve().parents[1]


class FakeLSAServer:
    def __init__(self):
        self.lock = threading.Lock()
        self.sessions: dict[str, dict] = {}
        self.faults = Counter()        # (kind, key) -> faults injected so far
        self.created = Counter()       # context -> successful creations
        self.content_types = Counter()
        self.inflight = self.max_inflight = 0
        self.posts = 0
        self.broken_after: int | None = None   # answer 500 to everything after N creations
        self.on_create = None                  # callback(num_created) after each creation
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def num_created(self) -> int:
        return sum(self.created.values())

    def _fault(self, kind: str, key: str, times: int) -> bool:
        with self.lock:
            if self.faults[(kind, key)] < times:
                self.faults[(kind, key)] += 1
                return True
        return False

    # -- the contract --------------------------------------------------------------------

    def route(self, method: str, path: str, body):
        """Returns (status, payload, extra headers) or (status, list of SSE events)."""
        if self.broken_after is not None and self.num_created >= self.broken_after:
            return 500, _err("worker crashed", "internal_error"), {}
        try:
            return self._route(method, path, body)
        except p.ProtocolError as exc:
            return 400, _err(exc.message, "invalid_request_error", exc.param, exc.code), {}

    def _route(self, method: str, path: str, body):
        if (method, path) == ("GET", "/-/healthz"):  # as the Serve proxy answers it
            return 200, b"success", {}
        if (method, path) == ("GET", "/v1/models"):
            return 200, p.ModelList(data=[p.Model(id="fake-lsa")]).model_dump(), {}
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            model = (body or {}).get("model")
            if model not in (None, "fake-lsa"):
                return 404, _err(f"model {model!r} is not served here", "invalid_request_error", "model",
                                 "model_not_found"), {}
            if "[flaky]" in json.dumps(body) and self._fault("openai", json.dumps(body), 2):
                return 503, _err("a worker is restarting", "unavailable"), {"Retry-After": "0"}
        if (method, path) == ("POST", "/v1/completions"):
            req = p.parse(p.CompletionRequest, body)
            text = f"echo {req.prompt}"
            head = dict(id="cmpl-fake", created=int(time.time()), model="fake-lsa")
            if req.stream:
                return 200, [p.Completion(**head, choices=[p.CompletionChoice(index=0, text=w)]).model_dump()
                             for w in _pieces(text)]
            choice = p.CompletionChoice(index=0, text=text, finish_reason="stop")
            return 200, p.Completion(**head, choices=[choice], usage=_usage(req.prompt, text)).model_dump(), {}
        if (method, path) == ("POST", "/v1/chat/completions"):
            req = p.parse(p.ChatCompletionRequest, body)
            text = f"you said {req.messages[-1].text}"
            head = dict(id="chatcmpl-fake", created=int(time.time()), model="fake-lsa")
            if req.stream:
                return 200, [p.ChatCompletionChunk(**head, choices=[p.ChunkChoice(index=0, delta=p.Delta(content=w))])
                             .model_dump() for w in _pieces(text)]
            choice = p.ChatChoice(index=0, message=p.AssistantMessage(content=text), finish_reason="stop")
            usage = _usage(req.messages[-1].text, text)
            return 200, p.ChatCompletion(**head, choices=[choice], usage=usage).model_dump(), {}
        if (method, path) == ("POST", "/v1/sessions"):
            return self.create(p.parse(ps.SessionCreate, body))
        parts = path.split("/")
        if len(parts) >= 4 and parts[1:3] == ["v1", "sessions"]:
            session_id = parts[3]
            if method == "DELETE" and len(parts) == 4:
                with self.lock:
                    gone = self.sessions.pop(session_id, None)
                if gone is None:
                    return 404, _err(f"no session {session_id}", "session_not_found"), {}
                return 200, ps.SessionDeleted(deleted=session_id).model_dump(), {}
            if method == "POST" and parts[4:] == ["ask"]:
                return self.ask(session_id, p.parse(ps.SessionAsk, body))
        return 404, _err(f"no route {method} {path}", "not_found"), {}

    def create(self, req: ps.SessionCreate):
        context = req.context or ""
        num_tokens = len(req.context.split()) if req.context is not None else len(req.context_ids)
        if "[flaky-create]" in context and self._fault("create", context, 2):
            return 503, _err("all workers busy", "overloaded"), {"Retry-After": "0"}
        session_id = uuid.uuid4().hex
        with self.lock:
            self.sessions[session_id] = {"context": context, "asks": 0}
            self.created[context] += 1
            n = self.num_created
        if self.on_create:
            self.on_create(n)
        return 200, ps.SessionCreated(id=session_id, num_tokens=num_tokens).model_dump(), {}

    def ask(self, session_id, req: ps.SessionAsk):
        with self.lock:
            session = self.sessions.get(session_id)
        if session is None:
            return 404, _err(f"session {session_id} was evicted or never existed",
                             "session_not_found"), {}
        context = session["context"]
        if "[flaky-ask]" in context and self._fault("ask", session_id, 2):
            return 429, _err("slow down", "overloaded"), {"Retry-After": "0"}
        if "[slow]" in context:
            time.sleep(0.05)
        facts = dict(line.split(" => ", 1) for line in context.splitlines() if " => " in line)
        text = f"The answer is {facts.get(req.question, 'unknown')}."
        with self.lock:
            session["asks"] += 1
            if "[evict]" in context and session["asks"] == 1:
                self.sessions.pop(session_id, None)
        first = session["asks"] == 1
        return 200, ps.SessionAnswer(session=session_id, text=text, num_tokens=len(text.split()),
                                    prefill_tokens=len(context.split()) if first else 0,
                                    cached_tokens=0 if first else len(context.split()),
                                    decode_s=0.001).model_dump(), {}

    def _handler(server):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _serve(self, method):
                with server.lock:
                    server.posts += method == "POST"
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                self.in_flight = True
                try:
                    self._answer(method)
                finally:
                    self._done()

            def _done(self):
                # before the answer is written: once the client has read it, it may send the next
                # request while this thread is still here, which is not two requests in flight
                if self.in_flight:
                    self.in_flight = False
                    with server.lock:
                        server.inflight -= 1

            def _answer(self, method):
                ctype = self.headers.get("Content-Type", "")
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = None
                if raw:
                    server.content_types[ctype] += 1
                    body = (msgpack.unpackb(raw, raw=False) if ctype == "application/msgpack"
                            else json.loads(raw))
                status, payload, *rest = server.route(method, self.path, body)
                self._done()
                if isinstance(payload, list):  # SSE
                    self.send_response(status)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(b": keep-alive comment\n\n")
                    for event in payload:
                        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.close_connection = True
                    return
                if isinstance(payload, bytes):
                    data, out_type = payload, "text/plain"
                elif "msgpack" in self.headers.get("Accept", ""):
                    data, out_type = msgpack.packb(payload), "application/msgpack"
                else:
                    data, out_type = json.dumps(payload).encode(), "application/json"
                self.send_response(status)
                for key, value in rest[0].items():
                    self.send_header(key, value)
                self.send_header("Content-Type", out_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_DELETE(self):
                self._serve("DELETE")

        return Handler


def _err(message, kind, param=None, code=None):
    return p.ErrorResponse(error=p.ErrorDetail(message=message, type=kind, param=param, code=code)).model_dump()


def _usage(prompt, text):
    n_prompt, n_out = len(str(prompt).split()), len(text.split())
    return p.Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out)


def _pieces(text):
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


@pytest.fixture(scope="module")
def server():
    with FakeLSAServer() as s:
        yield s


def test_generate_chat_models_health(server):
    client = LSAClient(server.url)
    assert client.healthy() and client.request("GET", "/-/healthz") == "success"
    assert client.models() == ["fake-lsa"]
    assert client.generate("hello there", max_tokens=4) == "echo hello there"
    assert client.chat([{"role": "user", "content": "hi"}]) == "you said hi"


def test_sse_streaming_matches_plain_reply(server):
    client = LSAClient(server.url)
    pieces = list(client.generate("one two three", stream=True))
    assert len(pieces) == 4 and "".join(pieces) == client.generate("one two three")
    chat_pieces = list(client.chat([{"role": "user", "content": "a b"}], stream=True))
    assert len(chat_pieces) == 4
    assert "".join(chat_pieces) == client.chat([{"role": "user", "content": "a b"}])


def test_iter_sse_parses_fields_multiline_done_and_errors():
    stream = [b": comment\n", b"event: chunk\n", b"data: {\"a\":\n", b"data: 1}\n", b"\n",
              b"data: {\"a\": 2}\r\n", b"\r\n", b"data: [DONE]\n", b"\n", b"data: {\"a\": 3}\n\n"]
    assert list(iter_sse(iter(stream))) == [{"a": 1}, {"a": 2}]
    failing = [b'data: {"error": {"message": "oom", "type": "server_error"}}\n', b"\n"]
    with pytest.raises(LSAError, match="oom") as info:
        list(iter_sse(iter(failing)))
    assert info.value.type == "server_error"


def test_msgpack_round_trip(server):
    client = LSAClient(server.url, msgpack=True)
    before = server.content_types["application/msgpack"]
    ids = list(range(0, 300_000, 7))  # a long tokenized context as ids
    with client.session(ids) as s:
        assert s.num_tokens == len(ids)
    context = "Grüße => 東京\n" + "filler word " * 20_000
    with client.session(context) as s:
        assert s.num_tokens == len(context.split())
        assert s.ask("Grüße").text == "The answer is 東京."
    assert server.content_types["application/msgpack"] - before == 3  # 2 creates + 1 ask
    assert client.generate("x") == "echo x"


def test_error_types(server):
    client = LSAClient(server.url)
    with pytest.raises(SessionNotFound) as info:
        client.ask("no-such-session", "q")
    assert (info.value.status, info.value.type, info.value.transient) == (404, "session_not_found", False)
    with pytest.raises(LSAError) as info:  # sent as is: the server's 400 names the param
        client.request("POST", "/v1/sessions", {"context": 5})
    err = info.value
    assert (err.status, err.type, err.param, err.transient) == (400, "invalid_request_error", "context", False)
    with pytest.raises(LSAError) as info:  # checked before sending: the same contract, no request
        client.chat([{"role": "user", "content": "hi"}], temperature="hot")
    assert (info.value.status, info.value.param) == (None, "temperature") and not info.value.transient
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()
    with pytest.raises(LSAError) as info:
        LSAClient(f"http://127.0.0.1:{port}", timeout_s=5, max_retries=0).models()
    assert info.value.status is None and info.value.transient


def test_session_follow_ups_and_close(server):
    client = LSAClient(server.url)
    with client.session("capital => Paris\nriver => Seine") as s:
        first, second = s.ask("capital", max_tokens=8), s.ask("river", max_tokens=8)
        assert first.text == "The answer is Paris." and second.text == "The answer is Seine."
        assert first.prefill_tokens > 0 and second.prefill_tokens == 0
        assert first.session_id == s.session_id and s.session_id in server.sessions
    assert s.session_id not in server.sessions and s.closed
    s.close()  # closing twice is harmless


def test_async_client(server):
    async def main():
        client = AsyncLSAClient(server.url)
        texts = await asyncio.gather(*(client.generate(f"p{i}") for i in range(6)))
        assert texts == [f"echo p{i}" for i in range(6)]
        async with await client.session("k => v") as s:
            assert (await s.ask("k")).text == "The answer is v."
            session_id = s.session_id
        assert session_id not in server.sessions
        stream = await client.chat([{"role": "user", "content": "x y"}], stream=True)
        return [piece async for piece in stream]

    assert "".join(asyncio.run(main())) == "you said x y"


def test_import_without_ray_or_torch():
    code = ("import sys; sys.modules['ray'] = None; sys.modules['torch'] = None\n"
            "import cluster, cluster.client, cluster.batch\n"
            "print(cluster.client.LSAClient.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "LSAClient"
