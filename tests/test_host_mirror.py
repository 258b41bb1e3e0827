"""HostMirror on its own: rows stored from the device come back unchanged (model dtype), within
the e4m3 bound (FP8) or within half a 4-bit step (int4), with exact key summaries, into a private
allocation or an arena; ``load`` puts them into pool slots as ``fetch`` returns them."""
from types import SimpleNamespace

import pytest
import torch

from engine.config import ModelConfig
from engine.errors import InvalidRequestError
from engine.host_arena import ArenaLayout
from engine.host_mirror import HostMirror
from tiny import CFG  # noqa: E402

B = 4
CPU = torch.device("cpu")


def _arena(num_blocks):
    """What the mirror takes from an arena (a HostArena): its host and summary rows, no scales (model dtype)."""
    return SimpleNamespace(host=torch.zeros(num_blocks, CFG.num_layers, 2, CFG.num_kv_heads, B, CFG.head_dim),
                           summary=torch.zeros(num_blocks, CFG.num_layers, 3, CFG.num_kv_heads, CFG.head_dim),
                           scale=None)


def _blocks(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, CFG.num_layers, 2, CFG.num_kv_heads, B, CFG.head_dim, generator=gen)  # [n, L, 2, H, B, D]


@pytest.mark.parametrize("where", ["private", "arena"])
def test_store_then_fetch_round_trips_with_exact_summaries(where):
    arena = _arena(10) if where == "arena" else None
    mirror = HostMirror(CFG, B, 0 if arena else 10, torch.float32, CPU, arena=arena)
    assert mirror.num_blocks == 10  # an arena's rows, however many were asked for
    blocks, hosts = _blocks(4, 0), [7, 2, 3, 9]
    summary = mirror.store(hosts, slice(None), blocks)
    keys = blocks[:, :, 0].double()  # [n, L, H, B, D]
    want = torch.stack([keys.amin(3), keys.amax(3), keys.mean(3)], 2)  # [n, L, 3, H, D]
    assert torch.allclose(summary.double(), want, atol=1e-6)
    assert torch.equal(mirror.summary[torch.tensor(hosts)], summary)
    if arena is not None:  # the rows live in the arena's memory
        assert torch.equal(arena.host[torch.tensor(hosts)], blocks)
    assert torch.equal(mirror.fetch_rows(hosts), blocks)
    assert torch.equal(mirror.fetch(torch.tensor([9, 7]), 1), blocks[[3, 0], 1])
    # one layer stored alone leaves the other layers of the row as they were
    layer = _blocks(1, 1)[:, 1:2]
    mirror.store([2], slice(1, 2), layer)
    assert torch.equal(mirror.fetch_rows([2])[0, 1], layer[0, 0])
    assert torch.equal(mirror.fetch_rows([2])[0, 0], blocks[1, 0])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_one_layers_summaries_come_back_as_stored(device):
    """fetch_summary: a layer's key summaries of any rows, in the order asked (runs of consecutive
    rows and single ones), equal to the rows the store wrote; on CUDA by DMA from page-locked rows."""
    device = torch.device(device)
    mirror = HostMirror(CFG, B, 12, torch.float32, device)
    assert mirror.pinned == (device.type == "cuda")
    hosts = [7, 2, 3, 9, 10, 11, 0]
    mirror.store(hosts, slice(None), _blocks(len(hosts), 2).to(device))
    for layer in range(CFG.num_layers):
        asked = [9, 10, 11, 2, 7, 3]
        got = mirror.fetch_summary(asked, layer)
        assert got.device.type == device.type and got.shape == (6, 3, CFG.num_kv_heads, CFG.head_dim)
        mirror.wait_writes()
        assert torch.equal(got.cpu(), mirror.summary[torch.tensor(asked), layer])


@pytest.mark.parametrize("host_dtype", [None, "fp8", "int4"])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_one_layers_keys_come_back_as_the_whole_layer_has_them(device, host_dtype):
    """fetch_keys (exact-attention scoring: keys only, half the bytes) equals the key half of
    fetch_layer, in every host format, from pageable (CPU) and page-locked (CUDA) rows."""
    device = torch.device(device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    mirror = HostMirror(CFG, B, 12, dtype, device, host_dtype=host_dtype)
    hosts = [7, 2, 3, 9, 10, 11, 0]
    mirror.store(hosts, slice(None), _blocks(len(hosts), 4).to(device, dtype))
    asked = [9, 10, 11, 2, 7, 3]
    for layer in range(CFG.num_layers):
        keys = mirror.fetch_keys(asked, layer)
        assert keys.dtype == dtype and keys.shape == (6, CFG.num_kv_heads, B, CFG.head_dim)
        assert torch.equal(keys, mirror.fetch_layer(asked, layer)[:, 0])


def test_fp8_rows_cost_a_byte_per_element_and_come_back_within_bound():
    exact = HostMirror(CFG, B, 6, torch.float32, CPU)
    fp8 = HostMirror(CFG, B, 6, torch.float32, CPU, host_dtype="fp8")
    blocks = _blocks(3, 2)
    s_exact, s_fp8 = exact.store([0, 1, 5], slice(None), blocks), fp8.store([0, 1, 5], slice(None), blocks)
    assert torch.equal(s_exact, s_fp8)  # summaries from the unquantized keys
    back = fp8.fetch_rows([0, 1, 5])
    bound = blocks.abs().amax((-2, -1), keepdim=True) / 16  # 3 mantissa bits against the block's amax
    assert back.dtype == torch.float32 and ((back - blocks).abs() <= bound).all()
    elems = CFG.num_layers * 2 * CFG.num_kv_heads * B * CFG.head_dim
    assert exact.bytes_per_block == 4 * elems
    assert fp8.bytes_per_block == elems + CFG.num_layers * 2 * CFG.num_kv_heads * 4


def test_int4_rows_cost_half_a_byte_per_element_plus_scales_and_load_into_slots():
    fp8 = HostMirror(CFG, B, 6, torch.float32, CPU, host_dtype="fp8")
    int4 = HostMirror(CFG, B, 6, torch.float32, CPU, host_dtype="int4")
    blocks = _blocks(3, 3)
    assert torch.equal(int4.store([0, 4, 5], slice(None), blocks), fp8.store([0, 4, 5], slice(None), blocks))
    back = int4.fetch_rows([0, 4, 5])
    codes, meta = int4.host[[0, 4, 5]], int4.scale[[0, 4, 5]]
    d = CFG.head_dim
    k_step = meta[..., :d].float()[:, :, :, None, :]  # [n, L, H, 1, D] per channel
    v_step = meta[..., 2 * d: 2 * d + B].float()[..., None]  # [n, L, H, B, 1] per token
    assert ((back[:, :, 0] - blocks[:, :, 0]).abs() <= k_step / 2 * (1 + 1e-6)).all()
    assert ((back[:, :, 1] - blocks[:, :, 1]).abs() <= v_step / 2 * (1 + 1e-6)).all()
    assert codes.dtype == torch.uint8 and meta.dtype == torch.float16
    # exact accounting: 4 bits per element, and per (layer, head) 2D key + 2B value float16 scales
    elems = CFG.num_layers * 2 * CFG.num_kv_heads * B * CFG.head_dim
    scales = CFG.num_layers * CFG.num_kv_heads * (2 * CFG.head_dim + 2 * B) * 2
    assert int4.bytes_per_block == elems // 2 + scales == int4.host[0].nbytes + int4.scale[0].nbytes
    assert int4.bytes_per_layer_block * CFG.num_layers == int4.bytes_per_block
    # load: the rows into slots of a pool, as fetch returns them; one layer alone into pool[l:l+1]
    pool = torch.full((CFG.num_layers, 2, 5, CFG.num_kv_heads, B, CFG.head_dim), float("nan"))
    int4.load([5, 0], slice(None), pool, torch.tensor([3, 1]))
    assert torch.equal(pool[:, :, 3], back[2]) and torch.equal(pool[:, :, 1], back[0])
    int4.load([4], slice(2, 3), pool[2:3], torch.tensor([0]))
    assert torch.equal(pool[2, :, 0], back[1, 2]) and torch.isnan(pool[:2, :, 0]).all()


def test_copies_ahead_run_in_place_without_cuda_and_bad_settings_are_refused():
    mirror = HostMirror(CFG, B, 2, torch.float32, CPU)
    ran = []
    with mirror.ahead():
        ran.append(mirror.copy_stream)
    mirror.join()
    assert ran == [None]
    with pytest.raises(InvalidRequestError, match="host_dtype"):
        HostMirror(CFG, B, 2, torch.float32, CPU, host_dtype="int2")
    arena = _arena(2)
    with pytest.raises(InvalidRequestError, match="arena.s format differ"):  # an FP8 mirror needs an FP8 arena
        HostMirror(CFG, B, 2, torch.float32, CPU, host_dtype="fp8", arena=arena)
    with pytest.raises(InvalidRequestError, match="private arena"):  # no arena holds int4
        HostMirror(CFG, B, 2, torch.float32, CPU, host_dtype="int4", arena=arena)
    with pytest.raises(InvalidRequestError, match="shared arena"):  # and no store sizes one for it
        ArenaLayout.of(CFG, B, torch.float32, "int4")


def test_copies_ahead_per_sequence_order_only_that_sequences_reads_and_land_intact():
    """``join(owner)`` orders the compute stream after that owner's copies alone (a boundary does
    not wait for copies queued since for other sequences); a global ``join`` after all. CUDA: the
    copies land as stored when read after their owner's join; on the CPU the same calls run in place."""
    dev = torch.device("cuda") if torch.cuda.is_available() else CPU
    mirror = HostMirror(CFG, B, 8, torch.float32, dev)
    data = _blocks(4, 11).to(dev)
    mirror.store([0, 1, 2, 3], slice(None), data)
    L, _, H, _, D = data.shape[1:]
    pool = torch.zeros(L, 2, 8, H, B, D, device=dev)  # [L, 2, S, H, B, D]
    as_slots = lambda rows: rows.permute(1, 2, 0, 3, 4, 5)  # noqa: E731  [n, L, 2, ...] -> [L, 2, n, ...]
    with mirror.ahead("a"):
        mirror.load([0, 1], slice(None), pool, torch.tensor([5, 6], device=dev))
    with mirror.ahead("b"):
        mirror.load([2, 3], slice(None), pool, torch.tensor([1, 2], device=dev))
    mirror.join("a")
    assert torch.equal(pool[:, :, 5:7], as_slots(data[0:2]))  # read on the compute stream, after a's copies
    if dev.type == "cuda":
        assert set(mirror._owner_copies) == {"a", "b"} and mirror._copies_pending  # b's not waited for
    mirror.forget("a")
    mirror.join()
    assert torch.equal(pool[:, :, 1:3], as_slots(data[2:4])) and not mirror._owner_copies and not mirror._copies_pending
    mirror.join("b")  # nothing left to wait for: no-op
