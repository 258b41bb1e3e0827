"""block_scores (Triton and torch reference) and select_blocks against float64 / brute force.

block_scores tolerance: |out - ref| <= 1e-5 * |ref| + 1e-4 (fp32 sums of D exact products of
the rounded inputs; values are O(10)). Padding entries must be exactly -inf.
"""
import pytest
import torch

from kernel_cases import DEVICE_DTYPES  # first: sets TRITON_INTERPRET on CPU
import kernels
from kernels import reference


def scores_impl(backend):
    if backend == "torch":
        return reference.block_scores
    from kernels.scoring import block_scores_triton
    return block_scores_triton


def make_summaries(gen, n_rows, n_kvh, head_dim, dtype):
    """Summaries of real random blocks (kmin <= kmean <= kmax), with some rows left NaN."""
    keys = torch.randn(n_rows, n_kvh, 16, head_dim, generator=gen) + torch.randn(n_rows, n_kvh, 1, head_dim, generator=gen)
    kmin, kmax, kmean = keys.amin(2), keys.amax(2), keys.mean(2)
    unused = torch.randperm(n_rows, generator=gen)[: n_rows // 4]
    for t in (kmin, kmax, kmean):
        t[unused] = float("nan")
    used = torch.ones(n_rows, dtype=torch.bool)
    used[unused] = False
    return kmin.to(dtype), kmax.to(dtype), kmean.to(dtype), used.nonzero().flatten()


def scores_f64(q, kmin, kmax, kmean, table, num_blocks):
    """The definition, one (sequence, KV head, entry) at a time, in float64."""
    q = q[:, None] if q.dim() == 3 else q
    n_seq, window, n_qh, _ = q.shape
    n_kvh = kmin.shape[1]
    group = n_qh // n_kvh
    quest = torch.full((n_seq, n_kvh, table.shape[1]), float("-inf"), dtype=torch.float64)
    meandot = quest.clone()
    q = q.double().cpu()
    for n in range(n_seq):
        for h in range(n_kvh):
            qs = q[n, :, h * group:(h + 1) * group].reshape(-1, q.shape[-1])   # [W*G, D]
            for m in range(int(num_blocks[n])):
                r = int(table[n, m])
                lo, hi, mu = (t[r, h].double().cpu() for t in (kmin, kmax, kmean))
                quest[n, h, m] = torch.maximum(qs * lo, qs * hi).sum(-1).max()
                meandot[n, h, m] = (qs @ mu).max()
    return quest, meandot


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("n_qh,n_kvh,head_dim,window", [(2, 2, 64, 0), (8, 2, 128, 0),
                                                        (8, 1, 64, 3), (9, 3, 64, 2)])
def test_block_scores_match_f64(backend, device, dtype, n_qh, n_kvh, head_dim, window):
    gen = torch.Generator().manual_seed(n_qh * 100 + head_dim + window)
    kmin, kmax, kmean, used = make_summaries(gen, 120, n_kvh, head_dim, dtype)
    num_blocks = [1, 37, 5, 70]                          # 37 and 70: past one 32-entry tile
    width = 73
    table = torch.full((len(num_blocks), width), -5, dtype=torch.int32)   # padding: never read
    for n, nb in enumerate(num_blocks):
        table[n, :nb] = used[torch.randperm(len(used), generator=gen)[:nb]].int()
    qshape = (len(num_blocks), n_qh, head_dim) if window == 0 else (len(num_blocks), window, n_qh, head_dim)
    q = torch.randn(qshape, generator=gen).to(dtype)
    nb = torch.tensor(num_blocks, dtype=torch.int32)
    ref_quest, ref_meandot = scores_f64(q, kmin, kmax, kmean, table, nb)

    dev = dict(device=device)
    out = tuple(torch.full((len(num_blocks), n_kvh, width), float("nan"), **dev) for _ in range(2))
    quest, meandot = scores_impl(backend)(q.to(**dev), kmin.to(**dev), kmax.to(**dev),
                                          kmean.to(**dev), table.to(**dev), nb.to(**dev), out=out)
    assert quest.data_ptr() == out[0].data_ptr() and meandot.data_ptr() == out[1].data_ptr()
    for got, ref in ((quest, ref_quest), (meandot, ref_meandot)):
        got = got.double().cpu()
        assert not got.isnan().any(), "every output element written"
        listed = torch.isfinite(ref)
        assert (got[~listed] == float("-inf")).all()
        assert (got[listed] - ref[listed]).abs().le(1e-5 * ref[listed].abs() + 1e-4).all()
    # the bound holds: quest >= meandot for every listed entry (mean lies inside [min, max])
    assert (ref_quest[listed] >= ref_meandot[listed] - 1e-9).all()


def test_public_block_scores_runs():
    """The dispatched entry point returns [N, Hkv, M] fp32 on this machine's default backend."""
    device, dtype = DEVICE_DTYPES[0]
    gen = torch.Generator().manual_seed(5)
    kmin, kmax, kmean, used = make_summaries(gen, 20, 2, 64, dtype)
    table = used[:6].int().view(2, 3).to(device)
    nb = torch.tensor([3, 2], dtype=torch.int32, device=device)
    q = torch.randn(2, 4, 64, generator=gen).to(dtype).to(device)
    quest, meandot = kernels.block_scores(q, kmin.to(device), kmax.to(device), kmean.to(device), table, nb)
    ref_quest, ref_meandot = scores_f64(q, kmin, kmax, kmean, table.cpu(), nb.cpu())
    assert quest.shape == (2, 2, 3) and quest.dtype == torch.float32
    assert torch.allclose(quest.double().cpu(), ref_quest, rtol=1e-5, atol=1e-4)
    assert torch.allclose(meandot.double().cpu(), ref_meandot, rtol=1e-5, atol=1e-4)


def select_brute(row, nb, k, threshold, top_p):
    cand = [(float(row[m]), m) for m in range(nb)]
    if threshold is not None:
        cand = [c for c in cand if c[0] >= threshold]
    cand.sort(key=lambda c: (-c[0], c[1]))
    if top_p is not None:
        total = sum(max(c[0], 0.0) for c in cand)
        kept, acc = [], 0.0
        for c in cand:
            if acc >= top_p * total:
                break
            kept.append(c)
            acc += max(c[0], 0.0)
        cand = kept
    if k is not None:
        cand = cand[:k]
    return [m for _, m in cand]


@pytest.mark.parametrize("k,threshold,top_p", [(3, None, None), (None, 0.5, None), (None, None, 0.6),
                                                (4, 0.2, None), (2, None, 0.9), (50, None, None)])
def test_select_blocks_matches_brute_force(k, threshold, top_p):
    gen = torch.Generator().manual_seed(11)
    scores = torch.rand(3, 2, 12, generator=gen)           # [N, H, M], mass-like (>= 0)
    num_blocks = torch.tensor([12, 1, 7])
    idx, count = kernels.select_blocks(scores, num_blocks, k=k, threshold=threshold, top_p=top_p)
    assert idx.shape[-1] == (min(k, 12) if k else 12) and count.dtype == torch.int32
    for n in range(3):
        for h in range(2):
            want = select_brute(scores[n, h], int(num_blocks[n]), k, threshold, top_p)
            c = int(count[n, h])
            assert idx[n, h, :c].tolist() == want
            assert (idx[n, h, c:] == -1).all()
