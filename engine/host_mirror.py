"""The host mirror: every complete block of every sequence in host RAM, and the copies across PCIe.

    host     [N, L, 2, H_kv, B, D]   one row = one complete block of all layers (e4m3 with FP8)
             [N, L, 2, H_kv, B, D/2] uint8 with int4: two 4-bit codes per byte
    summary  [N, L, 3, H_kv, D]      min / max / mean key of each row, model dtype
    scale    [N, L, 2, H_kv]         float32, FP8 only: amax / 448 of each (row, layer, K/V, head)
             [N, L, H_kv, 2D + 2B]   float16, int4 only: key scale | key min (per channel),
                                     value scale | value min (per token)   (kernels.quantize_int4)

    device --store--> host          complete blocks and their summaries (quantized on the device first)
    host --load--> device slots     rows copied as they are kept, dequantized into the pool by one
                                    kernel (kernels.load_blocks)
    host --fetch--> device          rows back in the model dtype, as a tensor

The rows are addressed by host id (engine/block_manager.py allocates them); docs/kv-layout.md is
the layout contract. Where CUDA is present the tensors are page-locked, every copy is
asynchronous, and copies made ahead of use (``ahead``) run on a copy stream beside decode.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

import kernels
from engine.config import ModelConfig
from engine.errors import InvalidRequestError
from engine.host_copy import gather_rows, scatter_rows
from engine.host_memory import FP8, host_empty, quantize_fp8

HOST_DTYPES = (None, "fp8", "int4")


def row_layout(config: ModelConfig, block_size: int, dtype: torch.dtype, host_dtype: str | None):
    """((shape, dtype) of one row's data, (shape, dtype) of its scales or None) in format ``host_dtype``."""
    layers, heads, dim = config.num_layers, config.num_kv_heads, config.head_dim
    kv = (layers, 2, heads, block_size, dim)
    if host_dtype == "fp8":
        return (kv, FP8), ((layers, 2, heads), torch.float32)
    if host_dtype == "int4":
        return ((layers, 2, heads, block_size, dim // 2), torch.uint8), ((layers, heads, 2 * dim + 2 * block_size),
                                                                         torch.float16)
    return (kv, dtype), None


def row_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype, host_dtype: str | None) -> int:
    """Host RAM (and bytes over PCIe) of one mirrored block of all layers: data plus scales."""
    (shape, data_dtype), scale = row_layout(config, block_size, dtype, host_dtype)
    size = math.prod(shape) * _itemsize(data_dtype)
    return size + (math.prod(scale[0]) * _itemsize(scale[1]) if scale is not None else 0)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class HostMirror:
    def __init__(self, config: ModelConfig, block_size: int, num_blocks: int, dtype: torch.dtype,
                 device: torch.device, host_dtype: str | None = None, arena=None):
        """``dtype``: the model's (summaries, and what ``fetch`` returns). ``host_dtype="fp8"``:
        rows are kept as float8 e4m3 with one float32 scale per (row, layer, K/V, KV head);
        ``"int4"``: 4-bit codes, keys per channel and values per token with float16 scales and
        mins (``kernels.quantize_int4``). ``arena`` (a HostArena; its ``host``, ``summary`` and, FP8,
        ``scale`` are used): rows in external memory (e.g. a KV store's shared memory) instead of a
        private allocation, in the format ``host_dtype`` names; ``num_blocks`` is then the arena's."""
        if host_dtype not in HOST_DTYPES:
            raise InvalidRequestError(f"host_dtype must be None (the model dtype), 'fp8' or 'int4', got {host_dtype!r}")
        if arena is not None and host_dtype == "int4":
            raise InvalidRequestError("the int4 host mirror needs a private arena (shared arenas hold the model dtype "
                                      "or fp8)")
        if arena is not None and (arena.scale is not None) != (host_dtype == "fp8"):
            raise InvalidRequestError(f"host_dtype {host_dtype!r} and the arena's format differ: size the KV store's "
                                      f"arena with the same host_dtype")
        self.format = host_dtype or "model"  # kernels.load_blocks' name for it
        self.fp8 = host_dtype == "fp8"
        self.dtype = dtype
        self.device = device
        layers, heads, dim = config.num_layers, config.num_kv_heads, config.head_dim
        pin = device.type == "cuda"
        (data_shape, data_dtype), scale = row_layout(config, block_size, dtype, host_dtype)
        if arena is not None:
            self.host, self.summary, self.scale = arena.host, arena.summary, arena.scale
        else:
            self.host = host_empty((num_blocks, *data_shape), data_dtype, pin)
            self.summary = host_empty((num_blocks, layers, 3, heads, dim), dtype, pin)
            self.scale = host_empty((num_blocks, *scale[0]), scale[1], pin) if scale is not None else None
        # host RAM (and bytes over PCIe) per row of all layers: data, plus scales
        self.bytes_per_block = row_bytes(config, block_size, dtype, host_dtype)
        self.bytes_per_layer_block = self.bytes_per_block // layers
        self.pinned = device.type == "cuda" and self.host.is_pinned()
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._copies_pending = False
        self._owner_copies: dict[object, torch.cuda.Event] = {}  # owner -> its last copies issued ahead
        self._d2h: torch.cuda.Event | None = None  # the last asynchronous write into the mirror

    @property
    def num_blocks(self) -> int:
        return self.host.shape[0]

    def remap(self, arena) -> None:
        """Rows in another external arena of the same shape (a HostArena)."""
        if arena.host.shape != self.host.shape or arena.host.dtype != self.host.dtype:
            raise ValueError(f"the new arena is {tuple(arena.host.shape)} {arena.host.dtype}; the mirror's is "
                             f"{tuple(self.host.shape)} {self.host.dtype}")
        if (arena.scale is None) != (self.scale is None):
            raise ValueError("the new arena's FP8 scales do not match the mirror's (one is FP8, the other not)")
        self.join()
        self.host, self.summary, self.scale = arena.host, arena.summary, arena.scale

    # ------------------------------------------------------------ device -> host

    def store(self, hosts: list[int], layers: slice, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [n, Lsel, 2, H, B, D] of complete blocks (device) -> rows ``hosts`` of layers
        ``layers``, with their key summaries; returns the summaries [n, Lsel, 3, H, D] (model
        dtype) on the device.

        Into page-locked memory the rows are asynchronous copies on the compute stream (one per
        run of consecutive rows, engine/host_copy.py): the host does not wait (the step's sampled
        tokens, which it does wait for, come after), and later loads of the row are ordered after
        it (copies ahead wait for the compute stream)."""
        keys = blocks[:, :, 0].float()  # [n, Lsel, H, B, D]
        summary = torch.stack([keys.amin(3), keys.amax(3), keys.mean(3)], 2).to(self.dtype)  # [n, Lsel, 3, H, D]
        scale = None
        if self.fp8:  # quantized where the blocks are, so only e4m3 bytes cross to the host
            blocks, scale = quantize_fp8(blocks)
        elif self.format == "int4":  # codes and float16 scales cross, a bit over half the e4m3 bytes
            blocks, scale = kernels.quantize_int4(blocks)
        if self.pinned:
            scatter_rows(self.host[:, layers], hosts, blocks.contiguous())
            scatter_rows(self.summary[:, layers], hosts, summary.contiguous())
            if scale is not None:
                scatter_rows(self.scale[:, layers], hosts, scale.contiguous())
            self._d2h = torch.cuda.Event()
            self._d2h.record()
            return summary
        rows = torch.tensor(hosts)
        self.host[rows, layers] = blocks.to("cpu")
        if scale is not None:
            self.scale[rows, layers] = scale.to("cpu")
        self.summary[rows, layers] = summary.to("cpu")
        return summary

    def wait_writes(self) -> None:
        """Wait until every asynchronous write into the mirror has landed (before the host itself
        reads rows; copies on the GPU streams are ordered without this)."""
        if self._d2h is not None:
            self._d2h.synchronize()
            self._d2h = None

    # ------------------------------------------------------------ host -> device

    def fetch(self, hosts: torch.Tensor, layers) -> torch.Tensor:
        """Rows on the device in the model dtype: [n, ...] of ``host[hosts, layers]``."""
        data, scale = self._rows(hosts.tolist(), layers)
        return kernels.reference.dequantize_blocks(data, scale, self.format, self.dtype)

    def fetch_rows(self, hosts: list[int]) -> torch.Tensor:
        """Whole rows on the device in the model dtype, [n, L, 2, H, B, D]."""
        return self.fetch(torch.tensor(hosts, dtype=torch.long), slice(None))

    def load(self, hosts: list[int], layers: slice, dst: torch.Tensor, slots: torch.Tensor) -> None:
        """Copy rows ``hosts`` (layers ``layers``) into the slots ``slots`` (device) of ``dst``, the
        pool's layers ``layers`` [L', 2, S, H, B, D]: the rows cross as they are kept (e4m3 or
        4-bit with their scales) and one kernel dequantizes them into the slots."""
        data, scale = self._rows(hosts, layers)
        kernels.load_blocks(data, scale, dst, slots, self.format)

    def _rows(self, hosts: list[int], layers) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(data, scale) of ``host[hosts, layers]`` on the device, as kept. Whole rows from
        page-locked memory: one DMA copy per run of consecutive rows, issued without the host
        touching the data (a gather on the host would copy it twice, synchronously)."""
        if not (self.pinned and layers == slice(None)):
            self.wait_writes()  # the gather below runs on the host (DMA copies are ordered on the streams)
            rows = torch.tensor(hosts, dtype=torch.long)
            data = self.host[rows, layers].to(self.device, non_blocking=True)
            scale = self.scale[rows, layers].to(self.device, non_blocking=True) if self.scale is not None else None
            return data, scale
        n = len(hosts)
        data = torch.empty((n, *self.host.shape[1:]), dtype=self.host.dtype, device=self.device)
        scale = (torch.empty((n, *self.scale.shape[1:]), dtype=self.scale.dtype, device=self.device)
                 if self.scale is not None else None)
        gather_rows(data, self.host, hosts)
        if scale is not None:
            gather_rows(scale, self.scale, hosts)
        return data, scale

    def fetch_layer(self, hosts: list[int], layer: int) -> torch.Tensor:
        """One layer of rows on the device in the model dtype, [n, 2, H, B, D]. From page-locked
        memory a run of consecutive rows' layer (K and V of each block, contiguous, a row apart)
        is one strided DMA copy (engine/host_copy.py); the host neither gathers nor waits."""
        data = self._gather(self.host[:, layer], hosts)
        # the scales by DMA too, ordered after the stream's writes (a gather on the host had to wait for them)
        scale = self._gather(self.scale[:, layer], hosts) if self.scale is not None else None
        return kernels.reference.dequantize_blocks(data, scale, self.format, self.dtype)

    def fetch_keys(self, hosts: list[int], layer: int) -> torch.Tensor:
        """One layer's keys of rows ``hosts`` on the device in the model dtype, [n, H, B, D]: half
        of ``fetch_layer``'s bytes (exact-attention scoring reads keys only). The int4 format keeps a
        row's key and value scales together: there the whole layer comes and its keys are kept."""
        if self.format == "int4":
            return self.fetch_layer(hosts, layer)[:, 0]
        data = self._gather(self.host[:, layer, 0], hosts)
        scale = self._gather(self.scale[:, layer, 0], hosts) if self.scale is not None else None
        return kernels.reference.dequantize_blocks(data, scale, self.format, self.dtype)

    def fetch_summary(self, hosts: list[int], layer: int) -> torch.Tensor:
        """One layer's key summaries of rows ``hosts`` on the device, [n, 3, H, D], by DMA where
        page-locked (gathering a 128K-token prefix's summaries on the host took 70 ms, and 360-640
        ms in a served worker whose mapping of the arena was not yet faulted in)."""
        return self._gather(self.summary[:, layer], hosts)

    def _gather(self, table: torch.Tensor, hosts: list[int]) -> torch.Tensor:
        """``table[hosts]`` on the device, ``table`` a view of the host rows (e.g. one layer of
        each): from page-locked memory one strided DMA copy per run of rows, ordered after the
        stream's writes, the host neither gathering nor waiting; else gathered on the host."""
        if not self.pinned:
            self.wait_writes()
            return table[torch.tensor(hosts, dtype=torch.long)].to(self.device, non_blocking=True)
        out = torch.empty((len(hosts), *table.shape[1:]), dtype=table.dtype, device=self.device)
        gather_rows(out, table, hosts)
        return out

    def to_device(self, index: torch.Tensor) -> torch.Tensor:
        """A small host tensor (e.g. destination slots, block ids) on the device, asynchronously:
        through page-locked memory on CUDA (a copy from pageable memory waits for the stream, so
        the host would wait for the step just launched)."""
        if self.device.type != "cuda":
            return index.to(self.device)
        return index.pin_memory().to(self.device, non_blocking=True)

    @contextmanager
    def ahead(self, owner=None) -> Iterator[None]:
        """Copies issued inside run on the copy stream (CUDA; elsewhere in place), after the work
        already queued on the compute stream (it may still read slots they overwrite); ``join``
        orders later compute after them, ``join(owner)`` after ``owner``'s alone."""
        if self.copy_stream is None:
            yield
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            yield
        self._copies_pending = True
        if owner is not None:
            done = torch.cuda.Event()
            done.record(self.copy_stream)
            self._owner_copies[owner] = done

    def join(self, owner=None) -> None:
        """Order the compute stream after every copy issued ahead so far (no host wait); with
        ``owner``, after that owner's copies only (a sequence's staged slots): copies issued since
        for other sequences, which start only once the step launched before them ends, do not
        hold its boundary (at 128K x 24 that wait was ~0.9 ms a boundary, docs/perf.md)."""
        if owner is not None:
            done = self._owner_copies.get(owner)
            if done is not None:
                torch.cuda.current_stream(self.device).wait_event(done)
            return
        if self._copies_pending:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self._copies_pending = False
            self._owner_copies.clear()

    def forget(self, owner) -> None:
        """Drop ``owner``'s copy event (the sequence left, after ``join(owner)``)."""
        self._owner_copies.pop(owner, None)
