"""KVLocalityRouter on a local single-node Ray with 2 replicas of a toy deployment that
holds sessions and reports them (record_routing_stats) and its capacity
(record_replica_metadata). Every follow-up must reach the replica that holds its session,
according to the replica itself; each new session must go to the replica with the most
free capacity, according to the replicas' own accounts."""
import asyncio
import random
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.own_process  # Serve's driver-side state: see conftest.py
from ray import serve  # noqa: E402
from ray.serve.config import RequestRouterConfig  # noqa: E402
from ray.serve._private.request_router.common import RequestRoutingContext  # noqa: E402
from ray_cluster import ray_cluster  # noqa: E402

from cluster.router import KVLocalityRouter  # noqa: E402
from cluster.taxonomy import own_request  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAPACITY = 10_000


@serve.deployment(
    num_replicas=2,
    max_ongoing_requests=16,
    ray_actor_options={"num_cpus": 0},
    request_router_config=RequestRouterConfig(
        request_router_class="cluster.router:KVLocalityRouter",
        request_routing_stats_period_s=0.2,
        request_routing_stats_timeout_s=5,
    ),
)
class SessionHolder:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.sessions: dict[str, int] = {}
        self.replica = serve.get_replica_context().replica_id.unique_id

    def open(self, session_id: str, kv_bytes: int):
        free_before = self.capacity - sum(self.sessions.values())
        self.sessions[session_id] = kv_bytes
        return self.replica, free_before

    async def ask(self, session_id: str):
        await asyncio.sleep(0.01)
        return self.replica, session_id in self.sessions

    def record_routing_stats(self):
        return {"sessions": list(self.sessions),
                "free_kv_bytes": self.capacity - sum(self.sessions.values())}

    def record_replica_metadata(self):
        return {"kv_capacity_bytes": self.capacity}


@pytest.fixture(scope="module")
def handle():
    # replicas and the controller import cluster.router and this module by name
    with ray_cluster("router-test", head_cpus=2, extra_paths=(REPO / "tests",), serve_app=True):
        # no HTTP in this test: no proxy on Serve's default port 8000 (another Ray on this machine may hold it)
        serve.start(proxy_location="Disabled")
        yield serve.run(SessionHolder.bind(CAPACITY), name="router-test", route_prefix=None)


def open_session(handle, session_id, size):
    return handle.options(method_name="open", session_id=session_id).remote(session_id, kv_bytes=size).result()


def ask(handle, session_id):
    return handle.options(method_name="ask", session_id=session_id).remote(session_id)


def test_new_sessions_go_to_most_free_and_follow_ups_stay(handle):
    rng = random.Random(0)
    sizes = [rng.randrange(200, 1500) for _ in range(10)]
    owner, free = {}, {}  # free bytes per replica, from the replicas' own answers
    for i, size in enumerate(sizes):
        session_id = f"s{i}"
        replica, free_before = open_session(handle, session_id, size)
        owner[session_id] = replica
        free[replica] = free_before
        if len(free) == 2:
            assert free_before == max(free.values()), (session_id, free)
        elif i == 1:
            pytest.fail("the second session went to the replica that holds the first")
        free[replica] = free_before - size
    assert len(set(owner.values())) == 2

    turns = [rng.choice(list(owner)) for _ in range(40)]
    results = [r.result() for r in [ask(handle, session_id) for session_id in turns]]  # concurrent
    assert all(held for _, held in results)
    assert [replica for replica, _ in results] == [owner[session_id] for session_id in turns]


def test_a_fresh_router_finds_sessions_from_published_stats(handle):
    owner = {f"f{i}": open_session(handle, f"f{i}", 100)[0] for i in range(5)}
    time.sleep(2.0)  # 10 stats periods: the stats broadcast now lists every session
    fresh = serve.get_app_handle("router-test")  # a new handle: a new, empty router
    turns = random.Random(1).choices(list(owner), k=20)
    results = [ask(fresh, session_id).result() for session_id in turns]
    assert all(held for _, held in results)
    assert [replica for replica, _ in results] == [owner[session_id] for session_id in turns]


def test_concurrent_calls_of_one_request_are_all_routed(handle):
    """Calls made while serving one request (an n=4 completion's turns, issued at once without a
    session) inherit its internal request id; Serve's router matched a chosen replica to a
    pending request by that id, so all but one waited for ever. ``own_request`` routes each."""
    from ray.serve import context

    token = context._serve_request_context.set(context._RequestContext(request_id="r1", _internal_request_id="r1"))
    try:
        responses = [own_request(handle.options(method_name="ask"), f"n{i}") for i in range(4)]
        assert context._get_serve_request_context()._internal_request_id == "r1"  # the caller's context is kept
    finally:
        context._serve_request_context.reset(token)
    answers = [r.result(timeout_s=20) for r in responses]
    assert [held for _, held in answers] == [False] * 4  # none of them holds a session


class _Meta:
    def __init__(self, session_id=""):
        self.session_id = session_id


class _Pending:
    def __init__(self, session_id="", **kwargs):
        self.metadata, self.kwargs = _Meta(session_id), kwargs
        self.routing_context = RequestRoutingContext()


class _Replica:
    def __init__(self, uid, stats=None, metadata=None):
        self.replica_id = type("RID", (), {"unique_id": uid})()
        self.routing_stats, self.replica_metadata = stats or {}, metadata or {}


def test_ranking_without_ray_serve():
    router = KVLocalityRouter.__new__(KVLocalityRouter)  # the ranking logic alone
    router.initialize_state(reservation_ttl_s=60)
    a = _Replica("a", {"sessions": ["x"], "free_kv_bytes": 500})
    b = _Replica("b", {"sessions": [], "free_kv_bytes": 800})
    c = _Replica("c", metadata={"kv_capacity_bytes": 600})  # no stats yet
    router._replicas = {r.replica_id: r for r in (a, b, c)}
    router._replicas_list = [a, b, c]
    choose = lambda pr: asyncio.run(router.choose_replicas([a, b, c], pr))  # noqa: E731
    assert choose(_Pending("x")) == [[a]]  # held, from a's stats
    assert choose(_Pending("new")) == [[b], [c], [a]]
    router.on_request_routed(_Pending("new", kv_bytes=400), b.replica_id, None)
    assert choose(_Pending("new")) == [[b]]  # now held, from the router's own record
    assert choose(_Pending("other")) == [[c], [a], [b]]  # b: 800 - 400 reserved
    b.routing_stats = {"sessions": ["new"], "free_kv_bytes": 350}  # stats caught up
    assert router.free_bytes(b) == 350 and router._reserved[b.replica_id] == {}
    d = _Replica("d")  # no capacity known at all: tried first
    assert asyncio.run(router.choose_replicas([a, d], _Pending("y")))[0] == [d]
    pending = _Pending("z")
    asyncio.run(router.choose_replicas([a, b], pending))
    assert pending.routing_context.should_backoff  # Serve sleeps between rounds, not a busy loop
