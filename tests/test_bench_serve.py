"""``lsa bench serve``'s sizing: the sessions it runs and the host KV store it asks for. The bench
end to end (the app started, the workload over HTTP, stopped, the same workload on the engine
alone, both reported with their ratio) runs in tests/test_device_session.py, as the device
session runs it."""
import pytest


def test_plan_store_sizes_the_host_store_for_the_sessions_run():
    from actors.config import ServeConfig
    from benchmarks.serve import plan_store, session_bytes
    from engine.options import build

    app = ["model=tiny-random", "block_size=16", "max_num_seqs=3", "host_dtype=fp8"]
    per = session_bytes(build(ServeConfig, {"model": "tiny-random", "block_size": "16", "host_dtype": "fp8"}), 300)
    assert per > 0
    budget = 10 * per + per // 2
    assert plan_store(app, 300, budget, "max") == (9, 3, budget)  # all the budget, capped by max_num_seqs
    assert plan_store(app, 300, budget, "2") == (9, 2, 3 * per)  # two sessions and one for the turns
    assert plan_store(app, 300, 3 * per, "5") == (2, 2, 3 * per)  # no more than the budget holds


def test_sessions_max_is_what_the_store_holds_capped_by_max_num_seqs():
    from actors.config import ServeConfig
    from benchmarks.serve import session_bytes, sessions_to_run
    from engine.errors import InvalidRequestError
    from engine.options import build

    app = {"model": "tiny-random", "block_size": "16", "max_num_seqs": "3"}
    per = session_bytes(build(ServeConfig, app), 300)
    holds_9 = build(ServeConfig, {**app, "kv_store_bytes": str(10 * per + per // 2)})
    assert sessions_to_run("max", holds_9, 300) == 3  # capped by max_num_seqs
    assert sessions_to_run("max", build(ServeConfig, {**app, "kv_store_bytes": str(3 * per)}), 300) == 2  # one free
    assert sessions_to_run("2", holds_9, 300) == 2 and sessions_to_run("5", None, 300) == 5
    with pytest.raises(InvalidRequestError, match="--sessions max"):
        sessions_to_run("max", None, 300)
