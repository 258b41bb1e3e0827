"""Block KV cache: the device pool (reserve), block tables, the host mirror and accounting.

Layouts are the contract in docs/kv-layout.md:

    pool : [L, 2, S, H_kv, B, D]   on the device; kernels see pool[l, 0] / pool[l, 1]
    host : [N_host, L, 2, H_kv, B, D]   one complete block of all layers is one contiguous copy
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from engine.block_manager import BlockManager
from engine.config import ModelConfig


@dataclass(frozen=True)
class KVAccounting:
    """Bytes of KV, in the model dtype. ``full`` is what full attention over every token needs."""

    device_bytes: int  # device slots in use (reserved-but-empty slots not counted)
    device_capacity_bytes: int  # the whole device pool
    host_bytes: int  # host-mirror blocks in use
    full_bytes: int  # tokens x bytes per token, all layers, K and V
    num_tokens: int

    @property
    def device_fraction(self) -> float:
        return self.device_bytes / self.full_bytes if self.full_bytes else 0.0

    def as_dict(self) -> dict:
        return {"device_kv_bytes": self.device_bytes, "device_kv_capacity_bytes": self.device_capacity_bytes,
                "host_kv_bytes": self.host_bytes, "full_kv_bytes": self.full_bytes,
                "num_tokens": self.num_tokens, "device_kv_fraction": round(self.device_fraction, 6)}


class BlockKVCache:
    def __init__(self, config: ModelConfig, block_size: int, num_device_blocks: int,
                 num_host_blocks: int, dtype: torch.dtype, device: torch.device | str):
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        layers, heads, dim = config.num_layers, config.num_kv_heads, config.head_dim
        self.blocks = BlockManager(block_size, num_device_blocks, num_host_blocks)
        self.pool = torch.empty(layers, 2, num_device_blocks, heads, block_size, dim, dtype=dtype, device=self.device)
        pin = self.device.type == "cuda"
        self.host = torch.empty(num_host_blocks, layers, 2, heads, block_size, dim, dtype=dtype, pin_memory=pin)
        self.bytes_per_token = config.kv_bytes_per_token(dtype)
        self.bytes_per_block = self.bytes_per_token * block_size

    # ------------------------------------------------------------ sequences

    def admit(self, seq_id: int, max_tokens: int) -> None:
        self.blocks.admit(seq_id, max_tokens)

    def release(self, seq_id: int) -> None:
        self.blocks.release(seq_id)

    def num_tokens(self, seq_id: int) -> int:
        return self.blocks.seqs[seq_id].num_tokens

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each [S, H_kv, B, D]."""
        return self.pool[layer, 0], self.pool[layer, 1]

    def append_slots(self, seq_ids: list[int], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Device slots and offsets for the next tokens of each sequence, flattened in order."""
        slots, offsets = [], []
        for seq_id, n in zip(seq_ids, counts):
            s, o = self.blocks.append_slots(seq_id, n)
            slots += s
            offsets += o
        return (torch.tensor(slots, dtype=torch.int32, device=self.device),
                torch.tensor(offsets, dtype=torch.int32, device=self.device))

    def commit(self, seq_ids: list[int], counts: list[int]) -> None:
        """Advance lengths after a forward step; copy newly completed blocks to the host mirror."""
        done = []
        for seq_id, n in zip(seq_ids, counts):
            done += self.blocks.commit(seq_id, n)
        if done:
            slots = torch.tensor([s for s, _ in done], device=self.device)
            hosts = torch.tensor([h for _, h in done])
            blocks = self.pool[:, :, slots].permute(2, 0, 1, 3, 4, 5)  # [n, L, 2, H, B, D]
            self.host[hosts] = blocks.to("cpu")

    def block_tables(self, seq_ids: list[int], pending: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block_table [N, M] int32, num_blocks [N] int32, last_len [N] int32) over all blocks,
        counting ``pending`` appended-but-uncommitted tokens per sequence."""
        rows, lasts = [], []
        for seq_id in seq_ids:
            slots, last = self.blocks.table(seq_id, pending)
            rows.append(slots)
            lasts.append(last)
        width = max(len(r) for r in rows)
        table = torch.zeros(len(rows), width, dtype=torch.int32)
        for i, r in enumerate(rows):
            table[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
        return (table.to(self.device), torch.tensor([len(r) for r in rows], dtype=torch.int32, device=self.device),
                torch.tensor(lasts, dtype=torch.int32, device=self.device))

    def gather(self, seq_id: int, layer: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous K and V of the first ``num_tokens`` tokens of one layer: [H_kv, n, D] each."""
        slots = self.blocks.seqs[seq_id].slots[: self.blocks.blocks_for(num_tokens)]
        idx = torch.tensor(slots, device=self.device)
        k_cache, v_cache = self.layer(layer)
        k = k_cache[idx].permute(1, 0, 2, 3).flatten(1, 2)[:, :num_tokens]  # [H, n, D]
        v = v_cache[idx].permute(1, 0, 2, 3).flatten(1, 2)[:, :num_tokens]
        return k, v

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
        device_blocks = sum(len(s.slots) for s in seqs)
        host_blocks = sum(len(s.host_ids) for s in seqs)
        capacity = self.blocks.device.num_blocks * self.bytes_per_block
        return KVAccounting(device_bytes=device_blocks * self.bytes_per_block, device_capacity_bytes=capacity,
                            host_bytes=host_blocks * self.bytes_per_block, full_bytes=tokens * self.bytes_per_token,
                            num_tokens=tokens)
