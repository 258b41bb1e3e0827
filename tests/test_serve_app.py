"""``cluster:app`` end to end on a local Ray (2 decode workers, 2 ingress replicas, tiny random
model, byte tokenizer): the official openai package (sync, async, streaming with include_usage,
n, seed, logprobs) and LiteLLM's OpenAI-compatible provider; a table of bad and unsupported
requests, each its status with an OpenAI error naming the param, a good request answered after
each; sessions over JSON and msgpack owned by their API key; the body limit; admin-only
/metrics whose counters from both ingress replicas add up to the requests sent; the batch
client; a worker restart that resumes a session from the node's KV store without prefill. Last,
the faults: a decode worker killed during a 6-job batch, and separately the node's KV store
killed during another, lose no job (6 of 6 answered exactly once: the client retries what the
server calls retryable); after the store's death no worker is left serving with the dead store
(each moves to the new one: its store generation goes up, and it answers)."""
import asyncio
import collections
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.own_process  # Serve's driver-side state: see conftest.py
openai = pytest.importorskip("openai")
from ray import serve  # noqa: E402
from ray_cluster import ray_cluster  # noqa: E402

from cluster import protocol as p  # noqa: E402
from cluster.batch import run_batch  # noqa: E402
from cluster.batch_openai import BatchOutputLine  # noqa: E402
from cluster.client import LSAClient, SessionNotFound  # noqa: E402
from cluster.local import free_port  # noqa: E402
from cluster.metrics import sum_series  # noqa: E402
from bad_requests import BAD, CHAT, MAX_BODY  # noqa: E402
from fault_batch import batch_with_a_fault, named, worker_stats_by_process  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY, OTHER_KEY, ADMIN = "test-key", "other-key", "admin-key"


@pytest.fixture(scope="module")
def server():
    with ray_cluster("lsa-app-test", head_cpus=4, serve_app=True, system_config={"metrics_report_interval_ms": 500}):
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        from cluster import app

        args = {"model": "tiny-random", "num_workers": 2, "num_ingress": 2, "block_size": 16,
                "kv_store_bytes": 64 << 20, "api_keys": [KEY, OTHER_KEY], "admin_api_keys": [ADMIN],
                "max_body_bytes": MAX_BODY, "worker_num_cpus": 0.5, "torch_threads": 1, "max_num_seqs": 4,
                "default_max_tokens": 8, "cluster": "apptest"}
        serve.run(app(args), name="lsa", route_prefix="/")
        yield f"http://127.0.0.1:{port}"


@pytest.fixture()
def client(server):
    return LSAClient(server, api_key=KEY, timeout_s=120)


def http(server, method, path, body=None, key=KEY, raw=None, headers=None):
    """(status, decoded body or text, headers) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
               **(headers or {})}
    req = urllib.request.Request(server + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, payload, got = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as e:
        status, payload, got = e.code, e.read(), e.headers
    if got.get("Content-Type", "").startswith("application/json"):
        return status, json.loads(payload), got
    return status, payload.decode(), got


# ------------------------------------------------------------------------------- OpenAI clients


def test_openai_package_sync_stream_async(server):
    oa = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in oa.models.list().data] == ["tiny-random"]
    assert oa.models.retrieve("tiny-random").id == "tiny-random"
    out = oa.completions.create(model="tiny-random", prompt="Hello there", max_tokens=6, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.prompt_tokens == 11
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens_details.cached_tokens >= 0
    chunks = list(oa.completions.create(model="tiny-random", prompt="Hello there", max_tokens=6, temperature=0,
                                        stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6  # the include_usage chunk
    assert all(c.usage is None for c in chunks[:-1])

    chat = oa.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=5, temperature=0)
    stream = list(oa.chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    assert stream[0].choices[0].delta.role == "assistant" and stream[-1].usage.total_tokens == chat.usage.total_tokens

    # n choices; a seed makes sampling (OpenAI's default temperature, 1.0) repeatable
    two = oa.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "x"}], n=2,
                                     max_tokens=4, seed=11)
    again = oa.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "x"}], n=2,
                                       max_tokens=4, seed=11)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 8
    assert [c.message.content for c in two.choices] == [c.message.content for c in again.choices]

    # logprobs: greedy picks the most likely token, so each token's logprob is its top alternative's
    scored = oa.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = scored.choices[0].logprobs.content
    assert len(content) == 5 and scored.choices[0].message.content == chat.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob <= 0
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-6)
        assert sum(2.718281828 ** t.logprob for t in token.top_logprobs) <= 1 + 1e-6

    async def run_async():
        aoa = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)
        answers = await asyncio.gather(*(aoa.chat.completions.create(
            model="tiny-random", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
            for _ in range(3)))
        streamed = await aoa.chat.completions.create(model="tiny-random", messages=[{"role": "user",
                                                                                     "content": "hi"}],
                                                     max_tokens=5, temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
        pieces, usage = [], None
        async for c in streamed:
            pieces += [c.choices[0].delta.content or ""] if c.choices else []
            usage = c.usage or usage
        return [a.choices[0].message.content for a in answers], "".join(pieces), usage

    texts, streamed, usage = asyncio.run(run_async())
    assert texts == [chat.choices[0].message.content] * 3 and streamed == texts[0] and usage.completion_tokens == 5

    with pytest.raises(openai.BadRequestError) as info:
        oa.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "x"}],
                                   tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert info.value.body["param"] == "tools"
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()


def test_litellm_openai_compatible_provider(server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the price list at import
    litellm = pytest.importorskip("litellm")
    kw = dict(model="openai/tiny-random", api_base=server + "/v1", api_key=KEY, max_tokens=5, temperature=0)
    out = litellm.completion(messages=[{"role": "user", "content": "hi"}], **kw)
    text = out.choices[0].message.content
    assert out.usage.completion_tokens == 5 and out.usage.prompt_tokens > 0
    pieces = [c.choices[0].delta.content or "" for c in litellm.completion(
        messages=[{"role": "user", "content": "hi"}], stream=True, **kw) if c.choices]
    assert "".join(pieces) == text
    with pytest.raises(litellm.BadRequestError, match="response_format"):
        litellm.completion(messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_object"},
                           **kw)


# ------------------------------------------------------------------------------- bad requests



def test_bad_requests_get_their_status_and_a_good_request_succeeds_after_each(server):
    assert len(BAD) >= 40
    for method, path, body, status, param, code in BAD:
        key = body.pop("_key") if isinstance(body, dict) and "_key" in body else KEY
        raw = body if isinstance(body, bytes) else None
        is_msgpack = raw is not None and (raw.startswith(b"\x82") or raw.startswith(b"\xc1"))
        headers = {"Content-Type": "application/msgpack"} if is_msgpack else None
        got, answer, _ = http(server, method, path, None if raw else body, key=key, raw=raw, headers=headers)
        case = f"{method} {path} {str(body)[:80]}"
        assert got == status, (case, answer)
        err = p.ErrorResponse.model_validate(answer).error  # message, type, param, code
        assert set(answer["error"]) == {"message", "type", "param", "code"} and err.message, case
        assert err.param == param, (case, answer)
        assert code is None or err.code == code, (case, answer)
        good, ok, _ = http(server, "POST", "/v1/chat/completions", CHAT)
        assert good == 200 and p.ChatCompletion.model_validate(ok).usage.completion_tokens == 2, case


# ------------------------------------------------------------------------------- sessions, limits, metrics


def test_a_prompt_that_extends_an_earlier_one_reuses_its_kv(server):
    """Prefix reuse over HTTP with 2 workers: the router sends the longer prompt to the replica
    whose store holds the earlier one's blocks, which loads them instead of prefilling."""
    oa = openai.OpenAI(base_url=server + "/v1", api_key=KEY)
    prompt = "The cat is named Pickles and sleeps all day. " * 8
    first = oa.completions.create(model="tiny-random", prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    time.sleep(2.5)  # workers publish the prefixes their stores hold with their routing stats
    second = oa.completions.create(model="tiny-random", prompt=prompt + first.choices[0].text + " Why?",
                                   max_tokens=4, temperature=0)
    # all but the policy's observation window (32 for lsa) and a block or two: loaded, not prefilled
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 64 > 0
    code, text, _ = http(server, "GET", "/health", key=None)  # Serve's proxy answers /-/healthz itself
    assert code == 200 and text.splitlines()[0] == "ok"
    assert LSAClient(server).health() == text  # the client reads the same text (no key needed)


def test_sessions_json_and_msgpack(server, client):
    for c in (client, LSAClient(server, api_key=KEY, msgpack=True, timeout_s=120)):
        with c.session("The cat is named Pickles. " * 20) as s:
            first = s.ask("What is the cat's name?", max_tokens=6)
            second = s.ask("Again?", max_tokens=6)
            assert first.num_tokens == 6 and second.num_tokens == 6
            # the context's complete blocks come from the KV store: < one block + the question
            assert second.prefill_tokens < 16 + len("Question: Again? Answer in one short sentence.") + 1
            assert second.cached_tokens >= s.num_tokens - 16
        with pytest.raises(SessionNotFound):
            c.ask(s.session_id, "gone?")
    raw = urllib.request.Request(server + "/v1/sessions", data=msgpack.packb({"context_ids": list(range(5, 60))}),
                                 headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack",
                                          "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(raw, timeout=60) as resp:
        assert resp.headers["Content-Type"] == "application/msgpack"
        assert msgpack.unpackb(resp.read())["num_tokens"] == 55


def test_a_session_belongs_to_the_key_that_created_it(server, client):
    created = client.create_session("Secret: the vault code is 4711. " * 10)
    other = LSAClient(server, api_key=OTHER_KEY, timeout_s=60)
    for call in (lambda: other.ask(created["id"], "What is the code?"), lambda: other.delete_session(created["id"])):
        with pytest.raises(SessionNotFound) as info:  # 404 as for an unknown id: ids do not leak
            call()
        assert info.value.status == 404
    unknown = http(server, "POST", "/v1/sessions/0123456789abcdef/ask", {"question": "q"}, key=OTHER_KEY)[1]
    theirs = http(server, "POST", f"/v1/sessions/{created['id']}/ask", {"question": "q"}, key=OTHER_KEY)[1]
    assert theirs["error"]["message"].replace(created["id"], "ID") == \
        unknown["error"]["message"].replace("0123456789abcdef", "ID")
    assert client.ask(created["id"], "What is the code?", max_tokens=3).num_tokens == 3  # the owner still can
    client.delete_session(created["id"])


def test_body_limit_json_and_msgpack(server):
    big = {"messages": [{"role": "user", "content": "y" * MAX_BODY}]}
    assert http(server, "POST", "/v1/chat/completions", big)[0] == 413
    packed = msgpack.packb({"context_ids": [7] * (MAX_BODY + 1)})  # one byte per small int
    status, answer, _ = http(server, "POST", "/v1/sessions", raw=packed,
                             headers={"Content-Type": "application/msgpack"})
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    status, _, _ = http(server, "POST", "/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": "z" * 1000}]})
    assert status == 200  # under the limit


def test_metrics_need_the_admin_key_and_add_up_over_ingress_replicas(server):
    assert http(server, "GET", "/metrics", key=None)[0] == 401
    assert http(server, "GET", "/metrics", key=KEY)[0] == 403
    route = 'lsa_requests_total'

    def served():
        status, text, _ = http(server, "GET", "/metrics", key=ADMIN)
        assert status == 200
        lines = [line for line in text.splitlines()
                 if line.startswith(route) and 'route="/v1/completions"' in line and 'status="200"' in line]
        return sum_series("\n".join(lines), route), {line.split('replica="')[1].split('"')[0] for line in lines}

    before, settled, give_up = served()[0], time.time(), time.time() + 20
    while time.time() - settled < 2.0 and time.time() < give_up:  # earlier tests' late answers counted first
        time.sleep(0.5)
        if (now := served()[0]) != before:
            before, settled = now, time.time()
    sent = 12
    for i in range(sent):
        assert http(server, "POST", "/v1/completions", {"prompt": f"count {i}", "max_tokens": 1})[0] == 200
    deadline = time.time() + 30
    while (now := served())[0] < before + sent and time.time() < deadline:
        time.sleep(0.5)
    total, replicas = now
    assert total == before + sent  # each request counted once, by the replica that served it
    assert len(replicas) == 2  # both ingress replicas served some of them
    _, text, _ = http(server, "GET", "/metrics", key=ADMIN)
    assert sum_series(text, "lsa_decode_tokens_total") > 0 and "lsa_time_to_first_token_seconds_bucket" in text
    assert 'lsa_worker_phase_seconds_bucket{' in text and 'phase="first_token"' in text  # where a turn's time went
    assert sum_series(text, "lsa_arena_capacity_bytes") > (64 << 20) - 100_000  # gauges from the workers' stats


def test_batch_client(server, client, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps({"id": f"j{i}", "context": f"Document {i}. " * 30,
                                          "questions": ["a?", "b?"], "max_tokens": 4}) for i in range(3)))
    out = tmp_path / "out.jsonl"
    summary = run_batch(client, jobs, out, concurrency=3, progress=False)
    assert summary.succeeded == 3 and summary.failed == 0
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == ["j0", "j1", "j2"]
    assert run_batch(client, jobs, out, progress=False).skipped == 3  # resume: nothing runs twice
    openai_jobs = tmp_path / "openai.jsonl"
    openai_jobs.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                               "body": {**CHAT, "temperature": 0}}) + "\n" for i in range(3)))
    openai_out = tmp_path / "openai_out.jsonl"
    assert run_batch(client, openai_jobs, openai_out, progress=False).succeeded == 3
    lines = [BatchOutputLine.model_validate_json(line) for line in openai_out.read_text().splitlines()]
    assert all(line.response.status_code == 200 and line.response.request_id.startswith("chatcmpl-")
               for line in lines)


def test_soak_benchmark_sends_every_kind_and_reads_memory(server):
    """``lsa bench soak``'s traffic against this app for 9 s: sessions created, asked and
    deleted, chats and bad requests, each answer the status it must have; latency per window
    and memory from /metrics (with the admin key) and from the Ray processes."""
    from benchmarks.soak import SoakPlan, run_soak

    plan = SoakPlan(minutes=0.15, rate=3, sessions=2, turns=2, context=40, chat_tokens=10, max_tokens=2, window_s=3)
    result = run_soak(server, plan, KEY, ADMIN, os.getpid(), "Alpha beta gamma delta epsilon. " * 100)
    assert result["mismatches"] == []
    kinds = result["statuses_by_kind"]
    assert set(kinds) == {"create", "ask", "delete", "chat", "bad"}, kinds
    assert all(set(statuses) == {"200"} for kind, statuses in kinds.items() if kind != "bad"), kinds
    assert set(kinds["bad"]) <= {"400", "404"} and sum(kinds["bad"].values()) >= 2, kinds
    assert result["requests"] >= 25 and len(result["windows"]) >= 3
    for sample in result["memory"][0], result["memory"][-1]:
        assert sample["worker_rss_bytes"] > 0 and sample["arena_free_bytes"] > 0 and sample["ray_rss_bytes"] > 0


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
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"])
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    again = client.request("POST", f"/v1/sessions/{s.session_id}/ask", {"question": "What?", "max_tokens": 4})
    assert again["text"] == first["text"]
    assert again["prefill_tokens"] == first["prefill_tokens"]  # the prefix came from the node's store


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


# ------------------------------------------------------------------------------- faults (last: they kill)


def test_a_decode_worker_killed_during_a_batch_loses_no_job(server, client, tmp_path):
    def kill_a_worker():
        worker = next(a for a in named("DecodeWorker"))
        ray.kill(ray.get_actor(worker["name"], namespace=worker["namespace"]), no_restart=True)

    batch_with_a_fault(client, tmp_path, "w", kill_a_worker)


def test_a_store_killed_during_a_batch_loses_no_job_and_every_worker_moves_to_the_new_store(server, client,
                                                                                            tmp_path):
    before = worker_stats_by_process()
    assert len(before) == 2
    store = named("kvstore:")
    assert len(store) == 1  # one node, one store

    def kill_the_store():
        ray.kill(ray.get_actor(store[0]["name"], namespace=store[0]["namespace"]), no_restart=True)

    batch_with_a_fault(client, tmp_path, "s", kill_the_store)
    # no worker left with the dead store: both move to its successor (the one that took no turn
    # since learns of it from its routing stats or its health check)
    deadline = time.monotonic() + 60
    while True:
        after = worker_stats_by_process()
        moved = {pid: after[pid].store_generation > before[pid].store_generation for pid in before if pid in after}
        if len(moved) == 2 and all(moved.values()) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert len(moved) == 2 and all(moved.values()), {pid: s.store_generation for pid, s in after.items()}
    assert named("kvstore:") and named("kvstore:")[0]["name"] == store[0]["name"]  # a new store, same name
    for i in range(4):  # and the app still serves sessions
        s = client.session(f"After the fault {i}. " * 20)
        assert client.ask(s.session_id, "Still there?", max_tokens=3).text is not None
