"""Block bookkeeping in plain Python: slot allocation, reservations, residency, host ids.

No tensors here; the cache (engine/kv_cache.py) owns the memory these ids point into.

    positions  0 ........ B-1 | B ....... 2B-1 | 2B .. n-1
    logical    block 0        | block 1        | block 2 (open: the partial tail)
    host       h0             | h3             | -            <- host mirror ids, complete blocks only
    group 0    slot 5         | (evicted)      | slot 8       <- device residency, per layer group

A *group* is a set of layers that share one resident set: one group of all layers (the
default), or one group per layer. Each group has its own slot allocator over the same slot
range of the pool. A sequence *reserves* slots per group when admitted, so that decode never
runs dry; allocations beyond the reservation are refused.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from engine.errors import CacheFullError


class BlockAllocator:
    """Hands out integer ids from a pool (``range(num_blocks)``, or the given ``ids``); frees
    them in any order."""

    def __init__(self, num_blocks: int = 0, what: str = "device", ids=None):
        self._free = deque(range(num_blocks) if ids is None else ids)
        self.num_blocks = len(self._free)
        self.what = what

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

    def free(self, ids) -> None:
        self._free.extend(ids)


@dataclass
class SequenceBlocks:
    num_tokens: int = 0
    host_ids: list[int] = field(default_factory=list)  # complete blocks, in logical order
    resident: list[dict[int, int]] = field(default_factory=list)  # per group: logical block -> slot
    reserve: int = 0  # slots this sequence may hold in each group
    versions: list[int] = field(default_factory=list)  # per group: bumped on every residency change
    staged: list[dict[int, int]] = field(default_factory=list)  # per group: copied ahead, not attended yet

    def held(self, group: int) -> int:
        return len(self.resident[group]) + len(self.staged[group])

    def num_blocks(self, block_size: int) -> int:
        return -(-self.num_tokens // block_size)


class BlockManager:
    """Per-sequence residency over per-group device allocators and one host allocator."""

    def __init__(self, block_size: int, num_device_blocks: int, num_host_blocks: int, num_groups: int = 1,
                 host_allocator: BlockAllocator | None = None):
        self.block_size = block_size
        self.device = [BlockAllocator(num_device_blocks, "device") for _ in range(num_groups)]
        # an external host allocator hands out ids of a shared arena (engine/host_arena.py)
        self.host = host_allocator if host_allocator is not None else BlockAllocator(num_host_blocks, "host")
        self._mirrored = host_allocator is not None or num_host_blocks > 0
        self.seqs: dict[int, SequenceBlocks] = {}

    @property
    def num_groups(self) -> int:
        return len(self.device)

    @property
    def num_device_blocks(self) -> int:
        return self.device[0].num_blocks

    @property
    def mirrored(self) -> bool:
        return self._mirrored

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------ reservations

    def _unreserved(self, group: int) -> int:
        promised = sum(max(0, s.reserve - s.held(group)) for s in self.seqs.values())
        return self.device[group].num_free - promised

    def can_reserve(self, num_blocks: int, seq_id: int | None = None) -> bool:
        have = self.seqs[seq_id].reserve if seq_id is not None else 0
        return all(self._unreserved(g) >= num_blocks - have for g in range(self.num_groups))

    def max_reserve(self, seq_id: int) -> int:
        """The largest reservation the sequence could grow to now (its own plus the unpromised slots)."""
        return self.seqs[seq_id].reserve + min(self._unreserved(g) for g in range(self.num_groups))

    def admit(self, seq_id: int, num_blocks: int) -> None:
        """Reserve ``num_blocks`` slots in every group for a new sequence."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} is already in the cache")
        if not self.can_reserve(num_blocks):
            raise CacheFullError(f"device KV cache cannot reserve {num_blocks} blocks; wait for running requests "
                                 f"or give the cache more blocks")
        self.seqs[seq_id] = SequenceBlocks(resident=[{} for _ in self.device], reserve=num_blocks,
                                           versions=[0] * self.num_groups, staged=[{} for _ in self.device])

    def set_reserve(self, seq_id: int, num_blocks: int) -> None:
        """Shrink (or grow, if capacity allows) a sequence's reservation; never below what it holds."""
        seq = self.seqs[seq_id]
        held = max(seq.held(g) for g in range(self.num_groups))
        num_blocks = max(num_blocks, held)
        if num_blocks > seq.reserve and not self.can_reserve(num_blocks, seq_id):
            raise CacheFullError(f"cannot grow the reservation of sequence {seq_id} to {num_blocks} blocks")
        seq.reserve = num_blocks

    def attach_prefix(self, seq_id: int, host_ids: list[int]) -> None:
        """Start an admitted, empty sequence with complete blocks already in the host mirror
        (a session's prefix); the caller loads them onto the device."""
        seq = self.seqs[seq_id]
        if seq.num_tokens or seq.host_ids:
            raise ValueError(f"sequence {seq_id} already holds tokens")
        seq.host_ids = list(host_ids)
        seq.num_tokens = len(host_ids) * self.block_size

    def detach_host(self, seq_id: int, num_blocks: int) -> list[int]:
        """Take the first ``num_blocks`` host ids away from a sequence, so that releasing it
        does not free them (a session keeps them)."""
        seq = self.seqs[seq_id]
        kept, seq.host_ids = seq.host_ids[:num_blocks], seq.host_ids[num_blocks:]
        return kept

    def release(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id)
        for group, resident in enumerate(seq.resident):
            self.device[group].free(resident.values())
            self.device[group].free(seq.staged[group].values())
        self.host.free(seq.host_ids)

    # ------------------------------------------------------------ residency

    def _allocate(self, seq: SequenceBlocks, group: int, n: int) -> list[int]:
        if seq.held(group) + n > seq.reserve:
            raise CacheFullError(f"a sequence would hold {seq.held(group) + n} device blocks, past the "
                                 f"{seq.reserve} it reserved")
        return self.device[group].allocate(n)

    def append_slots(self, seq_id: int, num_new: int) -> list[tuple[list[int], list[int]]]:
        """Per group: slots and in-block offsets of the next ``num_new`` tokens (opens blocks)."""
        seq = self.seqs[seq_id]
        first, last = seq.num_tokens // self.block_size, (seq.num_tokens + num_new - 1) // self.block_size
        new_blocks = [j for j in range(first, last + 1) if j not in seq.resident[0]]
        for group in range(self.num_groups):
            if seq.held(group) + len(new_blocks) > seq.reserve:
                raise CacheFullError(f"sequence {seq_id} would run past the {seq.reserve} blocks it reserved")
        out = []
        for group, resident in enumerate(seq.resident):
            for j, slot in zip(new_blocks, self._allocate(seq, group, len(new_blocks))):
                resident[j] = slot
            seq.versions[group] += bool(new_blocks)
            slots, offsets = [], []
            for pos in range(seq.num_tokens, seq.num_tokens + num_new):
                j, off = divmod(pos, self.block_size)
                slots.append(resident[j])
                offsets.append(off)
            out.append((slots, offsets))
        return out

    def commit(self, seq_id: int, num_new: int) -> list[tuple[int, int]]:
        """Advance the length; returns (logical block, host id) of each block completed now,
        allocating the host ids (the caller copies the data)."""
        seq = self.seqs[seq_id]
        seq.num_tokens += num_new
        done = []
        while self.mirrored and len(seq.host_ids) < seq.num_tokens // self.block_size:
            j = len(seq.host_ids)
            host_id = self.host.allocate(1)[0]
            seq.host_ids.append(host_id)
            done.append((j, host_id))
        return done

    def evict(self, seq_id: int, group: int, blocks) -> None:
        seq = self.seqs[seq_id]
        self.device[group].free([seq.resident[group].pop(j) for j in blocks])
        seq.versions[group] += 1

    def load(self, seq_id: int, group: int, blocks: list[int]) -> list[int]:
        """Give each (non-resident, complete, mirrored) block a slot; the caller copies the data."""
        seq = self.seqs[seq_id]
        bad = [j for j in blocks if j >= len(seq.host_ids) or j in seq.resident[group]]
        if bad:
            raise ValueError(f"blocks {bad} of sequence {seq_id} are not in the host mirror or already resident")
        slots = self._allocate(seq, group, len(blocks))
        for j, slot in zip(blocks, slots):
            seq.resident[group][j] = slot
        seq.versions[group] += 1
        return slots

    def stage(self, seq_id: int, group: int, blocks: list[int]) -> list[int]:
        """Give mirrored, non-resident blocks spare slots to be copied into ahead of use; they are
        not attended to until ``promote``. The caller copies the data."""
        seq = self.seqs[seq_id]
        bad = [j for j in blocks if j >= len(seq.host_ids) or j in seq.resident[group] or j in seq.staged[group]]
        if bad:
            raise ValueError(f"blocks {bad} of sequence {seq_id} are not mirrored, or already resident or staged")
        slots = self._allocate(seq, group, len(blocks))
        seq.staged[group].update(zip(blocks, slots))
        return slots

    def promote(self, seq_id: int, group: int, blocks: list[int]) -> None:
        """Staged blocks become resident (their data has arrived)."""
        seq = self.seqs[seq_id]
        for j in blocks:
            seq.resident[group][j] = seq.staged[group].pop(j)
        seq.versions[group] += bool(blocks)

    def retain(self, seq_id: int, group: int, want: set[int]) -> list[int]:
        """Make the group's resident set ``want`` in one pass: resident blocks outside it are
        evicted, staged blocks in it promoted, the other staged ones dropped (their slots freed).
        Returns the wanted blocks that were neither resident nor staged (the caller loads them)."""
        seq = self.seqs[seq_id]
        resident, staged = seq.resident[group], seq.staged[group]
        kept = {j: slot for j, slot in resident.items() if j in want}
        freed = [slot for j, slot in resident.items() if j not in want]
        if staged:
            kept.update((j, slot) for j, slot in staged.items() if j in want)
            freed += [slot for j, slot in staged.items() if j not in want]
            seq.staged[group] = {}
        seq.resident[group] = kept
        self.device[group].free(freed)
        seq.versions[group] += 1
        return [j for j in want if j not in kept]

    def unstage(self, seq_id: int, group: int, keep=()) -> int:
        """Free the staged slots of a group except those of blocks in ``keep``; returns how many."""
        staged = self.seqs[seq_id].staged[group]
        drop = [j for j in staged if j not in keep]
        self.device[group].free([staged.pop(j) for j in drop])
        return len(drop)

    def _row(self, seq_id: int, group: int, pending: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(logical ids int64, slots int32, valid tokens of the last block) of the resident blocks up
        to the one holding the last token, in logical order; sorted by numpy, not a Python sort (a
        1M-token full-attention row of 16K blocks: 3.1 -> 1.2 ms on the dev machine, docs/perf.md)."""
        seq = self.seqs[seq_id]
        resident = seq.resident[group]
        n = seq.num_tokens + pending
        last_block = (n - 1) // self.block_size
        logical = np.fromiter(resident.keys(), dtype=np.int64, count=len(resident))
        slots = np.fromiter(resident.values(), dtype=np.int32, count=len(resident))
        order = np.argsort(logical)
        count = int(np.searchsorted(logical[order], last_block, side="right"))
        if not count or logical[order[count - 1]] != last_block:
            raise ValueError(f"the block holding the last token of sequence {seq_id} is not resident")
        return logical[order[:count]], slots[order[:count]], n - last_block * self.block_size

    def table_slots(self, seq_id: int, group: int = 0, pending: int = 0) -> np.ndarray:
        """``table``'s slots as an int32 array (the graphs' table fill writes it as it is)."""
        return self._row(seq_id, group, pending)[1]

    def table(self, seq_id: int, group: int = 0, pending: int = 0) -> tuple[list[int], list[int], int]:
        """Resident blocks of a sequence in logical order, the block holding the last token last.

        Returns (logical ids, slots, valid tokens of the last listed block), counting ``pending``
        tokens appended but not yet committed."""
        logical, slots, last_len = self._row(seq_id, group, pending)
        return logical.tolist(), slots.tolist(), last_len
