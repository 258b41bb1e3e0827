"""Lookahead Sparse Attention: Level-1 lookahead retrieval at cycle boundaries, Level-2 inside.

    decode step   0 ......... N-1 | N ......... 2N-1 | 2N ...
    cycle         0               | 1                | 2
    plan          P1 computed     | P2 computed      | P3 computed      (lookahead = 1)
    resident      P0 (prefill)    | P1 applied       | P2 applied

At each boundary the indexer scores every complete block of the sequence at the target
layers (cross-layer max) from the queries of the last W decode steps; the plan it yields is
applied one cycle later (``lookahead=1``, the paper's; ``0`` applies it at once). Applying a
plan copies in only the blocks that changed; evicting costs nothing (the host mirror has
every complete block). Sinks, the recent tail and the open block are always resident. Every
plan favours StreamingLLM's window by ``recency_bonus`` (``favour_recent``): a far block must
outscore a window block by that mass ratio to take its place.
"""
from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

import kernels
from engine.policies.base import OffloadPolicy, narrow, window_block_mass
from engine.policies.indexer import LearnedIndexer
from engine.policies.staging import CycleStaging


class QuestIndexer:
    """Zero-training indexer from the block key summaries and the recent queries.

    ``quest``: Quest upper bounds, normalised per layer and head (log-softmax over blocks) so
    layers can be compared, maxed over heads. ``mean``: the mean-key dot product q . kmean
    (scaled), maxed over heads. ``mass``: the attention mass each block would get if its keys
    were its mean key - a softmax over the blocks per query head and query, averaged over the
    window's queries and the heads of a KV group, then the log maxed over KV heads: the
    statistic of the first plan (exact attention of the prompt's last queries,
    ``window_block_mass``) with the mean key standing in for the keys. Measured on SmolLM2 NIAH
    prompts (docs/accuracy.md), ``mean`` recovers more of the blocks the prompt's last queries
    attend to than ``quest``; at 16-token blocks the min/max bounds are loose."""

    KINDS = ("quest", "mean", "mass")

    def __init__(self, kind: str = "quest"):
        if kind not in self.KINDS:
            raise ValueError(f"indexer score must be one of {', '.join(self.KINDS)}, got {kind!r}")
        self.kind = kind

    def score(self, queries: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, kmean: torch.Tensor,
              host_ids: torch.Tensor) -> torch.Tensor:
        """queries [W, Hq, D]; summaries [R, Hkv, D]; host_ids [M] -> scores [M] (higher = needed)."""
        if self.kind == "mass":
            return self.mass(queries, kmean, host_ids)
        m = host_ids.numel()
        # the count by a fill, not a copy from the host: a copy would wait for the step just launched
        quest, meandot = kernels.block_scores(queries[None], kmin, kmax, kmean, host_ids[None].to(torch.int32),
                                              torch.full((1,), m, dtype=torch.int32, device=host_ids.device))
        scale = queries.shape[-1] ** -0.5
        if self.kind == "mean":
            return (meandot[0] * scale).amax(0)  # [M]
        return torch.log_softmax(quest[0] * scale, dim=-1).amax(0)

    @staticmethod
    def mass(queries: torch.Tensor, kmean: torch.Tensor, host_ids: torch.Tensor) -> torch.Tensor:
        """Log of the estimated attention mass per block, maxed over KV heads: [M]."""
        w, hq, d = queries.shape
        keys = kmean[host_ids.long()].float()  # [M, Hkv, D]
        hkv = keys.shape[1]
        q = queries.float().view(w, hkv, hq // hkv, d) * d ** -0.5
        logits = torch.einsum("whgd,mhd->hwgm", q, keys)  # [Hkv, W, G, M]
        mass = torch.softmax(logits, dim=-1).mean((1, 2))  # [Hkv, M]
        return mass.clamp_min(1e-30).log().amax(0)


class AttentionIndexer:
    """Zero-training indexer from the keys themselves: the exact attention mass of the last W
    queries on each complete block (``window_block_mass``, the first plan's statistic), averaged
    over query heads, as a log. It reads every complete block's keys of the index layers from
    the host mirror at each boundary: one layer's keys per index layer and cycle, a 1 / (N x
    layers) share of full attention's reads. On held-out traces (docs/indexer.md) it is the one
    zero-training score whose plans hold more of the next cycle's attention mass than recency's,
    at early index layers (3, 6, 9 on SmolLM2); perplexity does not follow that layer-averaged
    mass (a shared set serving the early layers' far-back blocks starves the local layers)."""

    reads_keys = True  # scores from the keys in the host mirror, not from device index keys

    def score(self, queries: torch.Tensor, keys: torch.Tensor, last_position: int, block_size: int) -> torch.Tensor:
        """queries [W, Hq, D] (the last at ``last_position``); keys [Hkv, M * B, D] -> scores [M]."""
        mass = window_block_mass(queries, keys, queries.shape[-1] ** -0.5, block_size, last_position)  # [Hkv, M]
        return mass.mean(0).clamp_min(1e-30).log()


class LSAPolicy(CycleStaging, OffloadPolicy):
    """Level-1 plans at cycle boundaries from the indexer (``QuestIndexer``, or the learned one
    ``config.indexer`` names), applied one cycle later; Level-2 top-k inside the resident set.
    Boundaries, copies ahead and the device budget: ``CycleStaging`` (staging.py)."""

    def __init__(self, config, num_layers, block_size):
        super().__init__(config, num_layers, block_size)
        self.targets = config.layers(num_layers)
        self.prefill_window = max(config.query_window, config.observation_window)
        self.slot_summaries = config.level2_topk is not None
        if config.indexer:
            self.indexer = LearnedIndexer.load(config.indexer)
        elif config.index_score == "attention":
            self.indexer = AttentionIndexer()
        else:
            self.indexer = QuestIndexer(config.index_score)
        self._queries: dict[int, dict[int, deque]] = {}  # seq -> layer -> recent queries [Hq, D]
        self._step: dict[int, int] = {}  # decode steps done per sequence
        self._plan: dict[int, list[list[int]]] = {}  # pending plan: per group, ranked blocks
        self._first: dict[int, dict[int, torch.Tensor]] = {}  # seq -> layer -> prefill block scores
        self._init_staging()
        # Level-1 ordering on a worker thread (CUDA: the host would otherwise hold up a step)
        self.background_rank = None
        self._ranker: ThreadPoolExecutor | None = None
        self._level1_stream = None  # CUDA: Level-1 scoring beside the decode steps
        self._next: dict[int, Future] = {}  # seq -> the next plan, being ordered

    def bind(self, cache) -> None:
        super().bind(cache)
        if self.background_rank is None:
            self.background_rank = cache.device.type == "cuda"

    observes_decode = True

    @property
    def index_keys(self) -> bool:
        """The attention score reads the keys from the host mirror: no device index keys."""
        return not self.reads_keys

    @property
    def reads_keys(self) -> bool:
        """Whether the indexer scores from the keys in the host mirror (``AttentionIndexer``, or a
        wrapper of it such as bench decode's churn) rather than from the device index keys."""
        return getattr(self.indexer, "reads_keys", False)

    def index_fraction(self) -> float:
        """Nothing to budget for where no index keys are kept."""
        return super().index_fraction() if self.index_keys else 0.0

    @property
    def selects_each_step(self) -> bool:
        return self.config.level2_topk is not None  # Level-2 top-k is its only per-step selection

    def index_layers(self) -> tuple[int, ...]:
        return tuple(range(self.num_layers)) if self.config.per_layer else self.targets

    # ------------------------------------------------------------ queries

    def observes_prefill(self, layer: int) -> bool:
        return layer in self.index_layers()

    def observe_prefill(self, seq_id, layer, q, keys, scale):
        window = self._queries.setdefault(seq_id, {}).setdefault(layer, deque(maxlen=self.config.query_window))
        window.extend(q[-self.config.query_window:].clone())
        if self.config.first_plan == "attention":
            mass = window_block_mass(q, keys, scale, self.block_size)  # [Hkv, M], exact
            self._first.setdefault(seq_id, {})[layer] = mass.clamp_min(1e-30).log().amax(0)

    def observe_decode(self, layer, seq_ids, q):
        if layer not in self.index_layers():
            return
        q = q.clone()  # one copy for the batch; the windows hold views of its rows
        for i, s in enumerate(seq_ids):
            self._queries[s][layer].append(q[i])

    # ------------------------------------------------------------ Level-1

    def rank(self, seq_id: int, per_layer: dict[int, torch.Tensor] | None = None) -> list[list[int]]:
        """Per group: complete blocks, best first (whole pages together when page_blocks > 1).
        ``per_layer`` gives ready scores [M] per index layer; otherwise the indexer scores."""
        scores, limit = self._scores(seq_id, per_layer)
        return [self._pages(score.float().cpu())[:limit].tolist() for score in scores]  # one transfer per group

    def _scores(self, seq_id: int, per_layer: dict[int, torch.Tensor] | None = None
                ) -> tuple[list[torch.Tensor], int]:
        """Per group: block scores [M] (on the device), and how much of a ranking is used."""
        host_ids = self.cache.blocks.seqs[seq_id].host_ids
        if not host_ids:
            return [torch.empty(0) for _ in self.groups()], 0
        if per_layer is None:
            ids = self.cache.mirror.to_device(torch.tensor(host_ids, dtype=torch.int32))  # no host wait
            per_layer = {}
            for li, layer in enumerate(self.index_layers()):
                queries = torch.stack(list(self._queries[seq_id][layer]))  # [W, Hq, D]
                if self.reads_keys:
                    keys = self.cache.host_keys(host_ids, layer)  # [Hkv, M * B, D]
                    last = self.cache.num_tokens(seq_id) - 1  # the newest query's position
                    per_layer[layer] = self.indexer.score(queries, keys, last, self.block_size)
                    continue
                keys = self.cache.index_keys[li]
                per_layer[layer] = self.indexer.score(queries, keys[0], keys[1], keys[2], ids)
        else:
            per_layer = {layer: s[: len(host_ids)] for layer, s in per_layer.items()}
        # only the head of a ranking is ever used: what fills the budget a cycle or two ahead
        n = self.cache.num_tokens(seq_id)
        ahead = self.blocks_for(n + 2 * self.config.cycle + 1)
        limit = (self.max_group_budget(ahead) + self.config.sink_blocks
                 + max(self.group_tail(g, ahead) for g in range(len(self.groups()))) + 2)
        scores = []
        for g, members in enumerate(self.groups()):
            layers = [m for m in members if m in per_layer] or list(per_layer)
            score = torch.stack([per_layer[m] for m in layers]).amax(0)  # cross-layer max, [M]
            if self.config.recency_bonus > 0:
                score = self.favour_recent(score, self.group_budget(g, ahead))
            scores.append(score)
        return scores, limit

    def favour_recent(self, score: torch.Tensor, budget: int) -> torch.Tensor:
        """``score`` [M] (log-mass units: every Level-1 score is a log of an attention mass, or a
        logit) with log(1 + recency_bonus) added to the newest complete blocks that StreamingLLM's
        window would hold in a resident set of ``budget`` blocks (all but the sinks and the open
        block). A far block then displaces one of them only where its score is that much higher."""
        window = max(0, budget - self.config.sink_blocks - 1)
        out = score.clone()
        if window:
            out[-window:] += math.log1p(self.config.recency_bonus)
        return out

    def _rank_in_background(self, seq_id: int) -> Future:
        """Score now (kernel launches only), order on a worker thread once the scores reach the
        host: the decode steps go on meanwhile. The plan is used at the next boundary. On CUDA
        the scoring runs on a stream of its own, beside the next decode steps rather than ahead
        of them (the boundary step no longer carries Level-1's GPU time)."""
        if self.cache.device.type == "cuda":
            main = torch.cuda.current_stream(self.cache.device)
            if self._level1_stream is None:
                self._level1_stream = torch.cuda.Stream(self.cache.device)
            side = self._level1_stream
            side.wait_stream(main)  # the queries the boundary step observed are written
            for window in self._queries[seq_id].values():
                for q in window:  # made on the main stream: not reused while the side stream reads
                    q.record_stream(side)
            with torch.cuda.stream(side):
                scores, limit = self._scores(seq_id)
                host = [torch.empty(sc.shape, dtype=torch.float32, pin_memory=True) for sc in scores]
                for buf, sc in zip(host, scores):
                    buf.copy_(sc, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(side)
        else:
            scores, limit = self._scores(seq_id)
            host, ready = [sc.float().cpu() for sc in scores], None

        def order() -> list[list[int]]:
            if ready is not None:
                ready.synchronize()
            return [self._pages(buf)[:limit].tolist() for buf in host]

        if self._ranker is None:
            self._ranker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsa-rank")
        return self._ranker.submit(order)

    def _pages(self, score: torch.Tensor) -> torch.Tensor:
        """Blocks best first (a tensor on the host); each followed by its next ``neighbors``
        blocks when asked (a block already listed keeps its first place)."""
        ranked = self._ranked_pages(score)
        k = self.config.neighbors
        if not k or not len(ranked):
            return ranked
        cand = (ranked[:, None] + torch.arange(k + 1)).flatten()
        cand = cand[cand < score.numel()]
        uniq, inverse = torch.unique(cand, return_inverse=True)
        first = torch.full((len(uniq),), len(cand)).scatter_reduce(0, inverse, torch.arange(len(cand)), "amin")
        return cand[first.sort().values]

    def _ranked_pages(self, score: torch.Tensor) -> torch.Tensor:
        page = self.config.page_blocks
        if self.config.threshold is not None:
            score = torch.where(score.exp() >= self.config.threshold, score, torch.full_like(score, float("-inf")))
        if page == 1:
            order = torch.argsort(score, descending=True, stable=True)
            return order[score[order] > float("-inf")]
        m = score.numel()
        pad = (-m) % page
        page_score = torch.nn.functional.pad(score, (0, pad), value=float("-inf")).view(-1, page).amax(1)
        pages = torch.argsort(page_score, descending=True, stable=True)
        pages = pages[page_score[pages] > float("-inf")]
        blocks = (pages[:, None] * page + torch.arange(page)).flatten()
        return blocks[blocks < m]

    def _apply_ranked(self, seq_id: int, ranked: list[list[int]]) -> None:
        for g, blocks in enumerate(ranked):
            self.apply(seq_id, g, self.target_set(seq_id, blocks, group=g))

    def after_prefill(self, seq_id: int) -> None:
        # from the prompt's last queries: exact attention while the prompt is on the device, or the indexer
        ranked = self.rank(seq_id, self._first.pop(seq_id, None))
        self._apply_ranked(seq_id, ranked)
        self._plan[seq_id] = ranked
        # Sequences that start together would all reach their boundaries in the same step (one
        # slow step for the batch): each one takes the phase farthest from the others'. Without
        # stagger_boundaries, every first boundary a whole cycle away (plans independent of the batch).
        self._step[seq_id] = self.first_phase(seq_id) if self.config.stagger_boundaries else 0

    # ------------------------------------------------------------ Level-2

    def select(self, layer, q, table, num_blocks, last_len, logical):
        if self.config.level2_topk is None:
            return None
        summary = self.cache.slot_summary[layer]
        quest, _ = kernels.block_scores(q, summary[0], summary[1], summary[2], table, num_blocks - 1)
        return narrow(quest.amax(1), table, num_blocks, last_len, lambda c: self.config.level2_topk + 1)

    def next_plan(self, seq_id: int) -> list[list[int]] | None:
        """The plan for the sequence's next boundary (per KV group, ranked logical blocks): a
        new list object each time one is computed. The cluster reports it for prefetching."""
        return self._plan.get(seq_id)

    def forget(self, seq_id: int) -> None:
        for state in (self._queries, self._step, self._plan, self._first, self._prefetch, self._next, self._ready,
                      self._adopt_at):
            state.pop(seq_id, None)
        self._rank_due.discard(seq_id)

    def stats(self) -> dict:
        return {"misses": self.misses, "cycles": self.cycles, "blocks_prefetched": self.cache.blocks_prefetched,
                "blocks_loaded_late": self.cache.blocks_loaded_late, "blocks_deferred": self.deferred}
