"""The model runner: one scheduled batch through the model, and the policy's calls around it.

    DecodeBatch     policy.before_decode (boundaries, swaps) -> forward of one token per
                    sequence (a CUDA graph, or eager with per-step selection), launched ->
                    policy.after_launch (copies ahead, Level-1: host work the GPU hides) -> commit
    PrefillSegment  forward of the segment (or of one layer of the whole prompt, layer by layer, or a
                    prompt prefilled elsewhere written in: engine/prompt_state.py) -> commit;
                    at the prompt's end: policy.after_prefill (the first resident set), the
                    reserve shrinks to the decode reserve, and the last position's logits
"""
from __future__ import annotations

import time
from typing import Iterator

import torch

from engine.attention import PagedAttention
from engine.config import SchedulerConfig
from engine.errors import InvalidRequestError
from engine.graphs import DecodeGraphRunner
from engine.kv_cache import BlockKVCache
from engine.layerwise import LayerwisePrefill
from engine.model import LlamaForCausalLM
from engine.prompt_state import write_prompt
from engine.policies import Policy
from engine.scheduler import Batch, DecodeBatch
from engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache: BlockKVCache, policy: Policy, config: SchedulerConfig,
                 max_model_len: int):
        self.model, self.cache, self.policy = model, cache, policy
        self.max_model_len = max_model_len
        self.device = cache.device
        self.layerwise_prefill = config.layerwise_prefill
        self.prefill_chunk = config.prefill_chunk
        self.attention = PagedAttention(cache, policy, model.config.head_dim)
        self.layerwise = LayerwisePrefill(model, cache, policy, config.prefill_chunk)
        self.graphs = self._graph_runner(config.cuda_graphs)
        self._layerwise_runs: dict[int, Iterator] = {}  # seq_id -> its layer-by-layer prefill, a layer a segment
        self.decode_host_s = (0.0, 0.0, 0.0)  # the last decode step's host parts: plan applied, launch, after it

    def _graph_runner(self, mode: bool | None) -> DecodeGraphRunner | None:
        selects = self.policy.selects_each_step
        if mode is None:
            mode = self.device.type == "cuda" and not selects
        elif mode and selects:
            raise InvalidRequestError(f"policy {self.policy.config.name!r} selects blocks inside each step; it "
                                      f"runs eagerly: set cuda_graphs to None or False")
        return DecodeGraphRunner(self) if mode else None

    def prefills_layerwise(self, seq: Sequence) -> bool:
        """Prefill this prompt layer by layer (offloading policies): a session turn always (its
        prefix streams from the host mirror, one layer at a time, instead of all of it onto the
        device); a new prompt with ``layerwise_prefill=True``, or, when unset, if it does not fit
        the device pool. ``layerwise_prefill=False``, or a prompt prefilled elsewhere: never."""
        if self.layerwise_prefill is False or not self.policy.offloads or seq.prompt_state is not None:
            return False
        return bool(self.layerwise_prefill) or bool(seq.prefix_host_ids) or (self.policy.admit_blocks(seq.prompt_len, seq.max_len)
                                                > self.cache.blocks.num_device_blocks)

    def run(self, batch: Batch, tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits [n, V] float32 that predict the next token of each of ``batch.seqs``, or None
        for a prefill segment short of its prompt's end. ``tokens``: a decode batch's input
        tokens [n] on the device (the step before's, not yet read by the host), instead of each
        sequence's last token."""
        if isinstance(batch, DecodeBatch):
            return self._decode(batch.seqs, tokens)
        return self._prefill(batch.seq, batch.end)

    def _decode(self, seqs: list[Sequence], fed: torch.Tensor | None = None) -> torch.Tensor:
        ids = [s.seq_id for s in seqs]
        t0 = time.perf_counter()
        self.policy.before_decode(ids)
        t1 = time.perf_counter()
        if self.graphs is not None:
            logits = self.graphs.run(ids, [0] * len(seqs) if fed is not None else [s.last_token for s in seqs],
                                     [s.num_cached for s in seqs], fed=fed)
        else:
            tokens = fed if fed is not None else torch.tensor([s.last_token for s in seqs], device=self.device)
            positions = torch.tensor([s.num_cached for s in seqs], device=self.device)
            self.attention.plan_decode(ids)
            logits = self.model.logits(self.model(tokens, positions, self.attention))
        t2 = time.perf_counter()
        self.policy.after_launch(ids)  # before anything waits for the step: hidden behind its GPU work
        self.decode_host_s = (t1 - t0, t2 - t1, time.perf_counter() - t2)  # for the step trace
        self.cache.commit(ids, [1] * len(ids))
        for seq in seqs:
            seq.num_cached += 1
        return logits

    def forget(self, seq_id: int) -> None:
        """The sequence left (finished or aborted): drop its unfinished layer-by-layer prefill."""
        run = self._layerwise_runs.pop(seq_id, None)
        if run is not None:
            run.close()

    def _prefill(self, seq: Sequence, end: int) -> torch.Tensor | None:
        start = seq.num_cached
        if seq.prompt_state is not None:  # prefilled elsewhere: its K/V and observations written in
            logits = write_prompt(self.cache, self.policy, seq.seq_id, seq.prompt_state, self.prefill_chunk,
                                  self.attention.scale)
            seq.num_cached = seq.prompt_len
            self.policy.after_prefill(seq.seq_id)
            if self.policy.offloads:
                self.policy.shrink_reserve(seq.seq_id, seq.max_len)
            return logits
        if seq.seq_id in self._layerwise_runs or (
                start == len(seq.prefix_host_ids) * self.cache.block_size and self.prefills_layerwise(seq)):
            # the whole prompt (after a turn's prefix) layer by layer, about a chunk's work per segment:
            # other sequences step in between
            run = self._layerwise_runs.setdefault(seq.seq_id, self.layerwise.layers(seq.seq_id, seq.prompt_ids))
            try:
                next(run)
                return None
            except StopIteration as done:
                del self._layerwise_runs[seq.seq_id]
                hidden, end = done.value, seq.prompt_len
        else:
            self.attention.plan_prefill(seq.seq_id, start, end, observe=end == seq.prompt_len)
            tokens = torch.tensor(seq.prompt_ids[start:end], device=self.device)
            hidden = self.model(tokens, torch.arange(start, end, device=self.device), self.attention)
            self.cache.commit([seq.seq_id], [end - start])
        seq.num_cached = end
        if end < seq.prompt_len:
            return None
        self.policy.after_prefill(seq.seq_id)
        if self.policy.offloads:
            self.policy.shrink_reserve(seq.seq_id, seq.max_len)
        return self.model.logits(hidden[-1:])
