"""Disaggregated prefill (issue 14, item 3, the CPU target) on a ``ray.cluster_utils.Cluster``:
a head, a prefill node and a decode node (custom resources place the workers), tiny random
model, LSA with a small resident set so that plans are made while decoding.

The same context and questions (greedy, token ids) go through a colocated app (one decode
worker prefills and answers) and then through a disaggregated app (``prefill_workers=1``: a
``PrefillWorker`` on the prefill node creates the session, two decode workers on the decode
node take its turns). Checked: the answers are the same; the session was created by the prefill
replica on the prefill node and answered by a decode replica on the decode node (their own
records); the first turn prefilled only the question (the context's blocks came from the
prefill node's store into the decode node's, through the stores' existing block copy); the
second turn stays on that decode replica, which then holds the session. Also: a prefill
worker's typed error fails only its request; a session no turn has moved yet is deleted at
the prefill node's store."""
import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.own_process  # Serve's driver-side state: see conftest.py
from ray import serve  # noqa: E402
from ray_cluster import LSA_ACTORS, ray_cluster  # noqa: E402

from actors.directory import HEAD  # noqa: E402
from cluster.client import LSAClient, LSAError  # noqa: E402
from cluster.local import free_port  # noqa: E402
from engine.errors import InvalidRequestError, root_cause  # noqa: E402

NAMESPACE = "lsa-disagg"
BLOCK = 16
# 2 MiB arenas: 117 blocks of tiny-random (1872 tokens), less than the model's 4096-token context
ARGS = {"model": "tiny-random", "block_size": BLOCK, "kv_store_bytes": 2 << 20, "torch_threads": 1,
        "worker_num_cpus": 0.5, "worker_resources": {"lsa_decode": 1}, "ingress_resources": {HEAD: 0.001},
        "policy": "lsa", "budget": 0.25, "min_resident_tokens": 0, "cycle": 4, "tail_tokens": 16,
        "prefill_chunk": 128, "default_max_tokens": 12}
DISAGG = {"num_workers": 2, "prefill_workers": 1, "prefill_num_cpus": 0.5, "prefill_resources": {"lsa_prefill": 1}}
CONTEXT = [(i * 37 + 11) % 250 + 1 for i in range(32 * BLOCK)]  # 32 complete blocks, no EOS (id 0)
# longer than LSA's prefill window (32): the turn loads every context block, prefills only the question
QUESTIONS = [[(i * 13 + q * 7) % 240 + 5 for i in range(40)] for q in range(2)]


@pytest.fixture(scope="module")
def cluster():
    nodes = ({"num_cpus": 1, "resources": {"lsa_prefill": 1}}, {"num_cpus": 1, "resources": {"lsa_decode": 2}})
    with ray_cluster(NAMESPACE, head_cpus=1, worker_nodes=nodes, serve_app=True) as (_, (prefill, decode)):
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        yield {"url": f"http://127.0.0.1:{port}", "prefill_node": prefill.node_id, "decode_node": decode.node_id}


def deploy(name: str, args: dict):
    from cluster import app

    serve.run(app(args), name=name, route_prefix="/")


def session_turns(url: str) -> tuple[dict, list[dict]]:
    """Create the session, ask each question, then the first again: (created, answers)."""
    client = LSAClient(url, timeout_s=120)
    created = client.request("POST", "/v1/sessions", {"context_ids": CONTEXT})
    answers = [client.request("POST", f"/v1/sessions/{created['id']}/ask",
                              {"question": q, "max_tokens": 12, "ignore_eos": True})
               for q in QUESTIONS + QUESTIONS[:1]]
    return created, answers


@pytest.fixture(scope="module")
def colocated(cluster):
    """The reference: the colocated app's answers; the app and its actors are gone afterwards."""
    deploy("colocated", {**ARGS, "num_workers": 1, "cluster": "colocated"})
    try:
        created, answers = session_turns(cluster["url"])
        # one decode worker prefilled the session and answered every turn
        assert {deployment_of(r["replica"]) for r in [created, *answers]} == {"DecodeWorker"}
        assert {r["replica"] for r in answers} == {created["replica"]} and answers[0]["held"] is True
        return created, answers
    finally:
        serve.delete("colocated")
        for actor in ray.util.list_named_actors(all_namespaces=True):  # stores, directory, indexer: fresh ones next
            if actor["name"].startswith(LSA_ACTORS):
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))


@pytest.fixture(scope="module")
def disagg(cluster, colocated):
    deploy("disagg", {**ARGS, **DISAGG, "cluster": "disagg"})
    return cluster["url"]


def deployment_of(replica: str) -> str:
    """The Serve deployment of a replica, from its actor's name (``SERVE_REPLICA::app#deployment#id``)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith("#" + replica)]
    assert len(names) == 1, names
    return names[0].split("#")[1]


def store(node_id: str):
    return ray.get_actor(f"kvstore:{node_id}", namespace=NAMESPACE)


def test_disaggregated_prefill_answers_as_colocated(cluster, colocated, disagg):
    ref_created, ref = colocated
    prefill_node, decode_node = cluster["prefill_node"], cluster["decode_node"]
    sent_before = ray.get(store(prefill_node).stats.remote()).blocks_sent
    created, answers = session_turns(disagg)

    # the same tokens: greedy, with the context's KV computed on another node and moved
    assert [a["text"] for a in answers] == [a["text"] for a in ref]
    assert [a["num_tokens"] for a in answers] == [a["num_tokens"] for a in ref] == [12] * 3
    assert created["num_tokens"] == ref_created["num_tokens"] == len(CONTEXT)
    assert created["prefill_tokens"] == ref_created["prefill_tokens"] == len(CONTEXT)

    # created by the prefill replica on the prefill node, by its own record
    assert deployment_of(created["replica"]) == "PrefillWorker" and created["node"] == prefill_node
    first, second, third = answers
    # answered by a decode replica on the decode node, which did not hold the session before
    assert deployment_of(first["replica"]) == "DecodeWorker" and first["node"] == decode_node
    assert first["held"] is False
    # the context came from the store: only the question was prefilled (as in the colocated app)
    assert [a["prefill_tokens"] for a in answers] == [a["prefill_tokens"] for a in ref] == [40] * 3
    assert first["cached_tokens"] == len(CONTEXT)
    # later turns stay on that decode replica (of two), which holds the session now
    assert second["replica"] == third["replica"] == first["replica"]
    assert second["held"] is True and third["held"] is True

    # the blocks moved to the decode node's store (the existing copy through the object store)
    assert ray.get(store(decode_node).has.remote(created["id"]))
    assert not ray.get(store(prefill_node).has.remote(created["id"]))
    assert ray.get(store(prefill_node).stats.remote()).blocks_sent - sent_before == len(CONTEXT) // BLOCK
    directory = ray.get_actor("lsa-sessions", namespace=NAMESPACE)
    assert ray.get(directory.get.remote(created["id"])).replica == first["replica"]


def test_prefill_worker_errors_are_typed_and_fail_only_their_request(cluster, disagg):
    client = LSAClient(disagg, timeout_s=120)
    # longer than the prefill node's arena (1872 tokens), shorter than the model's context (the edge's check):
    # the prefill worker refuses it, typed
    with pytest.raises(LSAError) as refused:
        client.request("POST", "/v1/sessions", {"context_ids": CONTEXT * 4})
    assert refused.value.status == 400 and refused.value.code == "context_length_exceeded"
    # the prefill worker goes on: the next session is created there and answered
    created = client.request("POST", "/v1/sessions", {"context_ids": CONTEXT[:128]})
    assert deployment_of(created["replica"]) == "PrefillWorker" and created["prefill_tokens"] == 128
    answer = client.request("POST", f"/v1/sessions/{created['id']}/ask", {"question": QUESTIONS[0], "max_tokens": 2})
    assert deployment_of(answer["replica"]) == "DecodeWorker" and answer["num_tokens"] >= 1
    # a turn sent to a prefill worker (a caller of the deployment's handle) is refused, typed
    handle = serve.get_deployment_handle("PrefillWorker", app_name="disagg")
    with pytest.raises(Exception) as wrong:
        handle.ask.remote(created["id"], QUESTIONS[0], None).result(timeout_s=60)
    cause = root_cause(wrong.value)
    assert isinstance(cause, InvalidRequestError) and cause.code == "prefill_worker", repr(wrong.value)


def test_a_session_no_turn_has_moved_is_deleted_at_the_prefill_node(cluster, disagg):
    client = LSAClient(disagg, timeout_s=120)
    created = client.request("POST", "/v1/sessions", {"context_ids": CONTEXT[:64]})
    prefill_store = store(cluster["prefill_node"])
    assert ray.get(prefill_store.has.remote(created["id"]))
    client.request("DELETE", f"/v1/sessions/{created['id']}")  # routed to a decode worker, on the decode node
    assert not ray.get(prefill_store.has.remote(created["id"]))


def test_the_app_deploys_prefill_workers_only_when_asked():
    from cluster.serve_app import app

    colocated = app({"model": "tiny-random"})._bound_deployment
    assert colocated.init_args[2] is None  # the ingress's prefill handle: none
    bound = app({"model": "tiny-random", **DISAGG, "prefill_num_gpus": 0.25})._bound_deployment
    worker, prefill = bound.init_args[0]._bound_deployment, bound.init_args[2]._bound_deployment
    assert (worker.name, prefill.name) == ("DecodeWorker", "PrefillWorker")
    assert prefill.num_replicas == 1 and prefill.init_kwargs == {"role": "prefill"}
    assert prefill.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.25, "resources": {"lsa_prefill": 1.0}}
    assert worker.num_replicas == 2 and not worker.init_kwargs
