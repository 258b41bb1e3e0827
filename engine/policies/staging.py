"""How LSA's plans reach the device: cycle boundaries, copies ahead, and the host work kept off
the step.

    step of a sequence   B ........................ B + N/2 ........................ B + N = next boundary
    before_decode        apply the plan (O(set) bookkeeping)                           apply the next one
    after_launch         launch Level-1 | adopt the plan (B + 1), stage its blocks | prepare the boundary
                         (each while the step's GPU work runs: none of it delays the step)

- **Staging sized from the plan.** A plan is known a cycle before it applies, so the blocks it
  brings in (its *churn*: a third of the resident set on real text, docs/perf.md) are known
  exactly. The sequence's reserve is resized to the budget plus that many staging slots, capped
  at ``prefetch`` x the budget (0.35: the peak device KV then stays within 1.35 x rho, the paper's
  13.5% at rho 0.10), growing only where the pool has unpromised slots.
- **Late blocks deferred.** A block of the plan not staged by its boundary (the staging area was
  full) is not copied while the step waits (``late="load"`` does that): the resident block it
  would replace stays for one more cycle, and the next plan, ranked again, brings it in then.
- **Boundaries spread.** A sequence starting to decode takes the phase where the fewest of the
  decoding sequences have their boundaries, the farthest from the others, so at batch > 1 one
  step carries at most ceil(batch / cycle) boundaries. ``stagger_boundaries=False``: every first
  boundary a whole cycle away, so that a sequence's plans do not depend on its batch (the evals).
- **Groups.** Each KV group (one, or a layer plan's: layer_plan.py) has its own plan, resident set,
  budget and staging cap (``prefetch`` x its budget); the reserve is sized for the largest.

The mixin holds no selection rule: which blocks a plan wants is ``rank`` and ``target_set``.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass


@dataclass
class PreparedBoundary:
    """The resident sets a boundary will apply, computed ahead (``after_launch``) for its length."""

    num_tokens: int  # the sequence's tokens when the boundary runs
    config: object  # the PolicyConfig it was computed under (a changed budget invalidates it)
    wanted: list[list[int]]  # per group: the blocks resident after the boundary


class CycleStaging:
    """Cycle mechanics of ``LSAPolicy``: it provides ``rank``, ``_rank_in_background``, ``_plan``,
    ``_next``, ``_step``, ``target_set`` and ``apply``; this class decides when they run."""

    CHURN_KEPT = 4096
    ADOPT_AFTER = 2  # a plan ranked at a boundary is adopted at the launch of the second step after it

    def _init_staging(self) -> None:
        self._prefetch: dict[int, tuple[int, list[list[int]]]] = {}  # seq -> (blocks per step, per group queue)
        self._ready: dict[int, PreparedBoundary] = {}  # seq -> its next boundary, prepared
        self._rank_due: set[int] = set()  # sequences whose boundary ran this step: Level-1 to launch
        self._adopt_at: dict[int, int] = {}  # seq -> the step whose launch adopts the plan being ranked
        self.cycles = 0
        self.deferred = 0  # plan blocks kept out one more cycle (single-layer blocks, as blocks_loaded_late)
        # per plan adopted, the last CHURN_KEPT: blocks it brings in (group 0), for reporting (bounded: a
        # server adopts ~25 plans a second at 128K x 24)
        self.churn: deque[int] = deque(maxlen=self.CHURN_KEPT)
        self.timing = {"rank_s": 0.0, "apply_s": 0.0}  # host time: launching Level-1, applying plans

    # ------------------------------------------------------------ device budget

    def index_fraction(self) -> float:
        """Device bytes of the index keys kept per block, as a fraction of the block's KV (all
        layers, K and V): min / max / mean key rows [3, H, D] per Level-1 layer against
        [L, 2, H, B, D]."""
        return 3 * len(self.index_layers()) / (2 * self.num_layers * self.block_size)

    def budget_blocks(self, num_blocks: int) -> int:
        """Resident blocks within ``budget`` x the sequence's KV bytes **with the index keys
        inside it**: floor((budget - index_fraction) x n), and with Level-2 slot summaries (3/(2B)
        of each resident block) counted too; the floors of the base rule hold. A budget of 1.0
        keeps every block (the index keys then come on top: that is full attention)."""
        if self.config.budget >= 1.0:
            return super().budget_blocks(num_blocks)
        selectable = (self.config.budget - self.index_fraction()) * num_blocks
        if self.config.level2_topk is not None:
            selectable /= 1 + 3 / (2 * self.block_size)
        floor = max(self.config.sink_blocks + self.config.tail_blocks + 1,
                    self.config.min_resident_tokens // self.block_size)
        return min(num_blocks, max(floor, math.floor(selectable + 1e-9)))

    # ------------------------------------------------------------ reserve

    def stage_cap(self, num_blocks: int, group: int | None = None) -> int:
        """Staging slots a sequence of ``num_blocks`` blocks may hold for ``group``: ``prefetch`` x
        the group's budget (None: the largest group's, what the reserve is sized for)."""
        if not (self.config.lookahead and self.config.prefetch > 0):
            return 0
        budget = self.max_group_budget(num_blocks) if group is None else self.group_budget(group, num_blocks)
        return math.ceil(self.config.prefetch * budget)

    def decode_reserve(self, max_len: int) -> int:
        """The resident set's reserve plus the largest staging area (the reserve then follows
        each plan's churn, within this)."""
        blocks = self.blocks_for(max_len)
        return min(blocks, super().decode_reserve(max_len) + self.stage_cap(blocks))

    def _cycle_reserve(self, num_tokens: int) -> int:
        """Slots the resident set needs through the next cycle at ``num_tokens`` tokens: its budget
        a cycle on, the blocks the cycle's tokens open, one spare (the base rule's, at that length)."""
        return super().decode_reserve(num_tokens + 2 * self.config.cycle + 1)

    # ------------------------------------------------------------ the step

    def before_decode(self, seq_ids: list[int]) -> None:
        for s in seq_ids:
            step = self._step[s]
            if step and step % self.config.cycle == 0:
                t0 = time.perf_counter()
                if self.config.lookahead:
                    self._apply_plan(s)
                    self._rank_due.add(s)
                else:
                    self._apply_ranked(s, self.rank(s))
                self.cycles += 1
                self.timing["apply_s"] += time.perf_counter() - t0
            self._step[s] = step + 1

    def after_launch(self, seq_ids: list[int]) -> None:
        """Host work of the cycle, while the step's GPU work runs: Level-1 after a boundary,
        adopting a plan once ranked, staging its blocks, preparing the boundary."""
        if not self.config.lookahead:
            return
        for s in seq_ids:
            if s in self._rank_due:
                self._rank_due.discard(s)
                t0 = time.perf_counter()
                if self.background_rank:
                    self._next[s] = self._rank_in_background(s)
                    self._adopt_at[s] = self._step[s] + self.ADOPT_AFTER
                else:
                    self._plan[s] = self.rank(s)  # for the next boundary
                    self._queue_prefetch(s)
                self.timing["rank_s"] += time.perf_counter() - t0
                continue
            if self._step[s] >= self._adopt_at.get(s, 0):
                self._take_plan(s, stage=True)
            self._prefetch_some(s)
            if s not in self._ready and s in self._plan and not self._queued(s) and s not in self._next:
                self._prepare_boundary(s)

    # ------------------------------------------------------------ boundaries

    def _apply_plan(self, s: int) -> None:
        """The plan ranked one cycle ago becomes the resident set: prepared ahead if it was, else
        computed now; what was not staged is deferred (or loaded, ``late="load"``)."""
        self._take_plan(s, stage=False)
        self._prefetch.pop(s, None)
        ready = self._ready.pop(s, None)
        n = self.cache.num_tokens(s)
        if ready is not None and ready.num_tokens == n and ready.config is self.config:
            wanted = ready.wanted
        else:
            wanted = self._wanted(s, n)
        for g, want in enumerate(wanted):
            self.apply(s, g, want)  # promotes staged blocks, evicts the rest; loads what is missing

    def _prepare_boundary(self, s: int) -> None:
        """The next boundary's resident sets, computed for the length it will run at."""
        steps_left = (-self._step[s]) % self.config.cycle  # steps before the boundary's (0: it is the next)
        n = self.cache.num_tokens(s) + 1 + steps_left  # this step's token is committed after the launch
        self._ready[s] = PreparedBoundary(n, self.config, self._wanted(s, n))

    def _wanted(self, s: int, num_tokens: int) -> list[list[int]]:
        """Per group: the plan's target set at ``num_tokens`` tokens, its unstaged blocks deferred."""
        seq = self.cache.blocks.seqs[s]
        out = []
        for g, ranked in enumerate(self._plan[s]):
            want = self.target_set(s, ranked, num_tokens, group=g)
            if self.config.late == "defer" and self.config.prefetch > 0:
                want = self._defer_unstaged(seq, g, want, ranked)
            out.append(want)
        return out

    def _defer_unstaged(self, seq, group: int, want: list[int], ranked: list[int]) -> list[int]:
        """``want`` with its blocks that are neither resident nor staged (blocks decode opens
        before the boundary aside) replaced by resident blocks it drops, best ranked first."""
        resident, staged = seq.resident[group], seq.staged[group]
        opened = seq.num_tokens // self.block_size  # blocks from here on are decode's, resident by then
        late = [j for j in want if j < opened and j not in resident and j not in staged]
        if not late:
            return want
        keep = set(want) - set(late)
        dropped = [j for j in ranked if j in resident and j not in keep]
        seen = set(dropped)
        dropped += sorted((j for j in resident if j not in keep and j not in seen), reverse=True)
        self.deferred += len(late) * len(self.groups()[group])
        return [j for j in want if j not in late] + dropped[: len(late)]

    # ------------------------------------------------------------ plans and copies ahead

    def _take_plan(self, s: int, stage: bool) -> None:
        """Adopt the plan being ranked in the background, waiting for it, and with ``stage`` queue
        its blocks for copying ahead (at a boundary the plan is applied at once: nothing to stage).

        It is adopted at the launch of the second step after its boundary (``ADOPT_AFTER``), always:
        adopting it whenever the worker thread happened to finish made what was staged by the next
        boundary, hence the blocks deferred, hence the logits, depend on the host's timing (CUDA
        graphs, whose launches return sooner, decoded a session turn differently from eager decode).
        The wait is short: the scores were computed beside the step after the boundary, whose
        tokens the host has read by then, with overlapped decode too (engine/llm.py; adopted one
        step earlier, the host waited there for the boundary step and Level-1 with the GPU idle
        behind it: the 128K step after a boundary took 5.3 ms of host work, the p99 2.2x)."""
        self._adopt_at.pop(s, None)
        future = self._next.pop(s, None)
        if future is None:
            return
        self._plan[s] = future.result()
        self._ready.pop(s, None)
        if stage:
            self._queue_prefetch(s)

    def _queue_prefetch(self, s: int) -> None:
        """Resize the sequence's staging area to the blocks the next plan brings in (within the
        cap, where the pool allows) and queue them for copying over the first half of the cycle."""
        if self.config.prefetch <= 0:
            return
        blocks = self.cache.blocks
        seq = blocks.seqs[s]
        n = self.cache.num_tokens(s)
        growth = -(-self.config.cycle // self.block_size) + 1  # blocks the cycle's tokens may open
        missing = [[j for j in self.target_set(s, ranked, group=g) if j not in seq.resident[g]]
                   for g, ranked in enumerate(self._plan[s])]
        self.churn.append(len(missing[0]))
        num_blocks = self.blocks_for(n + 1)
        caps = [self.stage_cap(num_blocks, g) for g in range(len(missing))]  # a layer plan's groups differ
        want = self._cycle_reserve(n) + max(min(c, len(m)) for c, m in zip(caps, missing))
        held = max(seq.held(g) for g in range(len(missing)))
        blocks.set_reserve(s, max(held, min(want, blocks.max_reserve(s))))
        queues = []
        for g, queue in enumerate(missing):
            spare = max(0, seq.reserve - seq.held(g) - growth)
            queues.append(queue[:min(caps[g], spare)])
        per_step = -(-max(map(len, queues), default=0) // max(1, self.config.cycle // 2))
        self._prefetch[s] = (per_step, queues)

    def _queued(self, s: int) -> bool:
        return any(self._prefetch.get(s, (0, []))[1])

    def _prefetch_some(self, s: int) -> None:
        per_step, queues = self._prefetch.get(s, (0, []))
        seq = self.cache.blocks.seqs[s]
        for g, queue in enumerate(queues):
            if queue:
                take = [j for j in queue[:per_step] if j not in seq.resident[g] and j not in seq.staged[g]]
                self.cache.stage(s, g, take)
                del queue[:per_step]

    # ------------------------------------------------------------ phases

    def first_phase(self, s: int) -> int:
        """Decode steps already counted for a sequence starting now: the phase at which the fewest
        decoding sequences have their boundaries, and of those the farthest (circularly) from the
        others'; alone, 0 (its first boundary a whole cycle away)."""
        cycle = self.config.cycle
        others = [(-step) % cycle for o, step in self._step.items() if o != s]  # steps to each one's boundary
        if not others:
            return 0

        def gap(k: int) -> int:  # to the nearest boundary at another step
            return min((min((k - o) % cycle, (o - k) % cycle) for o in others if o != k), default=cycle)

        # steps to its first boundary: where the fewest boundaries fall, then the farthest from the others
        k = min(range(cycle, 0, -1), key=lambda k: (others.count(k % cycle), -gap(k % cycle), -k))
        return (-k) % cycle
