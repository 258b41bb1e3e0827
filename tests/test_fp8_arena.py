"""FP8 shared arenas: a KV store's arena in the FP8 host format (e4m3 blocks, float32 scales,
summaries in the model dtype), mapped by a worker; sessions on it decode as on a private FP8
arena, and blocks that move between two such stores keep their scales, byte for byte."""
import torch

from actors.decode_worker import DecodeWorkerCore
from actors.kv_store import KVStoreCore, arena_path
from actors.messages import SPILLED
from actors.session_store import LocalStores
from engine.config import PolicyConfig
from engine.host_arena import ArenaLayout, HostArena
from engine.host_memory import FP8
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.sampling import SamplingParams
from tiny import TINY, engine_config, tokens  # noqa: E402

BLOCK = 8
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
POLICY = PolicyConfig(name="lsa", budget=0.3, cycle=4, min_resident_tokens=0)


def config():
    return engine_config(BLOCK, 128, policy=POLICY, host_dtype="fp8")


def test_fp8_layout_views_and_sizes():
    exact, fp8 = ArenaLayout.of(TINY, BLOCK, torch.bfloat16), ArenaLayout.of(TINY, BLOCK, torch.bfloat16, "fp8")
    kv, summary = TINY.num_layers * 2 * 2 * BLOCK * 16, TINY.num_layers * 3 * 2 * 16
    assert exact.block_bytes == 2 * (kv + summary)
    assert fp8.block_bytes == kv + 2 * summary + 4 * TINY.num_layers * 2 * 2  # e4m3 K/V, bf16 summaries, fp32 scales
    arena = HostArena.private(fp8, 5)
    assert arena.host.dtype == FP8 and arena.host.shape == (5, 4, 2, 2, BLOCK, 16)
    assert arena.summary.dtype == torch.bfloat16 and arena.scale.shape == (5, 4, 2, 2)
    # the three views do not overlap: writing one leaves the others as they were
    arena.summary.fill_(1.5)
    arena.scale.fill_(2.0)
    arena.host.view(torch.uint8).fill_(7)
    assert (arena.summary == 1.5).all() and (arena.scale == 2.0).all()
    # copies within the arena (runs of ids and single ones) move all three parts of a block
    for t in (arena.host.view(torch.uint8), arena.summary, arena.scale):
        t[0].fill_(1)
        t[1].fill_(2)
    arena.copy([0, 1, 0], [3, 4, 2])
    for t in (arena.host.view(torch.uint8), arena.summary, arena.scale):
        assert (t[3] == 1).all() and (t[4] == 2).all() and (t[2] == 1).all()


def test_sessions_on_an_fp8_store_decode_as_on_a_private_fp8_arena(tmp_path):
    model = random_model(TINY, "cpu", torch.float32, seed=4)
    context, question = tokens(150, 1), tokens(9, 2)
    # the reference: the same turn on a private FP8 arena, driven in this thread (tests/test_sessions.py)
    from test_sessions import Sessions

    from actors.session_table import SessionTable

    private_layout = ArenaLayout.of(TINY, BLOCK, torch.float32, "fp8")
    private_arena = HostArena.private(private_layout, 120)
    ref = Sessions(LLMEngine(model, config(), arena=private_arena), SessionTable(120, private_layout.block_bytes),
                   private_arena.allocator)
    ref.run(ref.create("s", context))
    want = ref.run(ref.ask("s", question, GREEDY)).seq.output_ids

    layout = ArenaLayout.of(TINY, BLOCK, torch.float32, "fp8")
    stores = {}
    for node_id in ("a", "b"):
        stores[node_id] = KVStoreCore(node_id, layout, 120 * layout.block_bytes,
                                      arena_path("fp8", node_id, str(tmp_path)), LocalStores(stores, spill=False))
    a, b = stores["a"], stores["b"]
    worker = DecodeWorkerCore.build(lambda arena: LLMEngine(model, config(), arena=arena), a, "w")
    try:
        assert worker.engine.cache.mirror.fp8 and worker.engine.cache.mirror.host.data_ptr() == worker.arena.host.data_ptr()
        worker.create_session("s", context).result(timeout=60)
        turn = worker.ask("s", question, GREEDY).result(timeout=60)
        assert turn.token_ids == want and turn.prefill_tokens < len(context)

        ids = a.view("s").host_ids
        original = a.read_blocks(ids)
        assert len(original) == 3 and (original[2].view("float32") > 0).all()  # every block carries its scales (bytes)
        logical = a.spill_plan("s", 10)
        a.spill("s", logical, "b")
        assert a.view("s").host_ids.count(SPILLED) == 10
        moved = b.read_blocks([rid for _, rid in a.missing("s")["b"]])
        for got, before in zip(moved, original):
            assert (got == before[logical]).all()  # uint8 numpy: byte-identical
        a.stage("s")
        again = worker.ask("s", question, GREEDY).result(timeout=60)
        assert again.token_ids == want
    finally:
        worker.close()
