"""A tracked allocator for CPU tests: the peak bytes of tensors allocated inside a block.

``with TrackedMemory() as mem: ...`` counts every tensor an operator allocates while the block
runs (factory functions and operator outputs that alias no input), until it is freed; views
and in-place writes allocate nothing. ``mem.peak`` is the largest total alive at once. On a
CPU run this stands for the device memory the same code allocates on a GPU (weights, pools and
mirrors made before the block are not counted)."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class TrackedMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors alive on it]
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        fresh = [r.alias_info is None for r in returns]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for i, t in enumerate(outs):
            if not isinstance(t, torch.Tensor) or not fresh[min(i, len(fresh) - 1)]:
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0:
                continue
            if ptr not in self.live:
                self.live[ptr] = [nbytes, 0]
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            self.live[ptr][1] += 1
            weakref.finalize(t, self._release, ptr)
        return out
