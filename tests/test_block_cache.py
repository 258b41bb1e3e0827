"""Block KV cache: bookkeeping, appends across block boundaries, host mirror, accounting."""
import pytest
import torch

from engine.block_manager import BlockAllocator, BlockManager
from engine.config import ModelConfig
from engine.errors import CacheFullError
from engine.kv_cache import BlockKVCache

CFG = ModelConfig(architecture="llama", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8)


def test_allocator_hands_out_distinct_ids_and_refuses_when_empty():
    alloc = BlockAllocator(5)
    got = alloc.allocate(3) + alloc.allocate(2)
    assert sorted(got) == [0, 1, 2, 3, 4]
    with pytest.raises(CacheFullError, match="full"):
        alloc.allocate(1)
    alloc.free(got[:2])
    assert alloc.num_free == 2 and alloc.num_used == 3


def test_manager_tables_follow_appends():
    bm = BlockManager(block_size=4, num_device_blocks=10, num_host_blocks=10)
    bm.admit(7, max_tokens=10)  # 3 blocks reserved
    assert bm.device.num_used == 3
    slots, offs = bm.append_slots(7, 6)
    assert offs == [0, 1, 2, 3, 0, 1] and len(set(slots)) == 2
    completed = bm.commit(7, 6)
    assert len(completed) == 1 and completed[0][0] == slots[0]  # block 0 is complete
    table, last = bm.table(7)
    assert table == [slots[0], slots[4]] and last == 2
    with pytest.raises(CacheFullError):
        bm.append_slots(7, 7)  # 13 tokens > 3 reserved blocks of 4
    assert bm.table(7) == ([slots[0], slots[4]], 2)  # a refused append changes nothing
    more, _ = bm.append_slots(7, 3)  # three more tokens cross into block 2
    table, last = bm.table(7, pending=3)
    assert table == [slots[0], slots[4], more[-1]] and last == 1
    bm.release(7)
    assert bm.device.num_used == 0 and bm.host.num_used == 0


@pytest.mark.parametrize("block_size", [4, 16])
def test_appends_across_boundaries_and_host_mirror(block_size):
    torch.manual_seed(block_size)
    cache = BlockKVCache(CFG, block_size, num_device_blocks=40, num_host_blocks=40, dtype=torch.float32,
                         device="cpu")
    cache.pool.fill_(float("nan"))  # poison: every read of an unwritten slot shows up
    lengths = {0: 0, 1: 0}
    truth = {0: [], 1: []}  # per sequence: list of [L, 2, H, D] token K/V
    for s in truth:
        cache.admit(s, 60)
    # uneven chunks, interleaved between two sequences, crossing block boundaries
    for s, n in [(0, 3), (1, block_size + 1), (0, block_size), (1, 1), (0, 2 * block_size + 5), (1, 7)]:
        slots, offsets = cache.append_slots([s], [n])
        kv = torch.randn(n, CFG.num_layers, 2, CFG.num_kv_heads, CFG.head_dim)
        for layer in range(CFG.num_layers):
            cache.write(layer, kv[:, layer, 0], kv[:, layer, 1], slots, offsets)
        cache.commit([s], [n])
        truth[s] += list(kv)
        lengths[s] += n
    for s, n in lengths.items():
        assert cache.num_tokens(s) == n
        want = torch.stack(truth[s])  # [n, L, 2, H, D]
        for layer in range(CFG.num_layers):
            k, v = cache.gather(s, layer, n)  # [H, n, D]
            assert torch.equal(k.permute(1, 0, 2), want[:, layer, 0])
            assert torch.equal(v.permute(1, 0, 2), want[:, layer, 1])
        # host mirror: every complete block, equal to the device copy, nothing more
        host_ids = cache.host_blocks(s)
        assert len(host_ids) == n // block_size
        slots, _ = cache.blocks.table(s)
        for j, hid in enumerate(host_ids):
            device_block = cache.pool[:, :, slots[j]]  # [L, 2, H, B, D]
            assert torch.equal(cache.host[hid], device_block)
            tokens = want[j * block_size:(j + 1) * block_size]  # [B, L, 2, H, D]
            assert torch.equal(cache.host[hid], tokens.permute(1, 2, 3, 0, 4))


def test_accounting_is_exact():
    block_size = 8
    cache = BlockKVCache(CFG, block_size, num_device_blocks=16, num_host_blocks=16, dtype=torch.float16,
                         device="cpu")
    per_token = 2 * CFG.num_layers * CFG.num_kv_heads * CFG.head_dim * 2  # K+V, fp16
    assert cache.bytes_per_token == per_token
    for s, n in [(0, 20), (1, 8)]:
        cache.admit(s, 40)
        slots, offsets = cache.append_slots([s], [n])
        cache.commit([s], [n])
    acc0 = cache.accounting(0)
    assert acc0.full_bytes == 20 * per_token
    assert acc0.device_bytes == 3 * block_size * per_token  # blocks 0, 1 full, block 2 partial
    assert acc0.host_bytes == 2 * block_size * per_token  # two complete blocks mirrored
    total = cache.accounting()
    assert total.full_bytes == 28 * per_token
    assert total.device_bytes == 4 * block_size * per_token
    assert total.host_bytes == 3 * block_size * per_token
    assert total.device_capacity_bytes == 16 * block_size * per_token
    assert total.device_capacity_bytes == cache.pool.numel() * cache.pool.element_size()
    cache.release(0)
    assert cache.accounting().full_bytes == 8 * per_token
