"""The host block arena: the full KV cache in host memory, one block (all layers of B tokens)
per host id.

    flat bytes    [ N blocks of K/V            ][ N key summaries        ][ N scales (FP8 only) ]
    views         host [N, L, 2, H, B, D]         summary [N, L, 3, H, D]   scale [N, L, 2, H]   (no copy)
                  model dtype, or float8 e4m3     model dtype               float32

``ArenaLayout`` gives the shapes (plain fields: it travels between actors as it is);
``HostArena`` holds the views, over private memory or a KV store's shared-memory file, and
the ``IdPool`` of host ids its engine may use; ``read`` / ``write`` move whole blocks.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from engine.block_manager import BlockAllocator
from engine.config import DTYPES
from engine.errors import InvalidRequestError
from engine.host_memory import FP8, on_tmpfs, register_host

log = logging.getLogger(__name__)


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
    name of ``engine.config.DTYPES`` ("float32", "bfloat16", ...): the model's, which the key
    summaries keep. ``host_dtype="fp8"``: the blocks' K/V are float8 e4m3, with one float32
    scale per (block, layer, K/V, KV head) (engine/host_memory.py); None: the model dtype."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    host_dtype: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def data_dtype(self) -> torch.dtype:
        return FP8 if self.host_dtype == "fp8" else self.torch_dtype

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
    def scale_elems(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads if self.host_dtype == "fp8" else 0

    def _region_bytes(self) -> tuple[int, int, int]:
        """Bytes per block of its K/V, its key summary and its scales."""
        data = self.block_elems * torch.empty((), dtype=self.data_dtype).element_size()
        return data, self.summary_elems * self.itemsize, self.scale_elems * 4

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes in the arena: its K/V, its key summary (and its FP8 scales)."""
        return sum(self._region_bytes())

    def num_blocks(self, capacity_bytes: int) -> int:
        return max(0, capacity_bytes // self.block_bytes)

    def views(self, flat: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(host [N, L, 2, H, B, D], summary [N, L, 3, H, D], scale [N, L, 2, H] or None) over one
        flat byte buffer: N blocks' K/V, then N summaries, then N scales."""
        l, h, b, d = self.num_layers, self.num_kv_heads, self.block_size, self.head_dim
        data_bytes, summary_bytes, scale_bytes = (num_blocks * r for r in self._region_bytes())
        data = flat[:data_bytes].view(self.data_dtype).view(num_blocks, l, 2, h, b, d)
        summary = flat[data_bytes: data_bytes + summary_bytes].view(self.torch_dtype).view(num_blocks, l, 3, h, d)
        if not scale_bytes:
            return data, summary, None
        scale = flat[data_bytes + summary_bytes: data_bytes + summary_bytes + scale_bytes].view(torch.float32)
        return data, summary, scale.view(num_blocks, l, 2, h)

    @classmethod
    def of(cls, model_config, block_size: int, dtype: torch.dtype, host_dtype: str | None = None) -> ArenaLayout:
        if host_dtype not in (None, "fp8"):
            raise InvalidRequestError(f"a shared arena holds the model dtype or fp8, not {host_dtype!r} (an int4 "
                                      f"mirror is the engine's own)")
        name = next(n for n, t in DTYPES.items() if t == dtype)
        return cls(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim, block_size, name,
                   host_dtype)


@dataclass
class HostArena:
    host: torch.Tensor  # [N, L, 2, H, B, D]
    summary: torch.Tensor  # [N, L, 3, H, D]
    allocator: IdPool
    scale: torch.Tensor | None = None  # [N, L, 2, H] float32: an FP8 arena's scales

    @property
    def num_blocks(self) -> int:
        return self.host.shape[0]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: its K/V, its key summary and its scales."""
        return sum(t[0].nbytes for t in (self.host, self.summary, self.scale) if t is not None)

    @classmethod
    def private(cls, layout: ArenaLayout, num_blocks: int, pin: bool = False) -> HostArena:
        """An arena in this process's memory (``pin``: page-locked, CUDA only)."""
        flat = torch.empty(num_blocks * layout.block_bytes, dtype=torch.uint8, pin_memory=pin)
        host, summary, scale = layout.views(flat, num_blocks)
        return cls(host, summary, IdPool(), scale)

    @classmethod
    def from_file(cls, path: str, layout: ArenaLayout, num_blocks: int, pin: bool = False) -> HostArena:
        """Map a KV store's arena file without copying (``shared=True``: writes go to the file)."""
        nbytes = num_blocks * layout.block_bytes
        flat = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        if pin and torch.cuda.is_available():  # page-locked for DMA, still the same memory
            if not (on_tmpfs(path) and register_host(flat.data_ptr(), nbytes)):
                log.warning("the KV arena %s could not be page-locked (not on tmpfs, or too large to lock): "
                            "copies from it to the GPU are pageable and synchronous", path)
        host, summary, scale = layout.views(flat, num_blocks)
        return cls(host, summary, IdPool(), scale)

    def read(self, ids: list[int]) -> tuple[torch.Tensor, ...]:
        """Copies of blocks ``ids``: (K/V, summaries) and, FP8, their scales; FP8 K/V as its bytes
        (uint8: Ray's serializer takes no float8 tensor)."""
        idx = torch.tensor(ids, dtype=torch.long)
        if self.scale is None:
            return self.host[idx], self.summary[idx]
        return self.host.view(torch.uint8)[idx], self.summary[idx], self.scale[idx]

    def read_bytes(self, ids: list[int]) -> tuple[np.ndarray, ...]:
        """``read`` as uint8 numpy arrays (the last dimension in bytes): Ray passes numpy
        buffers through its object store without pickling them (torch tensors it pickles whole)."""
        return tuple(t.view(torch.uint8).numpy() for t in self.read(ids))

    def read_runs(self, ids: list[int]) -> list[tuple[np.ndarray, ...]]:
        """Blocks ``ids`` without a copy: per run of consecutive ids, uint8 numpy views of its
        K/V, summaries and (FP8) scales, in the order of ``ids``. What stores send each other:
        Ray copies the views once, into its object store, where a gather would copy twice and
        fault fresh pages in between."""
        regions = self._byte_regions()
        return [tuple(r[ids[i]:ids[i] + n].numpy() for r in regions) for i, n in _runs(ids)]

    def write(self, ids: list[int], rows: tuple | list[tuple]) -> None:
        """Blocks ``ids`` := ``rows``: what ``read``, ``read_bytes`` (a tuple of arrays) or
        ``read_runs`` (a list of such tuples, one after the other) returns, here or from
        another arena. One slice copy per run of consecutive ids on both sides."""
        pieces = rows if isinstance(rows, list) else [rows]
        regions = self._byte_regions()
        if any(len(piece) != len(regions) for piece in pieces):
            raise ValueError("blocks of an FP8 arena carry their scales, others do not: the arenas differ")
        with warnings.catch_warnings():  # a numpy buffer from Ray's object store is read-only; it is only read
            warnings.simplefilter("ignore", UserWarning)
            pieces = [[torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in piece] for piece in pieces]
        pos = 0
        for piece in pieces:
            n = piece[0].shape[0]
            for i, r in _runs(ids[pos:pos + n]):
                first = ids[pos + i]
                for region, src in zip(regions, piece):
                    region[first:first + r].copy_(src[i:i + r].reshape(r, -1).view(torch.uint8))
            pos += n
        if pos != len(ids):
            raise ValueError(f"{pos} blocks of rows for {len(ids)} ids")

    def _byte_regions(self) -> list[torch.Tensor]:
        """The arena's regions as uint8 [N, bytes of a block's part]."""
        return [t.view(t.shape[0], -1).view(torch.uint8) for t in (self.host, self.summary, self.scale)
                if t is not None]

    def copy(self, src: list[int], dst: list[int]) -> None:
        """Blocks ``dst`` := blocks ``src`` of this arena, one slice copy per run of consecutive
        ids on both sides (a fresh lease is mostly one run)."""
        i = 0
        while i < len(src):
            r = 1
            while i + r < len(src) and src[i + r] == src[i] + r and dst[i + r] == dst[i] + r:
                r += 1
            a, b = slice(src[i], src[i] + r), slice(dst[i], dst[i] + r)
            self.host[b] = self.host[a]
            self.summary[b] = self.summary[a]
            if self.scale is not None:
                self.scale[b] = self.scale[a]
            i += r


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """(position, length) of each run of consecutive values in ``ids``."""
    out, i = [], 0
    while i < len(ids):
        r = 1
        while i + r < len(ids) and ids[i + r] == ids[i] + r:
            r += 1
        out.append((i, r))
        i += r
    return out
