"""paged_kv_write (Triton and torch reference): token writes and block summaries.

Written K/V must equal the input cast to the cache dtype exactly; nothing else in the pool may
change (unused positions start as NaN and must stay NaN). Summaries: min / max exactly the
float64 values cast to the summary dtype; mean within rtol 1e-5 (fp32), 2e-3 (fp16),
1e-2 (bf16), atol 1e-5. Summary rows of untouched blocks stay NaN.
"""
import pytest
import torch

from kernel_cases import DEVICE_DTYPES, TOL as MEAN_RTOL  # first: sets TRITON_INTERPRET on CPU
import kernels
from kernels import reference


def write_impl(backend):
    if backend == "torch":
        return reference.paged_kv_write
    from kernels.kv_write import paged_kv_write_triton
    return paged_kv_write_triton


# (slot, tokens already in the block before the call, offsets written by the call)
DECODE = [(3, 5, [5]), (0, 0, [0]), (6, 15, [15]), (2, 9, [9])]
PREFILL = [(1, 0, list(range(16))), (4, 0, list(range(7))), (5, 4, list(range(4, 11))),
           (7, 15, [15])]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("head_dim,n_kvh,summary_f32", [(64, 3, False), (128, 2, True)])
@pytest.mark.parametrize("plan", [DECODE, PREFILL], ids=["decode", "prefill"])
def test_kv_write_and_summaries(backend, device, dtype, head_dim, n_kvh, summary_f32, plan):
    gen = torch.Generator().manual_seed(head_dim + n_kvh + len(plan))
    n_slots, block, layer = 9, 16, 1
    pool = torch.full((2, 2, n_slots, n_kvh, block, head_dim), float("nan"), dtype=dtype)
    for slot, before, _ in plan:
        pool[layer, :, slot, :, :before] = torch.randn(2, n_kvh, before, head_dim, generator=gen).to(dtype)
    sdt = torch.float32 if summary_f32 else dtype
    n_rows = 12
    summaries = torch.full((3, n_rows, n_kvh, head_dim), float("nan"), dtype=sdt)   # min, max, mean
    row_of_slot = torch.randperm(n_rows, generator=gen)[:n_slots]

    slots = torch.tensor([s for s, _, offs in plan for _ in offs])
    offsets = torch.tensor([o for _, _, offs in plan for o in offs])
    order = torch.randperm(len(slots), generator=gen)                # tokens in any order
    slots, offsets = slots[order], offsets[order]
    k = torch.randn(len(slots), n_kvh, head_dim, generator=gen)
    v = torch.randn(len(slots), n_kvh, head_dim, generator=gen)

    want = pool.clone()
    want[layer, 0, slots, :, offsets] = k.to(dtype)
    want[layer, 1, slots, :, offsets] = v.to(dtype)

    dev = dict(device=device)
    pool_d, summaries_d = pool.to(**dev), summaries.to(**dev)
    write_impl(backend)(
        k.to(dtype).to(**dev), v.to(**dev), pool_d[layer, 0], pool_d[layer, 1],
        slots.to(torch.int32).to(**dev), offsets.to(**dev),
        summaries_d[0], summaries_d[1], summaries_d[2], row_of_slot[slots].to(**dev))

    got = pool_d.cpu()
    assert torch.equal(got.isnan(), want.isnan()), "exactly the listed positions written"
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    got_s = summaries_d.cpu()
    touched = set()
    for slot, before, offs in plan:
        row = int(row_of_slot[slot])
        touched.add(row)
        keys = want[layer, 0, slot, :, :max(offs) + 1].double()      # [Hkv, n, D]
        assert torch.equal(got_s[0, row], keys.amin(1).to(sdt))
        assert torch.equal(got_s[1, row], keys.amax(1).to(sdt))
        torch.testing.assert_close(got_s[2, row].double(), keys.mean(1),
                                   rtol=MEAN_RTOL[sdt], atol=1e-5)
    untouched = [r for r in range(n_rows) if r not in touched]
    assert got_s[:, untouched].isnan().all(), "no other summary row written"


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES[:1])
def test_write_without_summaries_and_block_fill_by_steps(device, dtype):
    """Decode one token at a time through the public entry point; the summary follows."""
    gen = torch.Generator().manual_seed(2)
    pool = torch.full((2, 4, 2, 16, 64), float("nan"), dtype=dtype, device=device)
    kmin, kmax, kmean = (torch.full((4, 2, 64), float("nan"), dtype=dtype, device=device)
                         for _ in range(3))
    keys = torch.randn(16, 2, 64, generator=gen).to(dtype)
    for off in range(16):
        t = dict(dtype=torch.int64, device=device)
        kernels.paged_kv_write(keys[off:off + 1].to(device), keys[off:off + 1].to(device),
                               pool[0], pool[1], torch.tensor([2], **t), torch.tensor([off], **t),
                               kmin, kmax, kmean, torch.tensor([1], **t))
        prefix = keys[:off + 1].double()
        assert torch.equal(kmin[1].cpu(), prefix.amin(0).to(dtype))
        assert torch.equal(kmax[1].cpu(), prefix.amax(0).to(dtype))
        torch.testing.assert_close(kmean[1].cpu().double(), prefix.mean(0),
                                   rtol=MEAN_RTOL[dtype], atol=1e-5)
    assert torch.equal(pool[0, 2].cpu(), keys.transpose(0, 1))
    kernels.paged_kv_write(keys[:3].to(device), keys[:3].to(device), pool[0], pool[1],
                           torch.tensor([3, 3, 3], device=device), torch.tensor([0, 1, 2], device=device))
    assert torch.equal(pool[0, 3, :, :3].cpu(), keys[:3].transpose(0, 1))
    assert pool[0, 3, :, 3:].isnan().all()
