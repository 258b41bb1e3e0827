"""sparse_decode_attention (Triton and torch reference) against an independent float64 loop.

Tolerances, ||out - ref|| / ||ref|| over the whole output: fp32 1e-5, fp16 2e-3, bf16 1e-2
(P is rounded to the cache dtype before the P @ V product, as in flash attention); block mass
(fp32, scores are exact products of the rounded inputs) max abs error 5e-5, sums 1 +- 1e-5.
On CPU the Triton path runs under TRITON_INTERPRET=1 in fp32 / fp16; on CUDA in bf16 / fp16.
"""
import pytest
import torch

from kernel_cases import CUDA, DEVICE_DTYPES, TOL, rel_err  # first: sets TRITON_INTERPRET on CPU
import kernels
from kernels import reference

BACKENDS = ["triton", "torch"]


def attention_impl(backend):
    if backend == "torch":
        return reference.sparse_decode_attention
    from kernels.sparse_attention import sparse_decode_attention_triton
    return sparse_decode_attention_triton


def make_case(gen, device, dtype, n_qh, n_kvh, head_dim, block, num_blocks, last_len, pad=2):
    """A 2-layer pool with NaN everywhere no listed token lives, and the tables that list it."""
    n_seq = len(num_blocks)
    width = max(num_blocks) + pad
    n_slots = sum(num_blocks) + 5
    pool = torch.full((2, 2, n_slots, n_kvh, block, head_dim), float("nan"), dtype=dtype)
    perm = torch.randperm(n_slots, generator=gen)
    table = torch.full((n_seq, width), -7, dtype=torch.int32)   # padding: never dereferenced
    used = 0
    for n, (nb, last) in enumerate(zip(num_blocks, last_len)):
        slots = perm[used:used + nb]
        used += nb
        table[n, :nb] = slots.int()
        for j, slot in enumerate(slots.tolist()):
            fill = last if j == nb - 1 else block
            pool[1, :, slot, :, :fill] = torch.randn(2, n_kvh, fill, head_dim, generator=gen).to(dtype)
    q = (2.0 * torch.randn(n_seq, n_qh, head_dim, generator=gen)).to(dtype)
    to = dict(device=device)
    return (q.to(**to), pool.to(**to), table.to(**to), torch.tensor(num_blocks, dtype=torch.int32, **to),
            torch.tensor(last_len, dtype=torch.int32, **to))


def attention_f64(q, k_cache, v_cache, table, num_blocks, last_len, scale):
    """Per sequence and head: gather the listed tokens, explicit softmax, in float64."""
    n_seq, n_qh, head_dim = q.shape
    n_kvh, block = k_cache.shape[1], k_cache.shape[2]
    group = n_qh // n_kvh
    out = torch.zeros(n_seq, n_qh, head_dim, dtype=torch.float64)
    mass = torch.zeros(n_seq, n_qh, table.shape[1], dtype=torch.float64)
    for n in range(n_seq):
        nb = int(num_blocks[n])
        lens = [block] * (nb - 1) + [int(last_len[n])]
        slots = table[n, :nb].tolist()
        for h in range(n_qh):
            kvh = h // group
            keys = torch.cat([k_cache[s, kvh, :ln].double().cpu() for s, ln in zip(slots, lens)])
            vals = torch.cat([v_cache[s, kvh, :ln].double().cpu() for s, ln in zip(slots, lens)])
            logits = keys @ q[n, h].double().cpu() * scale
            p = torch.exp(logits - logits.max())
            p = p / p.sum()
            out[n, h] = p @ vals
            for j, chunk in enumerate(torch.split(p, lens)):
                mass[n, h, j] = chunk.sum()
    return out, mass



SHAPES = [  # (Hq, Hkv, D, B): GQA ratios 1, 4, 8, 3 (3 = SmolLM2's 9 / 3)
    (2, 2, 64, 16),
    (8, 2, 128, 32),
    (8, 1, 64, 64),
    (9, 3, 64, 128),
    (6, 2, 128, 16),
    (4, 1, 128, 128),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("n_qh,n_kvh,head_dim,block", SHAPES)
def test_sparse_attention_matches_f64(backend, device, dtype, n_qh, n_kvh, head_dim, block):
    gen = torch.Generator().manual_seed(hash((n_qh, n_kvh, head_dim, block, str(dtype))) % 2**31)
    # several sequences: tail only (1 token, full), one full block + tail, odd lengths
    num_blocks = [1, 1, 2, 7, 4]
    last_len = [1, block, 1 + block // 2, 3, block - 1]
    q, pool, table, nb, last = make_case(gen, device, dtype, n_qh, n_kvh, head_dim, block,
                                         num_blocks, last_len)
    k_cache, v_cache = pool[1, 0], pool[1, 1]              # strided views, as the engine passes
    scale = head_dim ** -0.5
    ref_out, ref_mass = attention_f64(q, k_cache, v_cache, table, nb, last, scale)

    out = torch.full_like(q, float("nan"))
    mass = torch.full((q.shape[0], n_qh, table.shape[1]), float("nan"), device=device)
    fn = attention_impl(backend)
    res_out, res_mass = fn(q, k_cache, v_cache, table, nb, last, scale, True, out=out, mass_out=mass)
    assert res_out.data_ptr() == out.data_ptr() and res_mass.data_ptr() == mass.data_ptr()
    assert out.dtype == dtype and mass.dtype == torch.float32
    assert not out.isnan().any() and not mass.isnan().any(), "every output element written"
    assert rel_err(out, ref_out) < TOL[dtype]
    assert (mass.double().cpu() - ref_mass).abs().max().item() < 5e-5
    sums = mass.double().sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    for n, k in enumerate(num_blocks):
        assert (mass[n, :, k:] == 0).all(), "padding entries have zero mass"

    plain = fn(q, k_cache, v_cache, table, nb, last, scale)   # no mass, own output buffer
    assert rel_err(plain, ref_out) < TOL[dtype]


@pytest.mark.parametrize("num_splits,min_blocks", [(1, 1), (2, 1), (3, 1), (64, 1), (8, 2), (3, 4), (64, 16)])
def test_triton_split_counts(num_splits, min_blocks):
    """Split-K with 1 split, uneven splits, more splits than blocks (empty programs), and rows
    shared out over fewer splits than launched (``min_blocks``: the rest stay empty)."""
    device, dtype = DEVICE_DTYPES[0]
    gen = torch.Generator().manual_seed(num_splits * 31 + min_blocks)
    q, pool, table, nb, last = make_case(gen, device, dtype, 8, 2, 64, 16, [5, 1, 3], [7, 2, 16])
    from kernels.sparse_attention import sparse_decode_attention_triton
    out, mass = sparse_decode_attention_triton(q, pool[1, 0], pool[1, 1], table, nb, last, 0.125,
                                               True, num_splits=num_splits, min_blocks=min_blocks)
    ref_out, ref_mass = attention_f64(q, pool[1, 0], pool[1, 1], table, nb, last, 0.125)
    assert rel_err(out, ref_out) < TOL[dtype]
    assert (mass.double().cpu() - ref_mass).abs().max().item() < 5e-5


def test_the_same_rows_give_the_same_bits_in_a_wider_table():
    """The default split count depends on the grid, never on the table's width: an offloading
    policy's CUDA graph holds its rows in a table as wide as the decode reserve, full attention's in
    a narrow one, and budget 1.0 must equal full attention bit-exactly (it did not on the H200 when
    a narrow table capped the splits: the partial sums were combined in another order)."""
    device, dtype = DEVICE_DTYPES[0]
    gen = torch.Generator().manual_seed(5)
    q, pool, table, nb, last = make_case(gen, device, dtype, 8, 2, 64, 16, [5, 1, 3], [7, 2, 16], pad=0)
    wide = torch.full((table.shape[0], 300), -7, dtype=table.dtype, device=table.device)
    wide[:, :table.shape[1]] = table
    from kernels.sparse_attention import sparse_decode_attention_triton
    narrow_out = sparse_decode_attention_triton(q, pool[1, 0], pool[1, 1], table, nb, last, 0.125)
    wide_out = sparse_decode_attention_triton(q, pool[1, 0], pool[1, 1], wide, nb, last, 0.125)
    assert torch.equal(narrow_out, wide_out)
    ref_out, _ = attention_f64(q, pool[1, 0], pool[1, 1], table, nb, last, 0.125)
    assert rel_err(wide_out, ref_out) < TOL[dtype]


def test_wide_table_shares_the_listed_blocks_out():
    """A table much wider than the rows list (a CUDA graph's, sized for its widest row): the
    splits share each row's own blocks, so a row of 40 blocks in a 300-wide table with 8 splits
    is still exact (and no entry past num_blocks, NaN in the pool, is read)."""
    device, dtype = DEVICE_DTYPES[0]
    gen = torch.Generator().manual_seed(11)
    q, pool, table, nb, last = make_case(gen, device, dtype, 8, 2, 64, 16, [40, 1, 9], [3, 16, 5], pad=260)
    from kernels.sparse_attention import sparse_decode_attention_triton
    out = sparse_decode_attention_triton(q, pool[1, 0], pool[1, 1], table, nb, last, 0.125, num_splits=8)
    ref_out, _ = attention_f64(q, pool[1, 0], pool[1, 1], table, nb, last, 0.125)
    assert rel_err(out, ref_out) < TOL[dtype]


def test_noncontiguous_query_and_long_sequence():
    """q as a strided view; one sequence much longer than the rest (the split-K case)."""
    device, dtype = DEVICE_DTYPES[0]
    gen = torch.Generator().manual_seed(7)
    q, pool, table, nb, last = make_case(gen, device, dtype, 4, 1, 128, 16, [40, 2], [9, 1])
    q_view = torch.cat([q, q], dim=-1)[..., 128:]           # same values, row stride 256
    assert not q_view.is_contiguous()
    from kernels.sparse_attention import sparse_decode_attention_triton
    out = sparse_decode_attention_triton(q_view, pool[1, 0], pool[1, 1], table, nb, last, 0.1)
    ref_out, _ = attention_f64(q, pool[1, 0], pool[1, 1], table, nb, last, 0.1)
    assert rel_err(out, ref_out) < TOL[dtype]


@pytest.mark.parametrize("setting,expect", [("torch", "reference"), ("triton", "triton"),
                                            ("auto", "triton" if CUDA else "reference")])
def test_dispatcher_follows_env(monkeypatch, setting, expect):
    device, dtype = DEVICE_DTYPES[0]
    monkeypatch.setenv("LSA_KERNELS", setting)
    called = []
    import kernels.sparse_attention as sa
    monkeypatch.setattr(reference, "sparse_decode_attention",
                        lambda *a, **k: called.append("reference"))
    monkeypatch.setattr(sa, "sparse_decode_attention_triton", lambda *a, **k: called.append("triton"))
    gen = torch.Generator().manual_seed(3)
    q, pool, table, nb, last = make_case(gen, device, dtype, 2, 2, 64, 16, [2], [3])
    kernels.sparse_decode_attention(q, pool[1, 0], pool[1, 1], table, nb, last, 0.1)
    assert called == [expect]


def test_bad_env_value_raises(monkeypatch):
    monkeypatch.setenv("LSA_KERNELS", "cuda")
    q = torch.randn(1, 2, 64)
    with pytest.raises(ValueError):
        kernels.sparse_decode_attention(q, None, None, None, None, None, 0.1)
