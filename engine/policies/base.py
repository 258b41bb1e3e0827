"""The policy interface: which KV blocks decode attends to and which live on the device.

Every policy but ``full`` works at the same budget, counted the same way: the resident set of
a sequence is at most ``floor(budget * num_blocks)`` blocks, sinks and tail included (never
fewer than sinks + ``tail_blocks`` + the current block, so very short contexts keep those).
The hooks the engine calls:

    admit_blocks(prompt_len, max_len)   slots to reserve when a sequence is admitted
    after_prefill(seq_id)               the prompt is in the cache: pick the first resident set
    before_decode(seq_ids)              per step, before the tables are built: boundaries, swaps
    after_launch(seq_ids)               per step, once its forward is launched: host work that the
                                        step's GPU work hides (copies ahead, Level-1 launches)
    observe_prefill(...) / observe_decode(...)   queries seen at the Level-1 layers
    select(layer, ...)                  per step and layer: narrow the table (Level-2, Quest, oracle)
    attend(layer, ...)                  per step and layer, instead of select: the attention itself,
                                        each KV head over blocks of its own (oracle_head)

``Policy`` is full attention and the base of the others; ``OffloadPolicy`` the base of those
that keep only a resident set on the device. The baselines are in baselines.py, LSA in lsa.py.
"""
from __future__ import annotations

import math

import torch

from engine.config import PolicyConfig
from engine.kv_cache import BlockKVCache


class Policy:
    """Full attention: every block resident, nothing selected. Base of the others."""

    offloads = False  # evicts blocks to the host mirror
    slot_summaries = False  # keeps per-slot key summaries on the device
    prefill_window = 0  # prompt queries observed at the end of prefill
    selects_each_step = False  # select() narrows tables inside a step (such steps are not CUDA graphs)
    observes_decode = False  # observe_decode() wants each step's queries at the index layers
    index_keys = True  # keeps the index layers' key summaries of every host block on the device (Level-1)
    attends = False  # attend() computes decode attention itself (per-KV-head sets); select() is then not called

    def __init__(self, config: PolicyConfig, num_layers: int, block_size: int):
        self.config = config
        self.num_layers = num_layers
        self.block_size = block_size
        self.cache: BlockKVCache | None = None

    def bind(self, cache: BlockKVCache) -> None:
        self.cache = cache

    def groups(self) -> list[list[int]]:
        layers = list(range(self.num_layers))
        return [[i] for i in layers] if self.config.per_layer and self.offloads else [layers]

    def index_layers(self) -> tuple[int, ...]:
        return ()

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def budget_blocks(self, num_blocks: int) -> int:
        """Resident blocks allowed for a sequence of ``num_blocks`` blocks: floor(budget * n), but
        never fewer than ``min_resident_tokens`` (in whole blocks) nor than the sinks, the tail
        and the current block; all of them when that is more than there are."""
        floor = max(self.config.sink_blocks + self.config.tail_blocks + 1,
                    self.config.min_resident_tokens // self.block_size)
        return min(num_blocks, max(floor, math.floor(self.config.budget * num_blocks + 1e-9)))

    def tail_size(self, num_blocks: int) -> int:
        """Complete recent blocks always resident (besides the open one) for a sequence of
        ``num_blocks`` blocks: ``tail_blocks``, or ``tail_tokens`` in whole blocks where that is
        more, capped at half of the budget left after the sinks and the open block, so that at
        least as many blocks stay for the selection as the token tail takes."""
        return self.tail_size_within(self.budget_blocks(num_blocks))

    def tail_size_within(self, budget: int) -> int:
        """The tail rule of ``tail_size`` for a resident set of ``budget`` blocks."""
        by_tokens = -(-self.config.tail_tokens // self.block_size)
        share = (budget - self.config.sink_blocks - 1) // 2
        return max(self.config.tail_blocks, min(by_tokens, share))

    # Budgets per layer group: one budget for every group here; a layer plan (layer_plan.py) gives
    # each group its own, the layer-blocks of all groups held within L x budget_blocks.
    def group_budget(self, group: int, num_blocks: int) -> int:
        return self.budget_blocks(num_blocks)

    def max_group_budget(self, num_blocks: int) -> int:
        return self.budget_blocks(num_blocks)

    def group_tail(self, group: int, num_blocks: int) -> int:
        return self.tail_size(num_blocks)

    def check_model(self, model) -> None:
        """Raise if this policy was configured for another model (a layer plan is per model)."""

    def admit_blocks(self, prompt_len: int, max_len: int) -> int:
        return self.blocks_for(max_len)

    def after_prefill(self, seq_id: int) -> None:
        pass

    def before_decode(self, seq_ids: list[int]) -> None:
        pass

    def after_launch(self, seq_ids: list[int]) -> None:
        pass

    def observes_prefill(self, layer: int) -> bool:
        return False

    def observe_prefill(self, seq_id: int, layer: int, q: torch.Tensor, keys: torch.Tensor, scale: float) -> None:
        pass

    def observe_decode(self, layer: int, seq_ids: list[int], q: torch.Tensor) -> None:
        pass

    def select(self, layer, q, table, num_blocks, last_len, logical):
        """Return a narrower (table, num_blocks, last_len) for this layer, or None for all of it."""
        return None

    def attend(self, layer, q, k_cache, v_cache, table, num_blocks, last_len, scale):
        """Decode attention of this layer, out [N, Hq, D], for a policy whose KV heads attend to
        different blocks; called instead of select() where ``attends`` is True."""
        raise NotImplementedError(f"{type(self).__name__} sets attends but has no attend()")

    def forget(self, seq_id: int) -> None:
        pass

    def stats(self) -> dict:
        return {}


class OffloadPolicy(Policy):
    """Keeps only a resident set on the device; everything else lives in the host mirror."""

    offloads = True

    def __init__(self, config, num_layers, block_size):
        super().__init__(config, num_layers, block_size)
        self.misses = 0

    def decode_reserve(self, max_len: int) -> int:
        """Slots a decoding sequence may hold per group: the budget, the blocks a cycle's tokens
        open, and one spare; never more than the whole sequence has."""
        growth = -(-self.config.cycle // self.block_size) + 1
        return min(self.blocks_for(max_len), self.max_group_budget(self.blocks_for(max_len)) + growth + 1)

    def admit_blocks(self, prompt_len: int, max_len: int) -> int:
        # the whole prompt is on the device while it is prefilled, then the reserve shrinks
        return max(self.blocks_for(prompt_len + 1), self.decode_reserve(max_len))

    def must_keep(self, seq_id: int, num_tokens: int | None = None, group: int = 0) -> list[int]:
        """Blocks always resident in ``group``'s set, most important first: the open block, the
        tail, the sinks (at the sequence's length, or at ``num_tokens``)."""
        n = self.cache.num_tokens(seq_id) if num_tokens is None else num_tokens
        open_block = n // self.block_size
        size = self.group_tail(group, self.blocks_for(n + 1))
        tail = list(range(open_block - 1, max(-1, open_block - 1 - size), -1))
        sinks = list(range(min(self.config.sink_blocks, open_block)))
        keep = [open_block] if n % self.block_size else []  # an empty open block is not allocated yet
        return list(dict.fromkeys(keep + tail + sinks))

    def target_set(self, seq_id: int, ranked: list[int], num_tokens: int | None = None,
                   group: int = 0) -> list[int]:
        """must_keep, then ``ranked`` blocks, up to ``group``'s budget at the current length (or at
        ``num_tokens``, a length the sequence will have)."""
        n = self.cache.num_tokens(seq_id) if num_tokens is None else num_tokens
        budget = self.group_budget(group, self.blocks_for(n + 1))
        complete = min(n, self.cache.num_tokens(seq_id)) // self.block_size  # mirrored by then: complete now
        chosen = self.must_keep(seq_id, n, group=group)[:budget]
        seen = set(chosen)
        for j in ranked:
            if len(chosen) >= budget:
                break
            if j not in seen and 0 <= j < complete:
                chosen.append(j)
                seen.add(j)
        return chosen

    def apply(self, seq_id: int, group: int, wanted: list[int]) -> None:
        """Make the resident set of one group exactly ``wanted`` (plus the open block): evict
        what is not wanted (no copy), copy in only what is missing."""
        n = self.cache.num_tokens(seq_id)
        open_block = n // self.block_size if n % self.block_size else None
        want = set(wanted) | ({open_block} if open_block is not None else set())
        # one pass: evict, promote what was staged, free staged slots of a plan that changed
        load = sorted(self.cache.retain(seq_id, group, want))
        mirrored = len(self.cache.blocks.seqs[seq_id].host_ids)
        self.misses += sum(1 for j in load if j >= mirrored)
        self.cache.load(seq_id, group, [j for j in load if j < mirrored])

    def shrink_reserve(self, seq_id: int, max_len: int) -> None:
        self.cache.blocks.set_reserve(seq_id, self.decode_reserve(max_len))

    def stats(self) -> dict:
        return {"misses": self.misses}


def narrow(scores, table, num_blocks, last_len, budget_fn):
    """Keep, per row, the last listed block plus the best-scoring others up to the budget, in
    table order. scores [N, M] over the listed blocks (the last one is ignored). One set of
    tensor operations for the whole batch (the per-step cost of Quest, the oracle, Level-2)."""
    n, width = table.shape
    counts = num_blocks.tolist()
    keep = torch.tensor([min(budget_fn(c), c) - 1 for c in counts], device=table.device)  # besides the last
    cols = torch.arange(width, device=table.device)[None, :]
    valid = cols < (num_blocks - 1)[:, None]
    order = torch.argsort(scores.masked_fill(~valid, float("-inf")), dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, cols.expand(n, width))  # rank of each column
    chosen = (rank < keep[:, None]) | (cols == (num_blocks - 1)[:, None])  # [N, M]
    out_n = chosen.sum(1).to(num_blocks.dtype)
    out_w = int(out_n.max())
    first = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :out_w]  # chosen columns, in order
    out = table.gather(1, first).masked_fill(cols[:, :out_w] >= out_n[:, None], 0)
    return out, out_n, last_len


MASS_CHUNK_BYTES = 512 << 20  # window_block_mass's transient float32 work per group of KV heads


def window_block_mass(q: torch.Tensor, keys: torch.Tensor, scale: float, block_size: int,
                      last_position: int | None = None, chunk_bytes: int = MASS_CHUNK_BYTES) -> torch.Tensor:
    """Attention mass per KV head and block of the last W queries, causal.

    q [W, Hq, D] (positions last_position-W+1 .. last_position; default n-W .. n-1), keys
    [Hkv, n, D] (positions 0 .. n-1) -> [Hkv, num_blocks] (mean over queries). Keys past n (the
    open block at a decode boundary) are not in the softmax. As many KV heads at a time as fit
    ``chunk_bytes`` of float32 work (a head's keys, scores and softmax: 96 MB at 128K tokens,
    G = 4, W = 8), at least one: a decode boundary at 128K is two groups of launches where one
    launch set per head cost the host 2.2 ms per layer on the H200 (benchmarks/level1_probe.py)."""
    w, hq, d = q.shape
    hkv, n, _ = keys.shape
    g = hq // hkv
    last = n - 1 if last_position is None else last_position
    positions = torch.arange(last - w + 1, last + 1, device=q.device)
    future = torch.arange(n, device=q.device)[None, :] > positions[:, None]  # [W, n]: keys after a query
    qs = (q.float() * scale).reshape(w, hkv, g, d)
    per_head = 4 * n * (d + 2 * g * w)  # float32 keys, scores, softmax
    step = max(1, min(hkv, chunk_bytes // max(per_head, 1)))
    mass = []
    for h in range(0, hkv, step):
        s = torch.einsum("whgd,hnd->hgwn", qs[:, h: h + step], keys[h: h + step].float())  # [h, G, W, n]
        mass.append(torch.softmax(s.masked_fill_(future, float("-inf")), dim=-1).mean((1, 2)))
    mass = torch.cat(mass) if len(mass) > 1 else mass[0]  # [Hkv, n]
    return torch.nn.functional.pad(mass, (0, (-n) % block_size)).view(hkv, -1, block_size).sum(-1)
