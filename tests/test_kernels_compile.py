"""Triton kernels compile for the GPU (sm_90: Hopper, the H200) on a machine without one: the
block load in each host format, the decode projection in each fused variant.

The interpreter (TRITON_INTERPRET=1) runs a kernel's Python, so it accepts code that the
compiler refuses, e.g. a name whose shape differs between the branches of an ``if`` on a
runtime value: kernels.block_load's int4 path passed every CPU test and then failed to
compile on the H200. ``triton.compile`` with an explicit target needs no GPU. It runs in a
subprocess without TRITON_INTERPRET: in this process the kernel tests have turned the
interpreter on, and a kernel defined under it cannot be compiled."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]

COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.block_load import FORMATS, _load_kernel

out = {}
for fmt in sorted(FORMATS):
    constexprs = {"FMT": FORMATS[fmt], "BLOCK": 16, "HEAD_DIM": 64}
    pointers = {"SRC": {"model": "*bf16", "fp8": "*fp8e4nv", "int4": "*u8"}[fmt], "META": "*fp32",
                "DST": "*bf16", "SLOTS": "*i64"}
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "i64") for n in _load_kernel.arg_names}
    try:
        compiled = triton.compile(ASTSource(_load_kernel, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
        out[fmt] = "ttir" if compiled.asm.get("ttir") else "no ttir"
    except RuntimeError as exc:  # no ptxas in this triton build: the front end (to TTIR/TTGIR) still ran
        out[fmt] = "front end" if "ptxas" in str(exc) else f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        out[fmt] = f"{type(exc).__name__}: {exc}"
from kernels.projection import _decode_linear_kernel

for variant, flags in {"plain": (0, 0, 0, 0, 0, 0), "norm": (1, 0, 0, 0, 0, 0), "silu_add": (0, 1, 1, 0, 0, 0),
                      "norm_add": (1, 0, 1, 0, 0, 0), "glu": (0, 0, 0, 1, 0, 0), "rope": (0, 0, 0, 0, 64, 0),
                      "rope_pdl": (0, 0, 0, 0, 64, 1)}.items():
    norm, silu, add, glu, rope_half, pdl = flags
    constexprs = {"M_PAD": 16, "BLOCK_N": 64, "BLOCK_K": 256, "NUM_STAGES": 5, "NORM": bool(norm),
                  "SILU": bool(silu), "ADD": bool(add), "GLU": bool(glu), "ROPE_HALF": rope_half,
                  "PAIRS": bool(glu or rope_half), "IEEE_DOT": False, "PDL": bool(pdl)}
    pointers = {"X": "*bf16", "W": "*bf16", "Y": "*bf16", "NORM_W": "*bf16", "COS": "*bf16", "SIN": "*bf16",
                "eps": "fp32"}
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in _decode_linear_kernel.arg_names}
    try:
        compiled = triton.compile(ASTSource(_decode_linear_kernel, sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        out["decode_linear_" + variant] = "ttir" if compiled.asm.get("ttir") else "no ttir"
    except RuntimeError as exc:
        out["decode_linear_" + variant] = "front end" if "ptxas" in str(exc) else f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        out["decode_linear_" + variant] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt", ["model", "fp8", "int4"])
def test_load_blocks_kernel_compiles_for_hopper(compiled, fmt):
    assert compiled[fmt] in ("ttir", "front end"), compiled[fmt]


@pytest.mark.parametrize("variant", ["plain", "norm", "silu_add", "norm_add", "glu", "rope", "rope_pdl"])
def test_decode_linear_kernel_compiles_for_hopper(compiled, variant):
    assert compiled["decode_linear_" + variant] in ("ttir", "front end"), compiled["decode_linear_" + variant]
