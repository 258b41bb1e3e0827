"""cluster:app on a multi-node Ray (ray.cluster_utils.Cluster: a head and two worker nodes
with a custom resource), tiny random model: one KVStore per node; new sessions placed by
free capacity; every follow-up over 24 turns on 4 sessions lands on the replica holding the
session (by the replica's own record); blocks fetched across nodes are byte-identical; a
session whose KV spans two nodes decodes the same tokens as when it was held locally; a
plan reported to the Indexer stages spilled blocks before the turn; a lost node's session
is rebuilt elsewhere."""
import concurrent.futures as cf
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.own_process  # Serve's driver-side state: see conftest.py
from ray import serve  # noqa: E402
from ray_cluster import ray_cluster  # noqa: E402

from actors.directory import HEAD  # noqa: E402
from actors.messages import PlanReport  # noqa: E402
from cluster.client import LSAClient  # noqa: E402
from cluster.local import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    nodes = ({"num_cpus": 2, "resources": {"lsa_worker": 1}},) * 2
    with ray_cluster("lsa-multinode", head_cpus=2, worker_nodes=nodes, serve_app=True) as (c, workers):
        yield from _serve_app(c, workers)


def _serve_app(c, workers):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
    from cluster import app

    args = {"model": "tiny-random", "num_workers": 2, "block_size": 16, "kv_store_bytes": 32 << 20,
            "worker_num_cpus": 1, "worker_resources": {"lsa_worker": 1}, "torch_threads": 1,
            "default_max_tokens": 6, "cluster": "multinode", "ingress_resources": {HEAD: 0.001}}
    serve.run(app(args), name="lsa", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "worker_nodes": [n.node_id for n in workers], "cluster": c,
           "nodes": workers}


def store(node_id):
    return ray.get_actor(f"kvstore:{node_id}", namespace="lsa-multinode")


def test_sessions_placed_by_capacity_and_every_turn_lands_on_its_holder(cluster):
    client = LSAClient(cluster["url"], timeout_s=120)
    created = [client.request("POST", "/v1/sessions", {"context": f"Document {i}: " + "lorem ipsum " * 40})
               for i in range(4)]
    # each new session goes to the replica with the most free KV, so both replicas get sessions;
    # they alternate exactly when the replicas' periodic stats keep pace (seen 3:1 once, with
    # the 2-core machine also running a long eval)
    replicas = [c["replica"] for c in created]
    assert len(set(replicas)) == 2
    assert {c["node"] for c in created} == set(cluster["worker_nodes"])

    def ask(i):
        c = created[i % 4]
        return c, client.request("POST", f"/v1/sessions/{c['id']}/ask", {"question": f"Q{i}?", "max_tokens": 3})

    with cf.ThreadPoolExecutor(6) as pool:
        turns = list(pool.map(ask, range(24)))
    for c, answer in turns:
        assert answer["replica"] == c["replica"]  # routed to the holder
        assert answer["held"] is True  # ... which, by its own record, held the session already
        assert answer["prefill_tokens"] < 16 + 64 < c["num_tokens"]  # the context came from the store

    # exactly one KV store per node, placed with node affinity
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("kvstore:")}
    assert cluster["worker_nodes"][0] in {n.split(":", 1)[1] for n in names}
    for name in names:
        assert ray.get(ray.get_actor(name, namespace="lsa-multinode").info.remote()).node_id == name.split(":", 1)[1]
    assert {n.split(":", 1)[1] for n in names} <= nodes


def test_session_spanning_two_nodes_decodes_like_a_local_one(cluster):
    client = LSAClient(cluster["url"], timeout_s=120)
    created = client.request("POST", "/v1/sessions", {"context": "The river flows north past the mill. " * 30})
    session_id, home = created["id"], created["node"]
    other = next(n for n in cluster["worker_nodes"] if n != home)
    local = client.request("POST", f"/v1/sessions/{session_id}/ask", {"question": "Where?", "max_tokens": 8})

    a, b = store(home), store(other)
    ids = ray.get(a.view.remote(session_id)).host_ids
    before = ray.get(a.read_blocks.remote(ids))
    logical = ray.get(a.spill_session.remote(session_id, len(ids) // 2, other))
    missing = ray.get(a.missing.remote(session_id))[other]
    assert [j for j, _ in missing] == logical and ray.get(a.stats.remote()).spilled_blocks == len(logical)
    data, summary = ray.get(b.read_blocks.remote([rid for _, rid in missing]))
    assert (data == before[0][logical]).all() and (summary == before[1][logical]).all()  # byte-identical

    spanning = client.request("POST", f"/v1/sessions/{session_id}/ask", {"question": "Where?", "max_tokens": 8})
    assert spanning["text"] == local["text"] and spanning["replica"] == local["replica"]
    assert spanning["prefill_tokens"] == local["prefill_tokens"]  # staged by the indexer, not re-prefilled
    indexer = ray.get_actor("lsa-indexer", namespace="lsa-multinode")
    assert ray.get(indexer.stats.remote())["prefetched_blocks"].get(home, 0) >= len(logical)


def test_reported_plan_stages_spilled_blocks_before_the_turn(cluster):
    """A plan reported to the Indexer actor becomes a prefetch plan for the worker's node
    store: the spilled blocks it names are staged there at once, and the turn then fetches
    nothing across nodes at use time."""
    client = LSAClient(cluster["url"], timeout_s=120)
    created = client.request("POST", "/v1/sessions", {"context": "Seven lanterns hang over the bridge. " * 30})
    session_id, home = created["id"], created["node"]
    other = next(n for n in cluster["worker_nodes"] if n != home)
    local = client.request("POST", f"/v1/sessions/{session_id}/ask", {"question": "How many?", "max_tokens": 8})
    a = store(home)
    logical = ray.get(a.spill_session.remote(session_id, len(ray.get(a.view.remote(session_id)).host_ids) // 2,
                                             other))
    before = ray.get(a.stats.remote())
    indexer = ray.get_actor("lsa-indexer", namespace="lsa-multinode")
    report = PlanReport(local["replica"], home, session_id, logical)
    # the worker's own plan for this session (reported fire-and-forget after the first ask) may
    # arrive after the spill and stage part of it first: this report fetches what is left
    assert 0 <= ray.get(indexer.report_plans.remote([report])) <= len(logical)
    staged = ray.get(a.stats.remote())
    assert staged.staged_blocks == len(logical)  # on the worker's node before the turn
    # node-wide counter: plans the worker reported for the module's other sessions (sent in
    # batches, fire-and-forget) may stage their blocks meanwhile
    assert staged.blocks_prefetched - before.blocks_prefetched >= len(logical)
    answer = client.request("POST", f"/v1/sessions/{session_id}/ask", {"question": "How many?", "max_tokens": 8})
    assert answer["text"] == local["text"] and answer["prefill_tokens"] == local["prefill_tokens"]
    assert ray.get(a.stats.remote()).blocks_fetched_at_use == before.blocks_fetched_at_use  # zero


def test_session_of_a_lost_node_is_rebuilt_elsewhere(cluster):
    """The holder's node goes away (its worker and its KV store with it): the next turn is
    answered by the surviving worker, which prefills the session again from the context
    ids the session directory keeps. Last in the module: it removes a node."""
    client = LSAClient(cluster["url"], timeout_s=120)
    created = client.request("POST", "/v1/sessions", {"context": "The owl sleeps in the barn by day. " * 30})
    session_id, lost = created["id"], created["node"]
    before = client.request("POST", f"/v1/sessions/{session_id}/ask", {"question": "Who sleeps?", "max_tokens": 8})
    assert before["prefill_tokens"] < created["num_tokens"]  # held: from the store
    cluster["cluster"].remove_node(cluster["nodes"][cluster["worker_nodes"].index(lost)])

    after = client.request("POST", f"/v1/sessions/{session_id}/ask", {"question": "Who sleeps?", "max_tokens": 8})
    assert after["node"] != lost and after["replica"] != before["replica"]
    assert after["text"] == before["text"]  # the same answer, from a re-prefilled context
    assert after["prefill_tokens"] >= created["num_tokens"]  # the whole context was computed again
    directory = ray.get_actor("lsa-sessions", namespace="lsa-multinode")
    assert ray.get(directory.get.remote(session_id)).replica == after["replica"]  # the new holder
    again = client.request("POST", f"/v1/sessions/{session_id}/ask", {"question": "Who sleeps?", "max_tokens": 8})
    assert again["replica"] == after["replica"] and again["held"] is True
    assert again["prefill_tokens"] == before["prefill_tokens"]  # held on the new node now
