"""Backend choice: Triton on CUDA tensors, the torch reference elsewhere.

``LSA_KERNELS`` (read through :func:`lsa_env.kernel_backend`, at every call) overrides it:
``torch`` always uses the reference, ``triton`` always uses Triton (on CPU tensors that needs
``TRITON_INTERPRET=1`` set before the first kernel call). The Triton modules are imported on
first use, so importing ``kernels`` compiles nothing and reads no environment.
"""
import importlib

import torch

import lsa_env

from . import reference


def use_triton(t: torch.Tensor) -> bool:
    """True when a kernel called with tensor ``t`` runs its Triton version."""
    backend = lsa_env.kernel_backend()
    if backend == "auto":
        return t.is_cuda
    return backend == "triton"


def triton_impl(module: str, name: str):
    """The Triton function ``name`` of ``kernels.<module>``, imported on first use."""
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def triton_supports(head_dim: int, block: int | None = None) -> bool:
    """Shapes the Triton kernels take: power-of-two head dims >= 16, blocks of 16..128 tokens."""
    pow2 = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    return pow2 and (block is None or (16 <= block <= 128 and block & (block - 1) == 0))


def pick(t: torch.Tensor, module: str, name: str, head_dim: int | None = None, block: int | None = None):
    """The implementation of kernel ``name`` to run on tensor ``t``. Under ``auto``, shapes the
    Triton kernels do not take (tiny head dims or blocks) run the reference, on any device."""
    if use_triton(t):
        if lsa_env.kernel_backend() == "triton" or head_dim is None or triton_supports(head_dim, block):
            return triton_impl(module, f"{name}_triton")
    return getattr(reference, name)
