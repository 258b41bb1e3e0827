"""A benchmark (``lsa bench BENCHMARK``) with the decode step's choices set otherwise, for A/B runs in one session:

    python -m benchmarks.variant NAME [NAME...] -- bench decode --contexts 131072 ...

NAME: ``base`` (nothing changed), ``no-glu`` (the gate|up GEMV writes gate|up and a separate
silu_mul kernel follows, as before kernels.decode_gemv_glu), ``no-rope`` (q|k|v on cuBLAS and a
separate rotary kernel, as before kernels.decode_gemv_rope), ``old-tiles`` (the GEMV tilings of the
eleventh session: narrow with 3 stages, no q|k|v tiling), ``eleventh`` (all three: the step of the
eleventh session), ``pdl`` (LSA_PDL=1: programmatic dependent launch, kernels/pdl.py), ``min-blocks=N`` (sparse attention shares a row's blocks over at most
cdiv(blocks, N) splits: kernels.sparse_attention.MIN_BLOCKS).
The patch applies in this process only (the engine of ``bench decode`` runs here). What follows
``--`` is ``bench BENCHMARK ARGS`` as ``lsa`` takes it.
"""
import sys


def apply(name: str) -> None:
    import kernels
    import kernels.projection as projection
    import kernels.sparse_attention as sparse_attention
    if name == "base":
        return
    if name == "eleventh":
        for part in ("no-glu", "no-rope", "old-tiles"):
            apply(part)
        return
    if name == "no-rope":
        def unfused(qkv_proj, x, cos, sin, head_dim, rot_cols):
            qkv = qkv_proj(x)
            kernels.rotary(qkv[:, :rot_cols].view(x.shape[0], rot_cols // head_dim, head_dim), cos, sin)
            return qkv
        kernels.decode_gemv_rope = unfused
        return
    if name == "old-tiles":
        projection.GEMV_NARROW, projection.GEMV_MID = (32, 512, 3, 4), None
        return
    if name == "no-glu":
        kernels.decode_gemv_glu = lambda gate_up, x: kernels.silu_mul(
            *kernels.decode_gemv(gate_up, x).chunk(2, dim=-1))
        return
    if name == "pdl":
        import os
        os.environ["LSA_PDL"] = "1"
        return
    if name.startswith("min-blocks="):
        sparse_attention.MIN_BLOCKS = int(name.split("=", 1)[1])
        return
    raise SystemExit(f"unknown variant {name!r} (base, no-glu, no-rope, old-tiles, eleventh, pdl, min-blocks=N)")


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit(__doc__)
    cut = argv.index("--")
    for name in argv[:cut]:
        apply(name)
    rest = argv[cut + 1:]
    if len(rest) < 2 or rest[0] != "bench":
        raise SystemExit("after --: bench BENCHMARK [ARGS...]")
    from benchmarks.commands import main as bench
    return bench(rest[1], rest[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
