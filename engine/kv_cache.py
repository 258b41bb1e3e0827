"""Block KV cache: the device pool (reserve), residency, summaries on the device, accounting.

Layouts are the contract in docs/kv-layout.md:

    pool          : [L, 2, S, H_kv, B, D]   device; kernels see pool[l, 0] / pool[l, 1]
    index_keys    : [L_idx, 3, N_host, H_kv, D]  device copies for the Level-1 layers only
    slot_summary  : [L, 3, S, H_kv, D]  device, per resident slot (Level-2, Quest)
    mirror        : the host mirror (engine/host_mirror.py): every complete block in host RAM

The block manager (engine/block_manager.py) does the bookkeeping; this class moves the data:
complete blocks to the mirror on commit, mirrored blocks back into slots on load / stage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from engine.block_manager import BlockManager
from engine.config import ModelConfig
from engine.host_mirror import HostMirror

__all__ = ["BlockKVCache", "KVAccounting"]


@dataclass(frozen=True)
class KVAccounting:
    """Bytes of KV in the model dtype. ``full`` is what full attention over every token needs;
    ``device`` is the physical device KV: resident slots (sinks, tail, selected), slots staged
    for the next plan, and index keys."""

    device_bytes: int
    device_capacity_bytes: int  # the whole device pool
    host_bytes: int  # host-mirror blocks in use
    full_bytes: int  # tokens x bytes per token, all layers, K and V
    num_tokens: int
    index_bytes: int = 0  # summaries kept on the device (included in device_bytes)
    staged_bytes: int = 0  # blocks copied ahead of the next plan, not attended yet (included in device_bytes)

    @property
    def device_fraction(self) -> float:
        return self.device_bytes / self.full_bytes if self.full_bytes else 0.0

    def as_dict(self) -> dict:
        return {"device_kv_bytes": self.device_bytes, "device_kv_capacity_bytes": self.device_capacity_bytes,
                "host_kv_bytes": self.host_bytes, "full_kv_bytes": self.full_bytes,
                "index_kv_bytes": self.index_bytes, "staged_kv_bytes": self.staged_bytes, "num_tokens": self.num_tokens,
                "device_kv_fraction": round(self.device_fraction, 6)}


class BlockKVCache:
    def __init__(self, config: ModelConfig, block_size: int, num_device_blocks: int, num_host_blocks: int,
                 dtype: torch.dtype, device: torch.device | str, groups: list[list[int]] | None = None,
                 index_layers: tuple[int, ...] = (), slot_summaries: bool = False, arena=None,
                 host_dtype: str | None = None, index_keys: bool = True):
        """``arena`` (a HostArena: ``host``, ``summary``, ``allocator``): an external host mirror
        (e.g. a KV store's shared memory) with its own host-id allocator, instead of a private one.
        ``host_dtype="fp8"``: complete blocks are kept in host RAM as float8 e4m3 with one float32
        scale per (block, layer, K/V, KV head); ``"int4"``: as 4-bit codes with float16 scales
        (keys per channel, values per token); either is dequantized on the device after each
        copy (``kernels.load_blocks``). Summaries stay in the model dtype. ``index_keys=False``:
        the index layers' queries are observed but no device index keys are kept (a Level-1 score
        that reads the host mirror: they would take device memory for every host block)."""
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        layers, heads, dim = config.num_layers, config.num_kv_heads, config.head_dim
        self.groups = groups or [list(range(layers))]
        self.group_of = {layer: g for g, members in enumerate(self.groups) for layer in members}
        self.mirror = HostMirror(config, block_size, num_host_blocks, dtype, self.device, host_dtype, arena)
        num_host_blocks = self.mirror.num_blocks
        self.blocks = BlockManager(block_size, num_device_blocks, num_host_blocks, len(self.groups),
                                   host_allocator=arena.allocator if arena is not None else None)
        # one slot past the allocators' range: padding rows of a CUDA-graph batch write there. On the
        # CPU zeroed, so that the pool's pages are resident from the start: empty pages would be
        # touched slot by slot as the FIFO free list walks them, a process growing for many minutes
        # (the 30-minute soak: +3.8 GiB over 22 minutes, then flat) rather than showing its size.
        alloc = torch.zeros if self.device.type == "cpu" else torch.empty
        self.pool = alloc(layers, 2, num_device_blocks + 1, heads, block_size, dim, dtype=dtype, device=self.device)
        self.trash_slot = num_device_blocks
        self.pool[:, :, self.trash_slot].zero_()
        self.index_layers = tuple(index_layers)
        self.keeps_index_keys = index_keys and bool(self.index_layers)
        self.index_keys = torch.empty(len(index_layers) if index_keys else 0, 3, num_host_blocks, heads, dim,
                                      dtype=dtype, device=self.device)
        self.slot_summary = (torch.empty(layers, 3, num_device_blocks, heads, dim, dtype=dtype, device=self.device)
                             if slot_summaries else None)
        self.bytes_per_token = config.kv_bytes_per_token(dtype)
        self.bytes_per_block = self.bytes_per_token * block_size  # all layers
        self.bytes_per_layer_block = self.bytes_per_block // layers
        self.summary_bytes_per_layer_block = 3 * heads * dim * self.pool.element_size()
        self.blocks_copied = 0
        self.bytes_copied = 0
        self.blocks_prefetched = 0  # of blocks_copied: copied ahead on the copy stream (stage)
        self.blocks_loaded_late = 0  # of blocks_copied: copied when needed (load of a block not staged)

    # ------------------------------------------------------------ sequences

    def admit(self, seq_id: int, num_blocks: int) -> None:
        self.blocks.admit(seq_id, num_blocks)

    def release(self, seq_id: int) -> None:
        self.mirror.join(seq_id)  # staged copies into its slots finish before the slots are reused
        self.mirror.forget(seq_id)
        self.blocks.release(seq_id)

    def attach_prefix(self, seq_id: int, host_ids: list[int], load: bool = True) -> None:
        """Give an admitted sequence a prefix of mirrored blocks, refreshing their device index
        keys from the host summaries; ``load``: also copy all of them onto the device (every
        group), else they stay in the host mirror (the layer-by-layer prefill streams them)."""
        if not host_ids:
            return
        self.blocks.attach_prefix(seq_id, host_ids)
        self.index_keys_from_mirror(host_ids)
        if not load:
            return
        for g in range(len(self.groups)):
            self.load(seq_id, g, list(range(len(host_ids))))

    def remap_host(self, arena) -> None:
        """Point the host mirror at another arena of the same shape (a HostArena: the node's KV
        store was replaced); no sequence may be in the cache."""
        if self.blocks.seqs:
            raise RuntimeError("the host arena can change only while no sequence is in the cache")
        self.mirror.remap(arena)
        self.blocks.host = arena.allocator

    def num_tokens(self, seq_id: int) -> int:
        return self.blocks.seqs[seq_id].num_tokens

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each [S, H_kv, B, D]."""
        return self.pool[layer, 0], self.pool[layer, 1]

    def append_slots(self, seq_ids: list[int], counts: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per group: device slots and offsets of the next tokens of each sequence, flattened."""
        per_group = [([], []) for _ in self.groups]
        for seq_id, n in zip(seq_ids, counts):
            for g, (s, o) in enumerate(self.blocks.append_slots(seq_id, n)):
                per_group[g][0].extend(s)
                per_group[g][1].extend(o)
        return [(torch.tensor(s, dtype=torch.int32, device=self.device),
                 torch.tensor(o, dtype=torch.int32, device=self.device)) for s, o in per_group]

    def commit(self, seq_ids: list[int], counts: list[int]) -> None:
        """Advance lengths after a forward step; mirror newly completed blocks to the host with
        their key summaries (and refresh device index keys)."""
        done = []  # (device slot in group 0 ... per group, host id)
        for seq_id, n in zip(seq_ids, counts):
            seq = self.blocks.seqs[seq_id]
            done += [([r[j] for r in seq.resident], h) for j, h in self.blocks.commit(seq_id, n)]
        if not done:
            return
        hosts = [h for _, h in done]
        summaries = {}  # layer -> [n, 3, H, D] on the device
        for g, members in enumerate(self.groups):
            # through page-locked memory: a copy from pageable memory waits for the stream, i.e. for the
            # step just launched (with overlapped decode, the GPU then idled once a block: the batch-1 p99)
            slots = self.mirror.to_device(torch.tensor([s[g] for s, _ in done]))
            if len(members) == self.pool.shape[0]:
                summary = self.mirror.store(hosts, slice(None), self.pool[:, :, slots].permute(2, 0, 1, 3, 4, 5))
                summaries.update((layer, summary[:, layer]) for layer in members)
            else:
                for layer in members:
                    summaries[layer] = self.mirror.store(hosts, slice(layer, layer + 1),
                                                         self.pool[layer, :, slots].transpose(0, 1)[:, None])[:, 0]
            if self.slot_summary is not None:
                for layer in members:
                    self.slot_summary[layer, :, slots] = summaries[layer].transpose(0, 1)
        self._refresh_index_keys(hosts, summaries)

    def mirror_layer(self, host_ids: list[int], layer: int, blocks: torch.Tensor) -> None:
        """Write one layer of complete blocks straight to the host mirror (layer-by-layer
        prefill): blocks [n, 2, H, B, D] on the device; refreshes the layer's device index keys."""
        summary = self.mirror.store(host_ids, slice(layer, layer + 1), blocks[:, None])
        self._refresh_index_keys(host_ids, {layer: summary[:, 0]})

    def index_keys_from_mirror(self, host_ids: list[int]) -> None:
        """Device index keys of rows already in the host mirror (a session's prefix, rows written
        there directly), copied from their summaries (by DMA where the mirror is page-locked)."""
        if self.keeps_index_keys:
            self._refresh_index_keys(host_ids, {layer: self.mirror.fetch_summary(host_ids, layer)
                                                for layer in self.index_layers})

    def _refresh_index_keys(self, hosts: list[int], summaries: dict[int, torch.Tensor]) -> None:
        """Device index keys of new host rows, from their summaries computed on the device."""
        if not self.keeps_index_keys:
            return
        wanted = [(li, layer) for li, layer in enumerate(self.index_layers) if layer in summaries]
        if not wanted:  # a layer-by-layer prefill's other layers: no copy of the ids (it waits for the stream)
            return
        rows = self.mirror.to_device(torch.tensor(hosts))
        for li, layer in wanted:
            self.index_keys[li][:, rows] = summaries[layer].transpose(0, 1)

    # ------------------------------------------------------------ residency changes

    def evict(self, seq_id: int, group: int, blocks: list[int]) -> None:
        """Drop blocks from the device; no copy, the host mirror has them."""
        if blocks:
            self.blocks.evict(seq_id, group, blocks)

    def load(self, seq_id: int, group: int, blocks: list[int]) -> None:
        """Make mirrored blocks resident: blocks staged ahead (``stage``) without a copy, once their
        copies have arrived (the compute stream waits for them, the host does not); the others are
        copied now (and their summaries, if kept per slot)."""
        if not blocks:
            return
        staged = self.blocks.seqs[seq_id].staged[group]
        ready = [j for j in blocks if j in staged]
        rest = [j for j in blocks if j not in staged]
        if ready:
            self.mirror.join(seq_id)
            self.blocks.promote(seq_id, group, ready)
        if rest:
            self._copy_in(seq_id, group, rest, self.blocks.load(seq_id, group, rest))
            self.blocks_loaded_late += len(rest) * len(self.groups[group])

    def retain(self, seq_id: int, group: int, want: set[int]) -> list[int]:
        """The group's resident set becomes ``want``: the rest evicted (no copy), staged blocks in
        it promoted once their copies have arrived (the compute stream waits, the host does not),
        other staged ones dropped. Returns the wanted blocks to ``load``."""
        if self.blocks.seqs[seq_id].staged[group]:
            self.mirror.join(seq_id)  # promoted slots are read, dropped ones reused, only after their copies
        return self.blocks.retain(seq_id, group, want)

    def stage(self, seq_id: int, group: int, blocks: list[int]) -> None:
        """Copy mirrored blocks into spare slots ahead of use, on the copy stream (CUDA) while
        decode goes on; ``load`` later makes them resident without copying."""
        if not blocks:
            return
        slots = self.blocks.stage(seq_id, group, blocks)
        with self.mirror.ahead(seq_id):  # after queued steps, which may still read slots an eviction freed
            self._copy_in(seq_id, group, blocks, slots)
        self.blocks_prefetched += len(blocks) * len(self.groups[group])

    def unstage(self, seq_id: int, group: int, keep=()) -> None:
        """Drop the staged blocks of a group that the plan no longer wants (all but ``keep``)."""
        if self.blocks.seqs[seq_id].staged[group]:
            self.mirror.join(seq_id)  # their slots are free for compute work afterwards
            self.blocks.unstage(seq_id, group, keep)

    def _copy_in(self, seq_id: int, group: int, blocks: list[int], slots: list[int]) -> None:
        host_ids = self.blocks.seqs[seq_id].host_ids
        hosts = [host_ids[j] for j in blocks]
        dst = self.mirror.to_device(torch.tensor(slots))
        members = self.groups[group]
        if len(members) == self.pool.shape[0]:  # all layers: one copy per run of host rows, one kernel per chunk
            for a in range(0, len(blocks), self.load_chunk_blocks):
                chunk = slice(a, a + self.load_chunk_blocks)
                self.mirror.load(hosts[chunk], slice(None), self.pool, dst[chunk])
        else:
            for layer in members:
                self.mirror.load(hosts, slice(layer, layer + 1), self.pool[layer: layer + 1], dst)
        if self.slot_summary is not None:
            for layer in members:
                self.slot_summary[layer, :, dst] = self.mirror.fetch_summary(hosts, layer).transpose(0, 1)
        self.blocks_copied += len(blocks) * len(members)  # counted in single-layer blocks
        self.bytes_copied += len(blocks) * len(members) * self.mirror.bytes_per_layer_block

    load_chunk_blocks = 64  # blocks (all layers) per host gather + copy: bounds the temporaries

    # ------------------------------------------------------------ tables for attention

    def block_tables(self, seq_ids: list[int], group: int = 0, pending: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
        """(block_table [N, M] int32, num_blocks [N] int32, last_len [N] int32, logical ids per row)
        over each sequence's resident blocks, counting ``pending`` uncommitted tokens."""
        rows, lasts, logical = [], [], []
        for seq_id in seq_ids:
            ids, slots, last = self.blocks.table(seq_id, group, pending)
            rows.append(slots)
            lasts.append(last)
            logical.append(ids)
        width = max(len(r) for r in rows)
        table = torch.zeros(len(rows), width, dtype=torch.int32)
        for i, r in enumerate(rows):
            table[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
        return (table.to(self.device), torch.tensor([len(r) for r in rows], dtype=torch.int32, device=self.device),
                torch.tensor(lasts, dtype=torch.int32, device=self.device), logical)

    def gather(self, seq_id: int, layer: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous K and V of the first ``num_tokens`` tokens of one layer: [H_kv, n, D] each.
        Every block in range must be resident (prefill keeps the whole prompt on the device)."""
        resident = self.blocks.seqs[seq_id].resident[self.group_of[layer]]
        idx = torch.tensor([resident[j] for j in range(self.blocks.blocks_for(num_tokens))], device=self.device)
        k_cache, v_cache = self.layer(layer)
        k = k_cache[idx].permute(1, 0, 2, 3).flatten(1, 2)[:, :num_tokens]  # [H, n, D]
        v = v_cache[idx].permute(1, 0, 2, 3).flatten(1, 2)[:, :num_tokens]
        return k, v

    def host_keys(self, host_ids: list[int], layer: int) -> torch.Tensor:
        """Keys of complete blocks of one layer, from the host mirror, on the device: [H_kv, n, D]
        (n = len(host_ids) * block_size, in the order of ``host_ids``)."""
        keys = self.mirror.fetch_keys(host_ids, layer)  # [n_blocks, H, B, D]
        return keys.permute(1, 0, 2, 3).flatten(1, 2)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor) -> None:
        k_cache, v_cache = self.layer(layer)
        kernels.paged_kv_write(k, v, k_cache, v_cache, slots, offsets)

    # ------------------------------------------------------------ accounting

    def host_blocks(self, seq_id: int) -> list[int]:
        return list(self.blocks.seqs[seq_id].host_ids)

    def accounting(self, seq_id: int | None = None) -> KVAccounting:
        """For one sequence, or totals over all sequences when ``seq_id`` is None."""
        seqs = [self.blocks.seqs[seq_id]] if seq_id is not None else list(self.blocks.seqs.values())
        tokens = sum(s.num_tokens for s in seqs)
        layer_blocks = sum(s.held(g) * len(self.groups[g]) for s in seqs for g in range(len(self.groups)))
        staged = sum(len(st) * len(self.groups[g]) for s in seqs for g, st in enumerate(s.staged))
        host_blocks = sum(len(s.host_ids) for s in seqs)
        index = host_blocks * self.index_keys.shape[0] * self.summary_bytes_per_layer_block
        if self.slot_summary is not None:
            index += layer_blocks * self.summary_bytes_per_layer_block
        capacity = self.blocks.num_device_blocks * self.bytes_per_block  # the trash slot not counted
        return KVAccounting(device_bytes=layer_blocks * self.bytes_per_layer_block + index,
                            device_capacity_bytes=capacity, host_bytes=host_blocks * self.mirror.bytes_per_block,
                            full_bytes=tokens * self.bytes_per_token, num_tokens=tokens, index_bytes=index,
                            staged_bytes=staged * self.bytes_per_layer_block)
