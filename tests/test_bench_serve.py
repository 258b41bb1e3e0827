"""``lsa bench serve`` on the CPU with tiny-random: it starts the app, runs the workload over HTTP
(sessions, streamed turns, concurrent sessions), stops the app, runs the same workload on the
engine alone, and reports both and their ratio."""
import json

import pytest

pytest.importorskip("ray")
from cli import parse_args  # noqa: E402
from cluster.local import free_port  # noqa: E402


@pytest.mark.slow
def test_bench_serve_smoke(tmp_path):
    out = tmp_path / "serve.json"
    args = parse_args(["bench", "serve", "model=tiny-random", "block_size=16", "kv_store_bytes=67108864",
                       "max_num_seqs=3", "torch_threads=1", "worker_num_cpus=0.5", f"kv_dir={tmp_path}",
                       "--contexts", "200", "--followups", "1", "--concurrency-context", "300", "--sessions", "max",
                       "--max-tokens", "8", "--port", str(free_port()), "--num-cpus", "4", "--out", str(out)])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["workload"]["sessions"] == 3  # what the store holds, capped by max_num_seqs
    assert report["workload"]["vocab"] == [4, 260]  # the byte tokenizer's ids
    for side in ("served", "engine"):
        single = report[side]["single"][0]
        assert single["context"] == 200 and single["ttft_s"] > 0 and single["prefill_tokens"] == 200
        turn = single["followups"][0]
        assert turn["num_tokens"] == 8 and turn["prefill_tokens"] < 200  # the context came from the store
        assert turn["itl"]["n"] >= 3  # pieces arrived one by one
        c = report[side]["concurrent"]
        assert c["sessions"] == 3 and c["tokens"] == 24 and c["tokens_per_s"] > 0 and c["itl"]["n"] > 0
    # the same workload: the same tokens prefilled per turn on both sides
    assert report["served"]["concurrent"]["prefill_tokens"] == report["engine"]["concurrent"]["prefill_tokens"]
    assert report["ratio"] == pytest.approx(report["served"]["concurrent"]["tokens_per_s"]
                                            / report["engine"]["concurrent"]["tokens_per_s"])
    assert not list(tmp_path.glob("*.arena"))  # both arenas removed


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
