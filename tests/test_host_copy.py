"""engine/host_copy.py: rows of a host table to and from a dense tensor, one copy per run of
consecutive rows. On the CPU the row-by-row fallback; with CUDA the 2-D DMA copies (a layer of
each block, a whole row apart) against plain indexing, into torch's pinned memory and into
registered memory (as a KV store's arena is), in the model dtype and in FP8."""
import pytest
import torch

from engine.host_copy import gather_rows, runs, scatter_rows


def test_runs_split_rows_into_consecutive_stretches():
    assert runs([]) == []
    assert runs([7, 8, 9, 10, 3, 12, 13]) == [(0, 7, 4), (4, 3, 1), (5, 12, 2)]
    assert runs([5, 4]) == [(0, 5, 1), (1, 4, 1)]


@pytest.mark.parametrize("layer", [None, 1])  # whole rows (contiguous runs), one layer of each (strided)
def test_the_fallback_copies_what_indexing_would(layer):
    table = torch.randn(12, 3, 2, 4, 5)  # [N, L, 2, B, D]
    view = table if layer is None else table[:, layer]
    rows = [7, 8, 9, 3, 11, 0, 1]
    dense = torch.empty((len(rows), *view.shape[1:]))
    gather_rows(dense, view, rows)
    assert torch.equal(dense, view[torch.tensor(rows)])
    new = torch.randn_like(dense)
    scatter_rows(view, rows, new)
    assert torch.equal(view[torch.tensor(rows)], new)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("registered", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_2d_copies_match_indexing_on_cuda(registered, dtype):
    from engine.host_copy import cuda_runtime
    from engine.host_memory import register_host

    assert cuda_runtime() is not None
    shape = (40, 6, 2, 3, 16, 64)  # [N, L, 2, H, B, D]
    if registered:
        table = torch.empty(shape, dtype=dtype)
        assert register_host(table.data_ptr(), table.numel() * table.element_size())
    else:
        table = torch.empty(shape, dtype=dtype, pin_memory=True)
    table.view(torch.uint8).random_(0, 120)  # finite values in either dtype, compared as bytes
    rows = [3, 4, 5, 6, 20, 9, 10, 39]
    index = torch.tensor(rows)
    for layer in (0, 5):
        dense = torch.empty((len(rows), *shape[2:]), dtype=dtype, device="cuda")
        gather_rows(dense, table[:, layer], rows)
        torch.cuda.synchronize()
        assert torch.equal(dense.cpu().view(torch.uint8), table[index, layer].view(torch.uint8))
    whole = torch.empty((len(rows), *shape[1:]), dtype=dtype, device="cuda")
    gather_rows(whole, table, rows)
    new = torch.randint(0, 120, whole.view(torch.uint8).shape, dtype=torch.uint8, device="cuda").view(dtype)
    scatter_rows(table[:, 2:3], rows, new[:, 2:3].contiguous())
    torch.cuda.synchronize()
    assert torch.equal(whole.cpu().view(torch.uint8)[:, 1], table[index, 1].view(torch.uint8))
    assert torch.equal(table[index, 2].view(torch.uint8), new[:, 2].cpu().view(torch.uint8))
    if registered:
        torch.cuda.cudart().cudaHostUnregister(table.data_ptr())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("host_dtype", [None, "fp8"])
def test_a_page_locked_mirror_fetches_a_layer_as_the_host_gather_does(host_dtype):
    """``HostMirror.fetch_layer`` (2-D copies of the rows and, FP8, of their scales) against
    ``fetch`` (a gather on the host), after ``store`` wrote the rows asynchronously."""
    from engine.host_mirror import HostMirror
    from tiny import TINY

    block, device = 16, torch.device("cuda")
    mirror = HostMirror(TINY, block, 24, torch.bfloat16, device, host_dtype=host_dtype)
    assert mirror.pinned
    gen = torch.Generator(device="cuda").manual_seed(0)
    hosts = [5, 6, 7, 8, 2, 20, 21]
    shape = (len(hosts), TINY.num_layers, 2, TINY.num_kv_heads, block, TINY.head_dim)
    mirror.store(hosts, slice(None), torch.randn(shape, generator=gen, device="cuda").to(torch.bfloat16))
    for layer in range(TINY.num_layers):
        got = mirror.fetch_layer(hosts, layer)
        want = mirror.fetch(torch.tensor(hosts), layer)
        assert torch.equal(got, want), layer


def test_the_copy_probe_measures_page_locked_tables_only():
    """copy_probe: GB/s of whole rows, one layer of each row, and the reference buffer, from a
    page-locked table to the GPU; nothing from pageable memory (or without CUDA)."""
    from engine.host_copy import copy_probe

    table = torch.randn(8, 3, 2, 16, 8)  # [N, L, 2, B, D]
    assert copy_probe(table, torch.device("cpu")) == {}
    if not torch.cuda.is_available():
        return
    assert copy_probe(table, torch.device("cuda")) == {}  # pageable
    gbps = copy_probe(table.pin_memory(), torch.device("cuda"), nbytes=1 << 12)
    assert set(gbps) == {"arena", "arena_layer", "pinned"} and all(v > 0 for v in gbps.values())
