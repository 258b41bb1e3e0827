"""Decode steps as captured CUDA graphs.

The eager decode step launches ~20 kernels per layer from Python, so a small batch runs at
several times its memory floor (docs/perf.md). Here the whole step (embedding, every layer's
KV write and sparse attention, the LM head) is captured once per (batch bucket, table width)
and replayed; a step only fills the static inputs and replays:

    host (pinned, int32)   tokens | positions | per group: slots offsets num_blocks last_len | per group: table
       --- one copy --->   the graph's static buffer of the same layout (the tables only when a row changed)
    replay                 logits [b, V] in a static output; the index layers' queries too

Table width: under an offloading policy (LSA) one width, the widest row a decoding sequence
can hold (its decode reserve at ``max_model_len``: budget, a cycle's growth, the staging cap),
so a changed resident set never needs another graph; the kernel shares out each row's own
blocks, so the unused width costs nothing (kernels/sparse_attention.py). ``capture_batches``
captures every batch bucket at warm-up: no capture happens in steady state. Full attention,
whose rows grow with the context, buckets the width (<= 12.5% padding) instead.

Rows past the batch (padding up to the bucket) write their token into the pool's trash slot
and attend to it alone. Table rows are rewritten on the host only when the sequence's
residency changed (``SequenceBlocks.versions``), so a 1M-token full-attention row is not
rebuilt every step. Level-1 scoring and swaps stay outside the graph (``policy.before_decode``).
Policies that narrow the table per step (Quest, oracle, LSA with Level-2 top-k) run eagerly.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch

import kernels
from engine.errors import InvalidRequestError


def batch_bucket(n: int) -> int:
    """1, 2, 4, 8, then multiples of 8."""
    return 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8


def batch_buckets(max_batch: int) -> list[int]:
    """Every batch bucket a batch of 1 .. ``max_batch`` sequences uses."""
    return sorted({batch_bucket(n) for n in range(1, max_batch + 1)})


def width_bucket(w: int) -> int:
    """At least 16 entries, rounded up to 1/8 of its power of two (<= 12.5% padding)."""
    step = 1 << max(1, w.bit_length() - 3)
    return max(16, -(-w // step) * step)


@dataclass
class StaticStep:
    """Buffers of one captured graph: ``packed`` on the device, ``host`` pinned, same layout."""

    batch: int
    width: int
    groups: int
    packed: torch.Tensor  # int32 [head + groups * b * w], head = 2b + groups * 4b
    host: torch.Tensor
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # index layer -> [b, Hq, D]
    logits: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None
    copied: "torch.cuda.Event | None" = None  # recorded after the last copy out of ``host``
    rows: list = field(default_factory=list)  # per group, per row: (seq_id, version, length) held, or None

    @property
    def head(self) -> int:
        """Entries before the tables: what changes every step."""
        return 2 * self.batch + 4 * self.batch * self.groups

    def views(self, t: torch.Tensor):
        """(tokens, positions, per group (slots, offsets, num_blocks, last_len, table)) of ``t``, a
        tensor or a numpy array of the layout."""
        b, w, head = self.batch, self.width, self.head
        tokens, positions = t[:b], t[b: 2 * b]
        out = []
        for g in range(self.groups):
            at = 2 * b + 4 * b * g
            slots, offsets, num_blocks, last_len = (t[at + i * b: at + (i + 1) * b] for i in range(4))
            table = t[head + g * b * w: head + (g + 1) * b * w].reshape(b, w)  # a view (torch or numpy)
            out.append((slots, offsets, num_blocks, last_len, table))
        return tokens, positions, out


class DecodeGraphRunner:
    """Runs the decode forward of a batch through static buffers, captured as CUDA graphs.

    ``capture=False`` runs the same static-buffer forward eagerly (CPU tests of the packing,
    padding and table caching; the graph itself needs CUDA)."""

    def __init__(self, runner, capture: bool = True):
        """``runner`` (engine.runner.ModelRunner): its model, cache, policy and max_model_len."""
        if capture and runner.device.type != "cuda":
            raise InvalidRequestError("CUDA graphs need a CUDA device; set cuda_graphs=False")
        self.model = runner.model
        self.cache = runner.cache
        self.policy = runner.policy
        self.capture = capture
        self.scale = runner.model.config.head_dim ** -0.5
        self.query_layers = tuple(self.cache.index_layers) if self.policy.observes_decode else ()
        # an offloading policy's rows never outgrow its decode reserve: one width for every graph
        self.max_width = self.policy.decode_reserve(runner.max_model_len) if self.policy.offloads else None
        self.steps: dict[tuple[int, int], StaticStep] = {}
        self.mempool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = 0

    # ------------------------------------------------------------ one step

    def run(self, seq_ids: list[int], tokens: list[int], positions: list[int],
            fed: torch.Tensor | None = None) -> torch.Tensor:
        """Forward of one decode token per sequence: logits [n, V] float32. Appends the tokens'
        slots (like ``PagedAttention.plan_decode``); the caller commits. ``fed``: the tokens [n]
        already on the device (the step before's, sampled there), in place of ``tokens``."""
        blocks = self.cache.blocks
        n = len(seq_ids)
        per_group = [[] for _ in self.cache.groups]  # (slot, offset) per row
        for seq_id in seq_ids:
            for g, (slots, offsets) in enumerate(blocks.append_slots(seq_id, 1)):
                per_group[g].append((slots[0], offsets[0]))
        width = 1
        for seq_id in seq_ids:
            resident = blocks.seqs[seq_id].resident
            width = max(width, max(len(r) for r in resident))
        step = self._step(batch_bucket(n), self.table_width(width))
        if step.copied is not None:  # the pinned buffer's last copy has left it (the step before may still run)
            step.copied.synchronize()  # (returns at once before its first record)
        tables_changed = self._fill(step, seq_ids, tokens, positions, per_group)
        head = step.head
        step.packed[:head].copy_(step.host[:head], non_blocking=True)
        if tables_changed:  # rows change at boundaries and new blocks only: a wide table is not copied every step
            step.packed[head:].copy_(step.host[head:], non_blocking=True)
        if step.copied is not None:
            step.copied.record()
        if fed is not None:
            step.packed[:n].copy_(fed)
        if step.graph is not None:
            step.graph.replay()
            logits = step.logits
        else:
            logits = self._forward(step)
        for layer in self.query_layers:
            self.policy.observe_decode(layer, seq_ids, step.queries[layer][:n])
        return logits[:n].clone()

    def table_width(self, width: int) -> int:
        """The graph's table width for rows of up to ``width`` blocks."""
        if self.max_width is not None and width <= self.max_width:
            return self.max_width
        return width_bucket(width)  # full attention; or a row past the reserve (not expected: a capture)

    def capture_batches(self, max_batch: int) -> int:
        """Capture now (warm-up) the graph of every batch bucket up to ``max_batch`` at the one
        table width, so that neither a growing batch nor a new resident set captures mid-run.
        Returns how many graphs were made (captured, or on CPU built); none under full attention,
        whose width is not known ahead."""
        if self.max_width is None:
            return 0
        made = len(self.steps)
        for batch in batch_buckets(max_batch):
            self._step(batch, self.max_width)
        return len(self.steps) - made

    def _fill(self, step: StaticStep, seq_ids, tokens, positions, per_group) -> bool:
        """Write the step's inputs into the pinned host buffer (through numpy: Python lists go in
        without a tensor per field, which matters with one group per layer). Returns whether a
        table row was rewritten."""
        n, b, bs, trash = len(seq_ids), step.batch, self.cache.block_size, self.cache.trash_slot
        host_tokens, host_positions, groups = step.views(step.host.numpy())
        host_tokens[:n], host_tokens[n:] = tokens, 0
        host_positions[:n], host_positions[n:] = positions, 0
        blocks = self.cache.blocks
        changed = False
        for g, (slots, offsets, num_blocks, last_len, table) in enumerate(groups):
            rows = step.rows[g]
            slots[:n], slots[n:] = [s for s, _ in per_group[g]], trash
            offsets[:n], offsets[n:] = [o for _, o in per_group[g]], 0
            num_blocks[n:], last_len[n:] = 1, 1
            for i, seq_id in enumerate(seq_ids):
                seq = blocks.seqs[seq_id]
                key = (seq_id, seq.versions[g])
                length = seq.num_tokens + 1
                if rows[i] is None or rows[i][:2] != key:
                    row = blocks.table_slots(seq_id, g, pending=1)
                    table[i, : len(row)] = row
                    rows[i] = key + (len(row),)
                    changed = True
                num_blocks[i] = rows[i][2]
                last_len[i] = length - (length - 1) // bs * bs
            for i in range(n, b):
                if rows[i] is not None:
                    table[i, 0] = trash
                    rows[i] = None
                    changed = True
        return changed

    # ------------------------------------------------------------ capture

    def _step(self, batch: int, width: int) -> StaticStep:
        step = self.steps.get((batch, width))
        if step is not None:
            return step
        groups = len(self.cache.groups)
        size = 2 * batch + groups * (4 * batch + batch * width)  # head, then the tables
        dev = self.cache.device
        host = torch.zeros(size, dtype=torch.int32, pin_memory=dev.type == "cuda")
        step = StaticStep(batch, width, groups, torch.zeros(size, dtype=torch.int32, device=dev), host,
                          copied=torch.cuda.Event() if dev.type == "cuda" else None)
        step.rows = [[None] * batch for _ in range(groups)]
        # every row a padding row until filled: trash slot, one block, one token
        _, _, views = step.views(step.host)
        for slots, _, num_blocks, last_len, table in views:
            slots.fill_(self.cache.trash_slot)
            table.fill_(self.cache.trash_slot)
            num_blocks.fill_(1)
            last_len.fill_(1)
        step.packed.copy_(host)
        cfg = self.model.config
        step.queries = {layer: torch.zeros(batch, cfg.num_heads, cfg.head_dim, dtype=self.cache.dtype, device=dev)
                        for layer in self.query_layers}
        if self.capture:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up: Triton compiles and autotunes outside the capture
                for _ in range(2):
                    self._forward(step)
            torch.cuda.current_stream(dev).wait_stream(side)
            step.graph = torch.cuda.CUDAGraph()
            # No collection inside the capture: freeing an old engine's pinned buffers then makes
            # CUDA calls that invalidate it; and only this thread's calls may (the Level-1 ranker
            # thread waits on events meanwhile).
            gc.collect()
            enabled = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(step.graph, pool=self.mempool, capture_error_mode="thread_local"):
                    step.logits = self._forward(step)
            finally:
                if enabled:
                    gc.enable()
            self.captures += 1
        self.steps[(batch, width)] = step
        return step

    def _forward(self, step: StaticStep) -> torch.Tensor:
        tokens, positions, groups = step.views(step.packed)
        cache, scale, queries = self.cache, self.scale, step.queries

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            slots, offsets, num_blocks, last_len, table = groups[cache.group_of[layer]]
            cache.write(layer, k, v, slots, offsets)
            if layer in queries:
                queries[layer].copy_(q)
            k_cache, v_cache = cache.layer(layer)
            return kernels.sparse_decode_attention(q, k_cache, v_cache, table, num_blocks, last_len, scale)

        hidden = self.model(tokens.long(), positions.long(), attend)
        return self.model.logits(hidden)
