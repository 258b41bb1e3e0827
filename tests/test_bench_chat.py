"""``lsa bench chat`` end to end on a tiny random model (byte tokenizer, CPU): two interleaved
conversations through the official openai client against a served app it starts with 2 decode
replicas; the later turns of each reuse the KV of the earlier ones (``cached_tokens``), prefill
only their new tokens, and stay on the replica that holds the conversation (by the replicas'
own generated-token counters), and the report's checks say so."""
import json

import pytest

pytest.importorskip("ray")
pytest.importorskip("openai")
pytestmark = pytest.mark.own_process  # starts Ray Serve: see conftest.py

from cli import parse_args  # noqa: E402
from cluster.local import free_port  # noqa: E402


def test_later_turns_reuse_the_kv_of_earlier_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("LSA_KV_DIR", str(tmp_path))
    out = tmp_path / "chat.json"
    args = parse_args(["bench", "chat", "model=tiny-random", "num_workers=2", "worker_num_cpus=0.5", "block_size=16",
                       f"kv_store_bytes={32 << 20}", "torch_threads=1", "--context", "120", "--turns", "3",
                       "--max-tokens", "4", "--num-cpus", "2", "--port", str(free_port()), "--out", str(out)])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert rows[0]["cached_tokens"] == 0  # nothing held before the first request
    assert [(r["conversation"], r["turn"]) for r in rows] == [("A", 1), ("B", 1), ("A", 2), ("B", 2), ("A", 3), ("B", 3)]
    for r in rows:
        assert r["prefilled_tokens"] == r["prompt_tokens"] - r["cached_tokens"]
        if r["turn"] == 1:  # B1 may reuse the chat template's first block, which A1 left in the store
            assert r["cached_tokens"] <= 16 and r["new_tokens"] == r["prompt_tokens"] > 400, r
        else:  # the document and the earlier turns came from the store
            assert r["cached_tokens"] >= r["prompt_tokens"] - r["new_tokens"] - 64 > 0, r
            assert r["prefilled_tokens"] <= r["new_tokens"] + report["slack"], r
    assert all(s["prefill_only_new"] for s in report["summary"].values()), report["summary"]
    # every turn's replica was identified, and each conversation stayed on the replica holding it
    assert all(r["replica"] for r in rows), rows
    assert all(s["stays_on_holder"] for s in report["summary"].values()), report["summary"]
