"""One actor per node with node affinity, on a multi-node ray.cluster_utils.Cluster; a node
that joins later gets its own actor, existing ones are kept."""

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.own_process  # Serve's driver-side state: see conftest.py
from ray_cluster import ray_cluster  # noqa: E402

from actors.placement import ensure_per_node  # noqa: E402


@ray.remote(num_cpus=0)
class NodeProbe:
    def __init__(self, capacity):
        self.capacity = capacity

    def where(self):
        return ray.get_runtime_context().get_node_id(), ray.get_runtime_context().get_actor_id()


@pytest.fixture(scope="module")
def cluster():
    nodes = ({"num_cpus": 1, "resources": {"kv_store": 1}},) * 2
    with ray_cluster("lsa-test", worker_nodes=nodes) as (c, _):
        yield c


def placements(handles):
    return {node: ray.get(h.where.remote()) for node, h in handles.items()}


def test_one_actor_per_node_and_a_late_node_gets_one(cluster):
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    first = placements(ensure_per_node(NodeProbe, "kv", 1 << 20))
    assert set(first) == alive and len(alive) == 3
    assert all(node == where for node, (where, _) in first.items())

    again = placements(ensure_per_node(NodeProbe, "kv", 1 << 20))
    assert again == first  # idempotent, and detached: the same actors outlived their handles

    late = cluster.add_node(num_cpus=1, resources={"kv_store": 1})
    cluster.wait_for_nodes()
    after = placements(ensure_per_node(NodeProbe, "kv", 1 << 20))
    assert set(after) - set(first) == {late.node_id}
    assert after[late.node_id][0] == late.node_id
    assert {n: after[n] for n in first} == first

    kv_only = ensure_per_node(NodeProbe, "kv-big", 1 << 30,
                              node_filter=lambda n: n["Resources"].get("kv_store", 0) >= 1)
    assert set(kv_only) == set(after) - {cluster.head_node.node_id}
