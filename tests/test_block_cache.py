"""Block KV cache: bookkeeping, appends across block boundaries, host mirror, accounting."""
import pytest
import torch

from engine.block_manager import BlockAllocator, BlockManager
from engine.config import ModelConfig
from engine.errors import CacheFullError
from engine.kv_cache import BlockKVCache
from tiny import CFG  # noqa: E402



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
    bm.admit(7, 3)  # 3 blocks reserved
    assert not bm.can_reserve(8) and bm.can_reserve(7)  # reservations count before allocation
    [(slots, offs)] = bm.append_slots(7, 6)
    assert offs == [0, 1, 2, 3, 0, 1] and len(set(slots)) == 2
    assert bm.device[0].num_used == 2
    assert bm.commit(7, 6) == [(0, bm.seqs[7].host_ids[0])]  # block 0 is complete and mirrored
    logical, table, last = bm.table(7)
    assert logical == [0, 1] and table == [slots[0], slots[4]] and last == 2
    with pytest.raises(CacheFullError):
        bm.append_slots(7, 7)  # 13 tokens > 3 reserved blocks of 4
    assert bm.table(7)[1:] == ([slots[0], slots[4]], 2)  # a refused append changes nothing
    [(more, _)] = bm.append_slots(7, 3)  # three more tokens cross into block 2
    logical, table, last = bm.table(7, pending=3)
    assert logical == [0, 1, 2] and table == [slots[0], slots[4], more[-1]] and last == 1
    bm.release(7)
    assert bm.device[0].num_used == 0 and bm.host.num_used == 0


def test_table_rows_stay_in_logical_order_after_random_evictions_loads_and_stages():
    """``table`` and the graphs' array row (``table_slots``) list the resident slots in logical
    order, through random evictions, loads and promotions (dict order then differs from it)."""
    import random
    rng = random.Random(0)
    bm = BlockManager(block_size=4, num_device_blocks=200, num_host_blocks=200, num_groups=2)
    bm.admit(3, 60)
    bm.append_slots(3, 40 * 4 - 1)
    bm.commit(3, 40 * 4 - 1)  # blocks 0..39, the last one open
    for _ in range(30):
        g = rng.randrange(2)
        resident = [j for j in bm.seqs[3].resident[g] if j < 39]
        absent = [j for j in range(39) if j not in bm.seqs[3].resident[g] and j not in bm.seqs[3].staged[g]]
        bm.evict(3, g, rng.sample(resident, min(len(resident), rng.randrange(4))))
        if absent:
            bm.load(3, g, rng.sample(absent, min(len(absent), rng.randrange(3))))
        absent = [j for j in range(39) if j not in bm.seqs[3].resident[g] and j not in bm.seqs[3].staged[g]]
        if absent and bm.seqs[3].held(g) < 58:
            staged = rng.sample(absent, 1)
            bm.stage(3, g, staged)
            bm.promote(3, g, staged)
        for group in range(2):
            resident = bm.seqs[3].resident[group]
            want = [resident[j] for j in sorted(resident) if j <= 39]  # the row by a plain sort
            for pending in (0, 1):
                assert bm.table_slots(3, group, pending).tolist() == want == bm.table(3, group, pending)[1]
    bm.evict(3, 0, [39])
    with pytest.raises(ValueError, match="last token"):
        bm.table_slots(3, 0)


def test_evict_and_load_keep_the_table_in_logical_order():
    bm = BlockManager(block_size=2, num_device_blocks=8, num_host_blocks=8, num_groups=2)
    bm.admit(1, 5)
    bm.append_slots(1, 9)  # blocks 0..4, the last one open
    bm.commit(1, 9)
    bm.evict(1, 0, [1, 2])
    assert bm.table(1, 0)[0] == [0, 3, 4] and bm.table(1, 1)[0] == [0, 1, 2, 3, 4]
    bm.load(1, 0, [2])
    assert bm.table(1, 0)[0] == [0, 2, 3, 4]
    bm.evict(1, 0, [4])
    used = bm.device[0].num_used
    with pytest.raises(ValueError, match="not in the host mirror"):
        bm.load(1, 0, [4])  # the open block was never mirrored
    assert bm.device[0].num_used == used  # nothing leaked
    bm.load(1, 1, []) if False else None
    assert bm.table(1, 1)[0] == [0, 1, 2, 3, 4]
    bm.device[0].free([])  # no-op
    bm.set_reserve(1, 2)  # cannot go below what a group holds
    assert bm.seqs[1].reserve == 5


@pytest.mark.parametrize("block_size", [4, 16])
def test_appends_across_boundaries_and_host_mirror(block_size):
    torch.manual_seed(block_size)
    cache = BlockKVCache(CFG, block_size, num_device_blocks=40, num_host_blocks=40, dtype=torch.float32,
                         device="cpu")
    cache.pool.fill_(float("nan"))  # poison: every read of an unwritten slot shows up
    lengths = {0: 0, 1: 0}
    truth = {0: [], 1: []}  # per sequence: list of [L, 2, H, D] token K/V
    for s in truth:
        cache.admit(s, 60 // block_size + 1)
    # uneven chunks, interleaved between two sequences, crossing block boundaries
    for s, n in [(0, 3), (1, block_size + 1), (0, block_size), (1, 1), (0, 2 * block_size + 5), (1, 7)]:
        [(slots, offsets)] = cache.append_slots([s], [n])
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
        # host mirror: every complete block, equal to the device copy, with exact key summaries
        host_ids = cache.host_blocks(s)
        assert len(host_ids) == n // block_size
        _, slots, _ = cache.blocks.table(s)
        for j, hid in enumerate(host_ids):
            assert torch.equal(cache.mirror.host[hid], cache.pool[:, :, slots[j]])
            tokens = want[j * block_size:(j + 1) * block_size]  # [B, L, 2, H, D]
            assert torch.equal(cache.mirror.host[hid], tokens.permute(1, 2, 3, 0, 4))
            keys = tokens[:, :, 0].double()  # [B, L, H, D]
            summary = cache.mirror.summary[hid].double()  # [L, 3, H, D]
            assert torch.equal(summary[:, 0], keys.amin(0)) and torch.equal(summary[:, 1], keys.amax(0))
            assert torch.allclose(summary[:, 2], keys.mean(0), atol=1e-6)


def test_offload_round_trip_restores_exact_blocks():
    """Evict complete blocks from the device, load them back into other slots: same bytes."""
    torch.manual_seed(0)
    cache = BlockKVCache(CFG, 4, num_device_blocks=12, num_host_blocks=12, dtype=torch.float16, device="cpu",
                         groups=[[0], [1], [2]], index_layers=(1,), slot_summaries=True)
    cache.admit(0, 6)
    per_group = cache.append_slots([0], [22])  # blocks 0..5, block 5 open
    kv = torch.randn(22, CFG.num_layers, 2, CFG.num_kv_heads, CFG.head_dim).half()
    for layer, (slots, offsets) in enumerate(per_group):
        cache.write(layer, kv[:, layer, 0], kv[:, layer, 1], slots, offsets)
    cache.commit([0], [22])
    before = [cache.gather(0, layer, 22) for layer in range(3)]
    for g in range(3):
        cache.evict(0, g, [1, 2, 3])
    assert cache.blocks_copied == 0  # eviction copies nothing
    taken = cache.blocks.device[0].allocate(3)  # force different slots on reload
    for g in range(3):
        cache.load(0, g, [3, 1, 2])
    assert cache.blocks_copied == 9 and cache.bytes_copied == 9 * cache.bytes_per_layer_block
    for layer in range(3):
        k, v = cache.gather(0, layer, 22)
        assert torch.equal(k, before[layer][0]) and torch.equal(v, before[layer][1])
        resident = cache.blocks.seqs[0].resident[layer]
        for j in (1, 2, 3):  # per-slot summaries travelled with the blocks
            assert torch.equal(cache.slot_summary[layer, :, resident[j]], cache.mirror.summary[
                cache.blocks.seqs[0].host_ids[j], layer])
    assert not set(taken) & set(cache.blocks.seqs[0].resident[0].values())
    # device index keys hold the Level-1 layer's summaries of every complete block
    host_ids = torch.tensor(cache.blocks.seqs[0].host_ids)
    assert torch.equal(cache.index_keys[0][:, host_ids], cache.mirror.summary[host_ids, 1].transpose(0, 1))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_an_attached_prefix_gets_its_index_keys_from_the_mirror(device):
    """A session turn's prefix (blocks another sequence left in the mirror) gets the index layers'
    key summaries on the device, copied from the mirror's rows (on CUDA by DMA from page-locked
    memory), and, loaded, the same K/V; other host blocks' index keys are left alone."""
    torch.manual_seed(1)
    cache = BlockKVCache(CFG, 4, num_device_blocks=24, num_host_blocks=16, dtype=torch.float32, device=device,
                         index_layers=(0, 2))
    cache.admit(0, 6)
    [(slots, offsets)] = cache.append_slots([0], [20])
    kv = torch.randn(20, CFG.num_layers, 2, CFG.num_kv_heads, CFG.head_dim, device=device)
    for layer in range(CFG.num_layers):
        cache.write(layer, kv[:, layer, 0], kv[:, layer, 1], slots, offsets)
    cache.commit([0], [20])
    before = [cache.gather(0, layer, 20) for layer in range(CFG.num_layers)]
    prefix = cache.blocks.detach_host(0, 5)
    cache.release(0)
    cache.index_keys.fill_(7.0)  # stale: the attach must rewrite the prefix's columns
    cache.admit(1, 8)
    cache.attach_prefix(1, prefix, load=True)
    hosts = torch.tensor(prefix)
    cache.mirror.wait_writes()
    for li, layer in enumerate((0, 2)):
        want = cache.mirror.summary[hosts, layer].transpose(0, 1)  # [3, n, H, D]
        assert torch.equal(cache.index_keys[li][:, hosts.to(device)].cpu(), want)
    others = [h for h in range(16) if h not in prefix]
    assert bool((cache.index_keys[:, :, torch.tensor(others, device=device)] == 7.0).all())
    for layer in range(CFG.num_layers):
        k, v = cache.gather(1, layer, 20)
        assert torch.equal(k, before[layer][0]) and torch.equal(v, before[layer][1])


def test_accounting_is_exact():
    block_size = 8
    cache = BlockKVCache(CFG, block_size, num_device_blocks=16, num_host_blocks=16, dtype=torch.float16,
                         device="cpu")
    per_token = 2 * CFG.num_layers * CFG.num_kv_heads * CFG.head_dim * 2  # K+V, fp16
    assert cache.bytes_per_token == per_token
    for s, n in [(0, 20), (1, 8)]:
        cache.admit(s, 5)
        cache.append_slots([s], [n])
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
    trash = cache.pool[:, :, cache.trash_slot]  # one slot past the allocator: CUDA-graph padding rows
    assert total.device_capacity_bytes + trash.numel() * trash.element_size() == cache.pool.numel() * cache.pool.element_size()
    cache.evict(0, 0, [0])
    assert cache.accounting(0).device_bytes == 2 * block_size * per_token
    cache.release(0)
    assert cache.accounting().full_bytes == 8 * per_token
