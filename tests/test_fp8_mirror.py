"""FP8 host mirror: e4m3 blocks with per-(block, layer, K/V, head) scales, dequantized after the copy."""
import pytest
import torch

from engine.config import CacheConfig
from engine.errors import InvalidRequestError
from engine.host_memory import FP8, dequantize_fp8, quantize_fp8
from engine.kv_cache import BlockKVCache
from engine.sampling import SamplingParams
from mirror_engine import check_loads, mirror_engine, prompts
from tiny import CFG


def test_round_trip_error_is_bounded_per_element():
    gen = torch.Generator().manual_seed(0)
    # heads with very different ranges: per-head scales keep each one's relative error small
    blocks = torch.randn(6, 3, 2, 4, 16, 8, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 500.0])[:, None, None]
    data, scale = quantize_fp8(blocks)
    assert data.dtype == FP8 and scale.shape == (6, 3, 2, 4)
    back = dequantize_fp8(data, scale, torch.float32)
    rel = (back - blocks).abs() / blocks.abs()
    big = blocks.abs() > scale[..., None, None] * 2 ** -6  # e4m3 normal range (subnormals lose precision)
    assert rel[big].max() < 0.0625  # 3 mantissa bits: half an ulp is 1/16 at worst
    assert rel[big].median() < 0.03
    # absolute error of the tiny (subnormal) values is bounded by the smallest step of the block
    assert ((back - blocks).abs()[~big] <= scale[..., None, None].expand_as(blocks)[~big] * 2 ** -9 + 1e-12).all()
    assert torch.allclose(back.abs().amax((-2, -1)), blocks.abs().amax((-2, -1)), rtol=1e-6)  # amax -> 448, exact


def _cache(host_dtype, dtype=torch.float32):
    return BlockKVCache(CFG, 8, num_device_blocks=16, num_host_blocks=16, dtype=dtype, device="cpu",
                        groups=[[0, 1, 2]], index_layers=(1,), host_dtype=host_dtype)


def test_mirror_load_dequantizes_and_accounting_counts_scales():
    torch.manual_seed(1)
    exact, fp8 = _cache(None), _cache("fp8")
    assert fp8.mirror.host.dtype == FP8 and fp8.mirror.scale.shape == (16, 3, 2, 2)
    kv = torch.randn(27, CFG.num_layers, 2, CFG.num_kv_heads, CFG.head_dim)
    for cache in (exact, fp8):
        cache.admit(0, 5)
        [(slots, offsets)] = cache.append_slots([0], [27])
        for layer in range(CFG.num_layers):
            cache.write(layer, kv[:, layer, 0], kv[:, layer, 1], slots, offsets)
        cache.commit([0], [27])
    # summaries stay in the model dtype, computed from the unquantized keys
    ids = torch.tensor(fp8.host_blocks(0))
    assert torch.equal(fp8.mirror.summary[ids], exact.mirror.summary[torch.tensor(exact.host_blocks(0))])
    assert torch.equal(fp8.index_keys[0][:, ids], fp8.mirror.summary[ids, 1].transpose(0, 1))
    fp8.evict(0, 0, [0, 2])
    fp8.load(0, 0, [2, 0])
    resident = fp8.blocks.seqs[0].resident[0]
    for j in (0, 2):
        h = fp8.host_blocks(0)[j]
        want = dequantize_fp8(fp8.mirror.host[h], fp8.mirror.scale[h], torch.float32)  # [L, 2, H, B, D]
        assert torch.equal(fp8.pool[:, :, resident[j]], want)
        truth = kv[j * 8:(j + 1) * 8].permute(1, 2, 3, 0, 4)
        assert ((want - truth).abs() <= truth.abs().amax((-2, -1), keepdim=True) / 16).all()
    # host bytes: one byte per element instead of four (fp32), plus 4-byte scales per (layer, K/V, head)
    elems = CFG.num_layers * 2 * CFG.num_kv_heads * 8 * CFG.head_dim
    scales = CFG.num_layers * 2 * CFG.num_kv_heads * 4
    assert exact.accounting(0).host_bytes == 3 * elems * 4
    assert fp8.accounting(0).host_bytes == 3 * (elems + scales)
    assert fp8.bytes_copied == 2 * (elems + scales)  # what crossed: e4m3 data and the scales
    half = _cache(None, torch.bfloat16)
    assert fp8.mirror.bytes_per_block == half.mirror.bytes_per_block // 2 + scales
    assert fp8.accounting(0).full_bytes == exact.accounting(0).full_bytes  # full KV stays in the model dtype


def test_lsa_generate_with_fp8_mirror_loads_dequantized_blocks(model):
    engine = mirror_engine(model, "fp8", name="lsa", budget=0.25, cycle=4, lookahead=0, index_score="mean",
                           recency_bonus=0.0)  # plans that change (random KV: the bonus keeps the window)
    cache = engine.cache

    def check(block, h):
        assert torch.equal(block, dequantize_fp8(cache.mirror.host[h], cache.mirror.scale[h], cache.dtype))

    checked = check_loads(cache, check)
    done = engine.generate(prompts(), SamplingParams(max_tokens=40, ignore_eos=True))
    assert [len(c.token_ids) for c in done] == [40, 40]
    assert checked, "no block was ever loaded from the host mirror"
    kv = done[0].kv
    assert kv["blocks_copied"] > 0 and kv["device_kv_fraction"] < 0.6
    assert kv["host_kv_bytes"] == (339 // 16) * cache.mirror.bytes_per_block


def test_fp8_mirror_refuses_bad_settings():
    with pytest.raises(InvalidRequestError, match="host_dtype"):
        CacheConfig(host_dtype="int2")
    with pytest.raises(InvalidRequestError, match="host_dtype"):
        BlockKVCache(CFG, 8, 4, 4, torch.float32, "cpu", host_dtype="fp16")
