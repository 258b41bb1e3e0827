"""The int4 host mirror in the engine: blocks come back from host RAM dequantized into their
slots (what ``kernels.load_blocks`` computes from the stored codes), the accounting counts codes
and scales exactly, and with the budget at 1.0 (nothing offloaded) LSA over an int4 mirror is
full attention, bit for bit."""
import pytest
import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig
from engine.hooks import LogitsObserver
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.sampling import SamplingParams
from kernels.reference import dequantize_int4
from tiny import TINY  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def model(request):
    return random_model(TINY, request.param, torch.float32 if request.param == "cpu" else torch.bfloat16, seed=3)


def _engine(model, host_dtype, **policy):
    device = str(next(model.parameters()).device)
    return LLMEngine(model, EngineConfig(
        device=device, cache=CacheConfig(block_size=16, num_device_blocks=96, host_dtype=host_dtype),
        scheduler=SchedulerConfig(max_num_seqs=2, prefill_chunk=64),
        policy=PolicyConfig(**{"min_resident_tokens": 0, **policy})))


def _prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 64, (n,), generator=gen).tolist() for n in (300, 250)]


def _logits(engine, ids, max_tokens):
    """(sequences, per sequence the logits of every sampled token [n, V])."""
    rows = {}
    engine.hooks.append(LogitsObserver(lambda seq, row: rows.setdefault(seq.seq_id, []).append(row.float().cpu())))
    seqs = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in ids]
    while engine.has_work():
        engine.step()
    return seqs, [torch.stack(rows[s.seq_id]) for s in seqs]


def test_budget_one_over_an_int4_mirror_is_full_attention(model):
    ids = _prompts()
    full, full_logits = _logits(_engine(model, None, name="full"), ids, 24)
    lsa, lsa_logits = _logits(_engine(model, "int4", name="lsa", budget=1.0, cycle=4), ids, 24)
    for f, s, fl, sl in zip(full, lsa, full_logits, lsa_logits):
        assert s.output_ids == f.output_ids and torch.equal(sl, fl)
    assert lsa[0].kv["blocks_copied"] == 0  # nothing came back from the mirror


def test_int4_mirror_at_a_small_budget_loads_dequantized_blocks_end_to_end(model):
    engine = _engine(model, "int4", name="lsa", budget=0.25, cycle=4, lookahead=0, index_score="mean")
    cache, checked = engine.cache, []
    original = cache.load

    def load_and_check(seq_id, group, blocks):
        original(seq_id, group, blocks)
        resident = cache.blocks.seqs[seq_id].resident[group]
        for j in blocks:
            h = cache.host_blocks(seq_id)[j]
            want = dequantize_int4(cache.mirror.host[h].to(cache.device), cache.mirror.scale[h].to(cache.device),
                                   cache.dtype)
            exact = cache.dtype == torch.float32  # the same fp32 arithmetic; bf16: one rounding apart at most
            torch.testing.assert_close(cache.pool[:, :, resident[j]], want, rtol=0 if exact else 2 ** -7,
                                       atol=0 if exact else 1e-3)
            checked.append(j)

    cache.load = load_and_check
    done = engine.generate(_prompts(), SamplingParams(max_tokens=40, ignore_eos=True))
    assert [len(c.token_ids) for c in done] == [40, 40]
    assert checked, "no block was ever loaded from the host mirror"
    kv = done[0].kv
    assert kv["blocks_copied"] > 0 and kv["device_kv_fraction"] < 0.6
    # host bytes: per complete block and layer, 4 bits per K/V element plus float16 key scale and
    # min per channel and value scale and min per token, for each KV head
    per_layer = 2 * TINY.num_kv_heads * 16 * TINY.head_dim // 2 + TINY.num_kv_heads * (2 * 16 + 2 * 16) * 2
    assert cache.mirror.bytes_per_block == TINY.num_layers * per_layer
    assert kv["host_kv_bytes"] == (339 // 16) * cache.mirror.bytes_per_block
