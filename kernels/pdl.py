"""Programmatic dependent launch (PDL; Hopper and later), for the decode step's Triton kernels.

A kernel launched with PDL may be scheduled while the previous kernel on its stream is still
finishing (its last programs exit, its stores drain), instead of after; each of its programs
first waits (``tl.extra.cuda.gdc_wait()``, the kernel's ``PDL`` constexpr) until that kernel has
completed and flushed its memory, so every read and write keeps the stream's order. What it saves
is the gap between two kernels of a CUDA graph (a microsecond or two, ~10 kernels a layer at
batch 1; on the H200 the 128K batch-1 step 4.84 ms against 4.90, docs/perf.md twelfth session).
On by default (``LSA_PDL``, lsa_env.pdl) on CUDA devices of capability 9 or more; never in Triton's
interpreter.
"""
import functools

import torch

import lsa_env


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL."""
    return t.is_cuda and lsa_env.pdl() and _capable(t.device.index if t.device.index is not None else
                                                      torch.cuda.current_device())
