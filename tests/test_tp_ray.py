"""The tensor-parallel engine on Ray: 2 rank actors in one placement group (gloo on CPU) generate
exactly the single-process engine's tokens, and a killed rank fails the group with a typed error
within a bounded time instead of hanging. Last, ``cluster:app`` with ``tensor_parallel_size=2``:
a completion (plain, streamed, and through the deployment's handle) is the single-process
engine's, the replica's placement group holds it and its 2 ranks, a session's turns are the
one-GPU worker's (its context loaded from the ranks' stores, not prefilled again) and its delete
frees every rank's blocks, and a killed rank makes the next request a 503."""
from __future__ import annotations

import functools
import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig
from engine.errors import InvalidRequestError
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.sampling import SamplingParams

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.own_process  # Serve's driver-side state: see conftest.py

from actors.tp_engine import TensorParallelEngine, TensorParallelGroupError  # noqa: E402
from ray_cluster import ray_cluster  # noqa: E402

WORLD = 2
CALL_TIMEOUT_S = 60
DEAD_RANK_BOUND_S = 30
BLOCK = 16
# GQA: 4 query heads over 2 KV heads, one KV head per rank; vocabulary 67 pads its shards
LLAMA = ModelConfig(architecture="llama", vocab_size=67, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, eos_token_ids=(2,))
POLICIES = {
    "full": dict(name="full"),
    # a short tail and no neighbours: most resident blocks are chosen by the (all-reduced) scores
    "lsa": dict(name="lsa", budget=0.4, cycle=4, tail_tokens=16, neighbors=0, first_plan="indexer"),
}
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def engine_config(policy: dict) -> EngineConfig:
    return EngineConfig(device="cpu", dtype="fp32", cache=CacheConfig(block_size=BLOCK, num_device_blocks=64),
                        scheduler=SchedulerConfig(max_num_seqs=2, prefill_chunk=64),
                        policy=PolicyConfig(**{"min_resident_tokens": 0, **policy}))


# whole random weights, the same on every rank (a fixed seed); an importable callable for the ranks
make_model = functools.partial(random_model, LLAMA, seed=3)


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, LLAMA.vocab_size, (n,), generator=gen).tolist() for n in (200, 131)]


def single_process(policy: dict) -> list[list[int]]:
    engine = LLMEngine(make_model("cpu", torch.float32), engine_config(policy))
    seqs = [engine.add_request(p, PARAMS) for p in prompts()]
    while engine.has_work():
        engine.step()
    return [list(s.output_ids) for s in seqs]


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster("lsa-tp-ray", head_cpus=2 * WORLD, serve_app=True) as c:
        yield c


@pytest.fixture(scope="module")
def tp_engine(cluster):
    engine = TensorParallelEngine(WORLD, make_model, engine_config(POLICIES["full"]),
                                  call_timeout_s=CALL_TIMEOUT_S)
    yield engine
    engine.shutdown()


def test_ranks_share_one_strict_pack_placement_group(tp_engine):
    table = ray.util.placement_group_table(tp_engine.placement_group)
    assert table["strategy"] == "STRICT_PACK" and len(table["bundles"]) == WORLD
    assert table["state"] == "CREATED"


@pytest.mark.parametrize("policy", ["full", "lsa"])
def test_two_ranks_over_ray_generate_the_single_process_tokens(tp_engine, policy):
    if policy != "full":  # the same group, a new engine shard on every rank
        tp_engine.build(make_model, engine_config(POLICIES[policy]))
    want = single_process(POLICIES[policy])
    got = tp_engine.generate(prompts(), PARAMS)
    assert got == want
    assert all(len(tokens) == PARAMS.max_tokens for tokens in got)


def test_a_request_every_rank_refuses_is_raised_and_the_group_survives(tp_engine):
    with pytest.raises(InvalidRequestError, match="empty"):
        tp_engine.add_request([], PARAMS, "empty")
    with pytest.raises(InvalidRequestError, match=r"\[0, 67\)"):
        tp_engine.add_request([1, 99], PARAMS, "out-of-vocabulary")
    assert tp_engine.generate([prompts()[1][:40]], SamplingParams(max_tokens=3, ignore_eos=True))[0]


def test_a_hung_rank_fails_the_group_at_the_deadline(tp_engine):
    """Rank 1 stopped (SIGSTOP): rank 0 waits for it in a collective, so neither answers; the driver
    gives up at its deadline. Runs last on the module's engine, which it destroys."""
    tp_engine.call_timeout_s = 5
    tp_engine.add_request(prompts()[1], PARAMS, "stalled")
    pid = ray.get(tp_engine.ranks[1].__ray_call__.remote(lambda actor: os.getpid()))
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(TensorParallelGroupError, match=r"ranks \[0, 1\] of 2 did not answer step within 5 s"):
        tp_engine.step()
    assert time.monotonic() - start < 5 + DEAD_RANK_BOUND_S
    assert tp_engine.ranks == [] and tp_engine.placement_group is None


def test_a_killed_rank_fails_the_group_with_a_typed_error(cluster):
    engine = TensorParallelEngine(WORLD, make_model, engine_config(POLICIES["lsa"]), call_timeout_s=CALL_TIMEOUT_S)
    try:
        engine.add_request(prompts()[0], PARAMS, "doomed")
        engine.step()
        ray.kill(engine.ranks[1], no_restart=True)
        start = time.monotonic()
        with pytest.raises(TensorParallelGroupError, match=r"rank 1 of 2 failed during (has_work|step)"):
            while engine.has_work():
                engine.step()
        assert time.monotonic() - start < DEAD_RANK_BOUND_S
        with pytest.raises(TensorParallelGroupError, match="rank 1"):  # and on every later call
            engine.add_request(prompts()[1], PARAMS, "after")
        assert engine.ranks == []
    finally:
        engine.shutdown()


# ------------------------------------------------------------------------ served: cluster:app

SERVED = {"model": "tiny-random", "tensor_parallel_size": WORLD, "device": "cpu", "dtype": "fp32",
          "block_size": BLOCK, "num_device_blocks": 64, "max_num_seqs": 2, "prefill_chunk": 64, "worker_num_cpus": 0.5,
          "kv_store_bytes": 16 << 20, "cluster": "tpserve", "min_resident_tokens": 0,
          **{k if k != "name" else "policy": v for k, v in POLICIES["lsa"].items()}}


def post(url: str, body: dict) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            status, payload, media = resp.status, resp.read().decode(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, payload, media = e.code, e.read().decode(), e.headers.get("Content-Type", "")
    return status, json.loads(payload) if media.startswith("application/json") else payload


def generated_tokens(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("lsa_generated_tokens{"))


QUESTIONS = [[5, 9, 14, 3, 22, 8, 40], [17, 6, 33, 12, 9]]
TURN = SamplingParams(max_tokens=8, temperature=0.0)


def one_gpu_session(context: list[int], tmp_path) -> list:
    """The one-GPU decode worker's turns (``TurnResult``) on a session of ``context``."""
    from actors.decode_worker import DecodeWorkerCore
    from actors.kv_store import KVStoreCore, arena_path
    from cluster.serve_app import parse_args
    from engine.factory import arena_layout, build_engine

    cfg = parse_args(SERVED)
    store = KVStoreCore("n", arena_layout(cfg.engine), cfg.kv_store_bytes, arena_path("ref", "n", str(tmp_path)))
    core = DecodeWorkerCore.build(lambda arena: build_engine(cfg.engine, arena), store, "w")
    try:
        core.create_session("doc", context).result(timeout=120)
        return [core.ask("doc", q, TURN).result(timeout=120) for q in QUESTIONS]
    finally:
        core.close()
        store.close()


def check_sessions(url: str, handle, context: list[int]) -> None:
    """A session over HTTP: two turns equal the one-GPU worker's and prefill only the new
    tokens; a third through the handle has its very tokens; the delete frees every rank's blocks."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        want = one_gpu_session(context, tmp)
    free = handle.record_routing_stats.remote().result(timeout_s=60)["free_kv_bytes"]
    status, created = post(url + "/v1/sessions", {"context_ids": context})
    assert status == 200 and created["prefill_tokens"] == len(context), created
    session_id = created["id"]
    for question, turn in zip(QUESTIONS, want):
        status, answer = post(url + f"/v1/sessions/{session_id}/ask", {"question": question, "max_tokens": 8})
        assert status == 200, answer
        assert (answer["text"], answer["num_tokens"]) == (turn.text, len(turn.token_ids))
        assert (answer["prefill_tokens"], answer["cached_tokens"]) == (turn.prefill_tokens, turn.cached_tokens)
        assert answer["cached_tokens"] > 0 and answer["prefill_tokens"] < len(context) // 2
        assert answer["replica"] == created["replica"] and answer["held"]
    again = handle.ask.remote(session_id, QUESTIONS[1], TURN).result(timeout_s=60)
    assert again.token_ids == want[1].token_ids
    stats = handle.record_routing_stats.remote().result(timeout_s=60)
    assert stats["sessions"] == [session_id] and stats["free_kv_bytes"] < free
    request = urllib.request.Request(url + f"/v1/sessions/{session_id}", method="DELETE")
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200
    stats = handle.record_routing_stats.remote().result(timeout_s=60)
    assert stats["sessions"] == [] and stats["free_kv_bytes"] == free
    status, body = post(url + f"/v1/sessions/{session_id}/ask", {"question": QUESTIONS[0]})
    assert status == 404, body


def test_the_served_app_on_two_ranks_answers_as_one_process(cluster):
    from ray import serve

    from cluster import app
    from cluster.local import free_port
    from cluster.serve_app import parse_args
    from engine.factory import build_engine

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app(SERVED), name="lsa-tp", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    prompt = prompts()[0]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    want = build_engine(parse_args(SERVED).engine).generate([prompt], params)[0]
    assert len(want.token_ids) == 8 and want.kv["device_kv_fraction"] < 0.5  # LSA chose the resident blocks

    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    assert [(g["strategy"], len(g["bundles"])) for g in groups] == [("STRICT_PACK", 1 + WORLD)]

    handle = serve.get_deployment_handle("DecodeWorker", "lsa-tp")
    got = handle.generate.remote(prompt_ids=prompt, params=params).result(timeout_s=120)
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason and got.text == want.text
    assert got.kv["policy"] == "lsa" and got.kv["cycles"] == want.kv["cycles"]

    status, body = post(url + "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["text"] == want.text and body["usage"]["completion_tokens"] == len(want.token_ids)
    status, events = post(url + "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                    "stream": True})
    pieces = [json.loads(line[6:]) for line in events.splitlines() if line.startswith("data: {")]
    assert status == 200 and "".join(c["choices"][0]["text"] for c in pieces if c["choices"]) == want.text

    check_sessions(url, handle, prompt)
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("kvstore:")]
    deadline = time.monotonic() + 30  # the replica's stats reach /metrics through the Indexer
    while generated_tokens(url) < 3 * len(want.token_ids) and time.monotonic() < deadline:
        time.sleep(1)  # the stats come in periodically: a first report can hold part of the three requests
    assert generated_tokens(url) >= 3 * len(want.token_ids)

    # a rank killed: the replica's group fails, the request is a 503 naming the rank (the health check fails next)
    ranks = [a for a in ray._private.state.actors().values()
             if a["ActorClassName"] == "RankActor" and a["State"] == "ALIVE"]
    assert len(ranks) == WORLD
    os.kill(ranks[0]["Pid"], signal.SIGKILL)
    status, body = post(url + "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert status == 503 and body["error"]["code"] == "tensor_parallel_group_failed", body
    assert f"of {WORLD} failed" in body["error"]["message"]
