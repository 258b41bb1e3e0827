"""The int4 host mirror in the engine: blocks come back from host RAM dequantized into their
slots (what ``kernels.load_blocks`` computes from the stored codes), the accounting counts codes
and scales exactly, and with the budget at 1.0 (nothing offloaded) LSA over an int4 mirror is
full attention, bit for bit."""
import pytest
import torch

from engine.loader import random_model
from engine.sampling import SamplingParams
from kernels.reference import dequantize_int4
from mirror_engine import check_loads, logits_of, mirror_engine, prompts
from tiny import TINY

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def model(request):
    return random_model(TINY, request.param, torch.float32 if request.param == "cpu" else torch.bfloat16, seed=3)


def test_budget_one_over_an_int4_mirror_is_full_attention(model):
    ids = prompts()
    full, full_logits = logits_of(mirror_engine(model, None, name="full"), ids, 24)
    lsa, lsa_logits = logits_of(mirror_engine(model, "int4", name="lsa", budget=1.0, cycle=4), ids, 24)
    for f, s, fl, sl in zip(full, lsa, full_logits, lsa_logits):
        assert s.output_ids == f.output_ids and torch.equal(sl, fl)
    assert lsa[0].kv["blocks_copied"] == 0  # nothing came back from the mirror


def test_int4_mirror_at_a_small_budget_loads_dequantized_blocks_end_to_end(model):
    engine = mirror_engine(model, "int4", name="lsa", budget=0.25, cycle=4, lookahead=0, index_score="mean",
                           recency_bonus=0.0)  # plans that change (random KV: the bonus keeps the window)
    cache = engine.cache
    exact = cache.dtype == torch.float32  # the same fp32 arithmetic; bf16: one rounding apart at most

    def check(block, h):
        want = dequantize_int4(cache.mirror.host[h].to(cache.device), cache.mirror.scale[h].to(cache.device),
                               cache.dtype)
        torch.testing.assert_close(block, want, rtol=0 if exact else 2 ** -7, atol=0 if exact else 1e-3)

    checked = check_loads(cache, check)
    done = engine.generate(prompts(), SamplingParams(max_tokens=40, ignore_eos=True))
    assert [len(c.token_ids) for c in done] == [40, 40]
    assert checked, "no block was ever loaded from the host mirror"
    kv = done[0].kv
    assert kv["blocks_copied"] > 0 and kv["device_kv_fraction"] < 0.6
    # host bytes: per complete block and layer, 4 bits per K/V element plus float16 key scale and
    # min per channel and value scale and min per token, for each KV head
    per_layer = 2 * TINY.num_kv_heads * 16 * TINY.head_dim // 2 + TINY.num_kv_heads * (2 * 16 + 2 * 16) * 2
    assert cache.mirror.bytes_per_block == TINY.num_layers * per_layer
    assert kv["host_kv_bytes"] == (339 // 16) * cache.mirror.bytes_per_block
