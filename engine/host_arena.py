"""The host block arena: the full KV cache in host memory, one block (all layers of B tokens)
per host id.

    flat buffer   [ N blocks of K/V               ][ N key summaries      ]
    views         host [N, L, 2, H, B, D]            summary [N, L, 3, H, D]     (no copy)

``ArenaLayout`` gives the shapes (plain fields: it travels between actors as it is);
``HostArena`` holds the two views, over private memory or a KV store's shared-memory file,
and the ``IdPool`` of host ids its engine may use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.block_manager import BlockAllocator
from engine.config import DTYPES


class IdPool(BlockAllocator):
    """A ``BlockAllocator`` over an arbitrary, growable set of host ids."""

    def __init__(self, ids=()):
        super().__init__(what="host", ids=ids)

    def add(self, ids) -> None:
        """Ids leased into the pool."""
        ids = list(ids)
        self._free.extend(ids)
        self.num_blocks += len(ids)

    def take(self, n: int) -> list[int]:
        """Free ids leaving the pool (given back, or handed to a session)."""
        out = self.allocate(n)
        self.num_blocks -= n
        return out

    def forget(self, n: int) -> None:
        """``n`` allocated ids now belong to someone else (a session)."""
        self.num_blocks -= n


@dataclass(frozen=True)
class ArenaLayout:
    """Shapes of a host block arena; one block holds all layers of B tokens. ``dtype`` is a
    name of ``engine.config.DTYPES`` ("float32", "bfloat16", ...)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def block_elems(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim

    @property
    def summary_elems(self) -> int:
        return self.num_layers * 3 * self.num_kv_heads * self.head_dim

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes in the arena: its K/V and its key summary."""
        return (self.block_elems + self.summary_elems) * self.itemsize

    def num_blocks(self, capacity_bytes: int) -> int:
        return max(0, capacity_bytes // self.block_bytes)

    def views(self, flat: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(host [N, L, 2, H, B, D], summary [N, L, 3, H, D]) over one flat buffer."""
        l, h, b, d = self.num_layers, self.num_kv_heads, self.block_size, self.head_dim
        data = flat[: num_blocks * self.block_elems].view(num_blocks, l, 2, h, b, d)
        summary = flat[num_blocks * self.block_elems: num_blocks * (self.block_elems + self.summary_elems)]
        return data, summary.view(num_blocks, l, 3, h, d)

    @classmethod
    def of(cls, model_config, block_size: int, dtype: torch.dtype) -> ArenaLayout:
        name = next(n for n, t in DTYPES.items() if t == dtype)
        return cls(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim, block_size, name)


@dataclass
class HostArena:
    host: torch.Tensor  # [N, L, 2, H, B, D]
    summary: torch.Tensor  # [N, L, 3, H, D]
    allocator: IdPool

    @classmethod
    def private(cls, layout: ArenaLayout, num_blocks: int) -> HostArena:
        flat = torch.empty(num_blocks * (layout.block_elems + layout.summary_elems), dtype=layout.torch_dtype)
        host, summary = layout.views(flat, num_blocks)
        return cls(host, summary, IdPool())

    @classmethod
    def from_file(cls, path: str, layout: ArenaLayout, num_blocks: int, pin: bool = False) -> HostArena:
        """Map a KV store's arena file without copying (``shared=True``: writes go to the file)."""
        numel = num_blocks * (layout.block_elems + layout.summary_elems)
        flat = torch.from_file(path, shared=True, size=numel, dtype=layout.torch_dtype)
        if pin and torch.cuda.is_available():  # page-locked for DMA, still the same memory
            torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), numel * flat.element_size(), 0)
        host, summary = layout.views(flat, num_blocks)
        return cls(host, summary, IdPool())
