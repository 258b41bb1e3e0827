"""What the kernel tests share. Import it before ``kernels``: on a machine without CUDA it turns
on Triton's interpreter (TRITON_INTERPRET=1), which must be set before any Triton kernel is
defined. The interpreter computes bf16 arithmetic wrongly without an error, so on CPU the
kernels are checked in fp32 / fp16 and on CUDA in bf16 / fp16."""
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE_DTYPES = ([("cuda", torch.bfloat16), ("cuda", torch.float16)] if CUDA
                 else [("cpu", torch.float32), ("cpu", torch.float16)])
# ||out - ref|| / ||ref|| for one rounding of the output dtype over a short reduction
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, with ``ref`` in float64 on the CPU."""
    return ((x.double().cpu() - ref).norm() / ref.norm()).item()
