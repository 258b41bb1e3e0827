"""Block bookkeeping in plain Python: slot allocation and per-sequence block tables.

No tensors here; the cache (engine/kv_cache.py) owns the memory these ids point into.

    positions  0 ........ B-1 | B ....... 2B-1 | 2B .. n-1
    logical    block 0        | block 1        | block 2 (partial: the tail)
    slots      [s5]           [s1]             [s8]          <- device slots (reserve)
    host       [h0]           [h3]             -             <- host mirror ids, complete blocks only
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.errors import CacheFullError


class BlockAllocator:
    """Hands out integer ids from a fixed pool; frees them in any order."""

    def __init__(self, num_blocks: int, what: str = "device"):
        self.num_blocks = num_blocks
        self.what = what
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise CacheFullError(
                f"{self.what} KV cache is full: {n} blocks wanted, {self.num_free} of {self.num_blocks} free; "
                f"wait for running requests, or give the cache more blocks"
            )
        return [self._free.popleft() for _ in range(n)]

    def free(self, ids: list[int]) -> None:
        self._free.extend(i for i in ids if i >= 0)


@dataclass
class SequenceBlocks:
    """Where one sequence's blocks live. ``slots[j]`` is -1 when block j is not on the device."""

    num_tokens: int = 0
    slots: list[int] = field(default_factory=list)
    host_ids: list[int] = field(default_factory=list)  # complete blocks mirrored so far
    reserved: list[int] = field(default_factory=list)  # device slots held for future blocks

    def num_blocks(self, block_size: int) -> int:
        return -(-self.num_tokens // block_size)


class BlockManager:
    """Per-sequence block tables over a device allocator and (optionally) a host allocator."""

    def __init__(self, block_size: int, num_device_blocks: int, num_host_blocks: int):
        self.block_size = block_size
        self.device = BlockAllocator(num_device_blocks, "device")
        self.host = BlockAllocator(num_host_blocks, "host")
        self.seqs: dict[int, SequenceBlocks] = {}

    @property
    def mirrored(self) -> bool:
        return self.host.num_blocks > 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_admit(self, max_tokens: int) -> bool:
        return self.device.can_allocate(self.blocks_for(max_tokens))

    def admit(self, seq_id: int, max_tokens: int) -> None:
        """Reserve device slots for up to ``max_tokens`` tokens, so decode never runs dry."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} is already in the cache")
        self.seqs[seq_id] = SequenceBlocks(reserved=self.device.allocate(self.blocks_for(max_tokens)))

    def release(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id)
        self.device.free(seq.slots)
        self.device.free(seq.reserved)
        self.host.free(seq.host_ids)

    def append_slots(self, seq_id: int, num_new: int) -> tuple[list[int], list[int]]:
        """Slots and in-block offsets for the next ``num_new`` tokens; opens blocks as needed."""
        seq = self.seqs[seq_id]
        if self.blocks_for(seq.num_tokens + num_new) > len(seq.slots) + len(seq.reserved):
            raise CacheFullError(f"sequence {seq_id} would run past the {len(seq.slots) + len(seq.reserved)} "
                                 f"blocks it reserved")
        slots, offsets = [], []
        for pos in range(seq.num_tokens, seq.num_tokens + num_new):
            j, off = divmod(pos, self.block_size)
            if j == len(seq.slots):
                seq.slots.append(seq.reserved.pop())
            slots.append(seq.slots[j])
            offsets.append(off)
        return slots, offsets

    def commit(self, seq_id: int, num_new: int) -> list[tuple[int, int]]:
        """Advance the length; returns (device slot, host id) for each block completed now,
        allocating host ids for them (the caller copies the data)."""
        seq = self.seqs[seq_id]
        seq.num_tokens += num_new
        done = []
        while self.mirrored and len(seq.host_ids) < seq.num_tokens // self.block_size:
            j = len(seq.host_ids)
            host_id = self.host.allocate(1)[0]
            seq.host_ids.append(host_id)
            done.append((seq.slots[j], host_id))
        return done

    def table(self, seq_id: int, pending: int = 0) -> tuple[list[int], int]:
        """All device slots of a sequence in order and the valid length of the last one,
        counting ``pending`` tokens appended but not yet committed."""
        n = self.seqs[seq_id].num_tokens + pending
        num_blocks = self.blocks_for(n)
        return self.seqs[seq_id].slots[:num_blocks], n - (num_blocks - 1) * self.block_size
