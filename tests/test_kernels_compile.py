"""Triton kernels compile for the GPU (sm_90: Hopper, the H200) on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs a kernel's Python, so it accepts code that the
compiler refuses, e.g. a name whose shape differs between the branches of an ``if`` on a
runtime value: kernels.block_load's int4 path passed every CPU test and then failed to
compile on the H200. ``triton.compile`` with an explicit target needs no GPU."""
import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.block_load import FORMATS, _load_kernel  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def signature(kernel, pointers: dict[str, str], constexprs) -> dict[str, str]:
    return {name: "constexpr" if name in constexprs else pointers.get(name, "i64") for name in kernel.arg_names}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_load_blocks_kernel_compiles_for_hopper(fmt):
    constexprs = {"FMT": FORMATS[fmt], "BLOCK": 16, "HEAD_DIM": 64}
    src_type = {"model": "*bf16", "fp8": "*fp8e4nv", "int4": "*u8"}[fmt]
    sig = signature(_load_kernel, {"SRC": src_type, "META": "*fp32", "DST": "*bf16", "SLOTS": "*i64"}, constexprs)
    try:
        compiled = triton.compile(ASTSource(_load_kernel, sig, constexprs=constexprs), target=HOPPER)
    except RuntimeError as exc:  # no ptxas in this triton build: the front end still ran
        if "ptxas" not in str(exc):
            raise
        return
    assert compiled.asm.get("ttir")
