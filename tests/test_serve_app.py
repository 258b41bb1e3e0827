"""``cluster:app`` end to end on a local Ray with a tiny random model (byte tokenizer):
serve.run, HTTP with the official openai package (streaming and not), msgpack, sessions,
errors as 4xx JSON, API keys, /metrics, the batch client, and a worker restart that
resumes a session from the node's KV store without prefill."""
import collections
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from ray import serve  # noqa: E402
from ray_cluster import ray_cluster  # noqa: E402

from cluster.batch import run_batch  # noqa: E402
from cluster.client import LSAClient, SessionNotFound  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    with ray_cluster("lsa-app-test", head_cpus=4, serve_app=True):
        yield from _serve_app()


def _serve_app():
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    from cluster import app

    args = {"model": "tiny-random", "num_workers": 2, "num_ingress": 2, "block_size": 16, "kv_store_bytes": 64 << 20,
            "api_keys": [KEY], "worker_num_cpus": 0.5, "torch_threads": 1, "max_num_seqs": 4,
            "default_max_tokens": 8, "cluster": "apptest"}
    serve.run(app(args), name="lsa", route_prefix="/")
    yield f"http://127.0.0.1:{port}"


@pytest.fixture()
def client(server):
    return LSAClient(server, api_key=KEY, timeout_s=120)


def test_openai_completions_and_chat(server):
    oa = openai.OpenAI(base_url=server + "/v1", api_key=KEY)
    assert [m.id for m in oa.models.list().data] == ["tiny-random"]
    out = oa.completions.create(model="tiny-random", prompt="Hello there", max_tokens=6, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.prompt_tokens == 11
    streamed = "".join(c.choices[0].text for c in oa.completions.create(
        model="tiny-random", prompt="Hello there", max_tokens=6, temperature=0, stream=True))
    assert streamed == out.choices[0].text
    chat = oa.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=5)
    pieces = [c.choices[0].delta.content or "" for c in oa.chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True)]
    assert "".join(pieces) == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oa.completions.create(model="tiny-random", prompt="x", max_tokens=-3)
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong").models.list()


def test_sessions_json_and_msgpack(server, client):
    for c in (client, LSAClient(server, api_key=KEY, msgpack=True, timeout_s=120)):
        with c.session("The cat is named Pickles. " * 20) as s:
            first = s.ask("What is the cat's name?", max_tokens=6)
            second = s.ask("Again?", max_tokens=6)
            assert first.num_tokens == 6 and second.num_tokens == 6
            # the context's complete blocks come from the KV store: < one block + the question
            assert second.prefill_tokens < 16 + len("Question: Again? Answer in one short sentence.") + 1
        with pytest.raises(SessionNotFound):
            c.ask(s.session_id, "gone?")
    raw = urllib.request.Request(server + "/v1/sessions", data=msgpack.packb({"context_ids": list(range(5, 60))}),
                                 headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack",
                                          "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(raw, timeout=60) as resp:
        assert resp.headers["Content-Type"] == "application/msgpack"
        assert msgpack.unpackb(resp.read())["num_tokens"] == 55


def http(server, method, path, body=None, key=KEY, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server + path, data=data, method=method,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.parametrize("method,path,body,raw,status,kind", [
    ("POST", "/v1/sessions", {}, None, 400, "invalid_request_error"),
    ("POST", "/v1/sessions", None, b"{not json", 400, "invalid_request_error"),
    ("POST", "/v1/sessions/nope/ask", {"question": "q"}, None, 404, "session_not_found"),
    ("DELETE", "/v1/sessions/nope", None, None, 404, "session_not_found"),
    ("POST", "/v1/completions", {"prompt": ""}, None, 400, "invalid_request_error"),
    ("POST", "/v1/completions", {"prompt": [99999]}, None, 400, "invalid_request_error"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}, None, 400, "invalid_request_error"),
    ("POST", "/v1/completions", {"prompt": "x" * 5000}, None, 400, "context_length_exceeded"),
    ("GET", "/v1/nothing", None, None, 404, "not_found"),
    ("GET", "/v1/completions", None, None, 405, "method_not_allowed"),
])
def test_bad_input_is_a_4xx_with_a_message(server, method, path, body, raw, status, kind):
    code, payload = http(server, method, path, body, raw=raw)
    err = json.loads(payload)["error"]
    assert (code, err["type"]) == (status, kind) and err["message"]


def test_metrics_and_batch_client(server, client, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps({"id": f"j{i}", "context": f"Document {i}. " * 30,
                                          "questions": ["a?", "b?"], "max_tokens": 4}) for i in range(3)))
    out = tmp_path / "out.jsonl"
    summary = run_batch(client, jobs, out, concurrency=3, progress=False)
    assert summary.succeeded == 3 and summary.failed == 0
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == ["j0", "j1", "j2"]
    assert run_batch(client, jobs, out, progress=False).skipped == 3  # resume: nothing runs twice
    time.sleep(1.5)  # workers publish their counters with their routing stats
    code, text = http(server, "GET", "/metrics", key=None)
    text = text.decode()
    assert code == 200 and "# TYPE lsa_generated_tokens_total counter" in text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert sum(v for k, v in values.items() if k.startswith("lsa_generated_tokens_total")) > 0
    assert sum(v for k, v in values.items() if k.startswith("lsa_host_kv_capacity_bytes")) > (64 << 20) - 100_000


def test_any_ingress_replica_serves_any_session(server, client):
    """Two ingress replicas share the session directory: turns of one session answered by
    either of them all succeed and all land on the worker replica holding the session."""
    created = client.request("POST", "/v1/sessions", {"context": "Gamma rays and cosmic dust. " * 30})
    seen = collections.Counter([created["ingress"]])
    for i in range(40):
        answer = client.request("POST", f"/v1/sessions/{created['id']}/ask", {"question": f"Q{i}?",
                                                                              "max_tokens": 2})
        assert answer["replica"] == created["replica"] and answer["held"] is True
        assert answer["prefill_tokens"] < 16 + 64 < created["num_tokens"]  # the context came from the store
        seen[answer["ingress"]] += 1
        if len(seen) == 2 and min(seen.values()) >= 4:
            break
    assert len(seen) == 2 and min(seen.values()) >= 4, seen  # both ingress replicas served the session
    client.request("DELETE", f"/v1/sessions/{created['id']}")
    for _ in range(4):  # deleted through one replica: gone for every replica
        with pytest.raises(SessionNotFound):
            client.request("POST", f"/v1/sessions/{created['id']}/ask", {"question": "Still there?"})


def test_worker_restart_resumes_the_session_without_prefill(server, client):
    s = client.session("Alpha beta gamma delta. " * 40)
    first = client.request("POST", f"/v1/sessions/{s.session_id}/ask", {"question": "What?", "max_tokens": 4})
    victim = first["replica"]
    handle = serve.get_app_handle("lsa")
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"])
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    again = client.request("POST", f"/v1/sessions/{s.session_id}/ask", {"question": "What?", "max_tokens": 4})
    assert again["text"] == first["text"]
    assert again["prefill_tokens"] == first["prefill_tokens"]  # the prefix came from the node's store
    assert handle is not None


def test_a_streamed_turn_is_the_plain_turn_in_pieces(server, client):
    s = client.session("Gamma delta epsilon zeta. " * 30)
    plain = client.ask(s.session_id, "Which letters?", max_tokens=8)
    events = list(client.stream(f"/v1/sessions/{s.session_id}/ask", {"question": "Which letters?", "max_tokens": 8}))
    pieces, answer = [e["text"] for e in events[:-1]], events[-1]
    assert len(pieces) >= 2 and "".join(pieces) == answer["text"] == plain.text  # greedy: the same turn
    assert answer["num_tokens"] == plain.num_tokens and answer["prefill_tokens"] == plain.prefill_tokens
    assert "".join(client.ask(s.session_id, "Which letters?", max_tokens=8, stream=True)) == plain.text
    with pytest.raises(SessionNotFound):  # an unknown session is a 404 before any event
        list(client.stream("/v1/sessions/nope/ask", {"question": "Which?"}))
    s.close()
