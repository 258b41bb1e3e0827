"""The engine: one process, one device. Requests in, completions out, continuous batching."""
from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

import torch

from engine.attention import PagedAttention
from engine.config import EngineConfig, ModelConfig
from engine.errors import CacheFullError, InvalidRequestError, PromptTooLongError
from engine.graphs import DecodeGraphRunner
from engine.kv_cache import BlockKVCache
from engine.layerwise import LayerwisePrefill
from engine.model import LlamaForCausalLM
from engine.policies import Policy, make_policy
from engine.sampling import SamplingParams, make_generator, sample
from engine.scheduler import Scheduler
from engine.sequence import Completion, Sequence, Status

DEFAULT_CPU_KV_BYTES = 4 << 30


class LLMEngine:
    """``add_request`` then ``step`` until done, or ``generate`` for a list of prompts."""

    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, tokenizer=None, policy: Policy | None = None,
                 arena=None):
        """``policy`` overrides the one ``config.policy`` names (e.g. a tracing policy).
        ``arena``: an external host mirror and host-id allocator (engine.sessions.HostArena)."""
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device  # the engine runs where its model is
        self.dtype = next(model.parameters()).dtype
        mc: ModelConfig = model.config
        self.max_model_len = min(config.scheduler.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        self.eos_ids = set(mc.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        cache_cfg = config.cache
        self.block_size = cache_cfg.block_size_for(self.max_model_len)
        self.policy = policy or make_policy(config.policy, mc.num_layers, self.block_size)
        if self.policy.offloads and not cache_cfg.host_mirror:
            raise InvalidRequestError(f"policy {config.policy.name!r} evicts blocks to the host mirror; "
                                      f"enable the host mirror")
        num_device = cache_cfg.num_device_blocks or self._auto_device_blocks(mc)
        num_host = cache_cfg.num_host_blocks if cache_cfg.num_host_blocks is not None else num_device
        if self.policy.offloads and cache_cfg.num_host_blocks is None:
            num_host = config.scheduler.max_num_seqs * -(-self.max_model_len // self.block_size)
        self.cache = BlockKVCache(mc, self.block_size, num_device, num_host if cache_cfg.host_mirror else 0,
                                  self.dtype, self.device, groups=self.policy.groups(),
                                  index_layers=self.policy.index_layers(), slot_summaries=self.policy.slot_summaries,
                                  arena=arena, host_dtype=cache_cfg.host_dtype)
        self.policy.bind(self.cache)
        self.attention = PagedAttention(self.cache, self.policy, mc.head_dim)
        self.graphs = self._graph_runner(config.scheduler.cuda_graphs)
        self.layerwise = LayerwisePrefill(model, self.cache, self.policy, config.scheduler.prefill_chunk)
        self.scheduler = Scheduler(config.scheduler.max_num_seqs, config.scheduler.prefill_chunk,
                                   can_admit=lambda s: self.cache.blocks.can_reserve(self._admit_blocks(s)),
                                   admit=self._admit)
        self._generators: dict[int, torch.Generator | None] = {}
        # Called with (sequence, logits [V] float32) for every token the engine samples.
        self.on_logits: Callable[[Sequence, torch.Tensor], None] | None = None

    def _graph_runner(self, mode: bool | None) -> DecodeGraphRunner | None:
        selects = self.policy.selects_each_step
        if mode is None:
            mode = self.device.type == "cuda" and not selects
        elif mode and selects:
            raise InvalidRequestError(f"policy {self.config.policy.name!r} selects blocks inside each step; it "
                                      f"runs eagerly: set cuda_graphs to None or False")
        return DecodeGraphRunner(self) if mode else None

    def _admit(self, seq: Sequence) -> None:
        self.cache.admit(seq.seq_id, self._admit_blocks(seq))
        if seq.prefix_host_ids:  # a session turn: its prefix is loaded, not prefilled
            self.cache.attach_prefix(seq.seq_id, seq.prefix_host_ids)
            seq.num_cached = len(seq.prefix_host_ids) * self.cache.block_size

    def _admit_blocks(self, seq: Sequence) -> int:
        if self._layerwise(seq):
            return self.policy.decode_reserve(seq.max_len)
        return self.policy.admit_blocks(seq.prompt_len, seq.max_len)

    def _layerwise(self, seq: Sequence) -> bool:
        """Prefill this prompt layer by layer (offloading policies, no session prefix): always
        with ``layerwise_prefill=True``, or, when unset, if the prompt does not fit the device pool."""
        mode = self.config.scheduler.layerwise_prefill
        if mode is False or not self.policy.offloads or seq.prefix_host_ids:
            return False
        return bool(mode) or (self.policy.admit_blocks(seq.prompt_len, seq.max_len)
                              > self.cache.blocks.num_device_blocks)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Load the model named by ``config.model`` (registry name, HF directory or GGUF)."""
        from engine.loader import load_model
        from engine.tokenizer import Tokenizer
        from engine.weights import resolve_model

        source = resolve_model(config.model)
        tokenizer = Tokenizer(source)
        torch.manual_seed(config.weights_seed)
        return cls(load_model(source, config.device_name, config.torch_dtype), config, tokenizer)

    def _auto_device_blocks(self, mc: ModelConfig) -> int:
        bs = self.block_size
        want = self.config.scheduler.max_num_seqs * -(-self.max_model_len // bs)
        cap = self.config.cache.device_kv_bytes
        if cap is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                cap = int(free * 0.85)
            else:
                cap = DEFAULT_CPU_KV_BYTES
        return max(1, min(want, cap // (mc.kv_bytes_per_token(self.dtype) * bs)))

    # ------------------------------------------------------------ requests

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str = "", chat: bool = False) -> Sequence:
        params = params or SamplingParams()
        ids = self._encode(prompt, chat)
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens; the context holds {self.max_model_len} including at least one "
                f"generated token: shorten the prompt")
        room = self.max_model_len - len(ids)
        if params.max_tokens > room:
            params = SamplingParams(**{**params.__dict__, "max_tokens": room})
        seq = Sequence(ids, params, request_id=request_id)
        if self._admit_blocks(seq) > self.cache.blocks.num_device_blocks:
            raise CacheFullError(
                f"request needs {self._admit_blocks(seq)} device blocks but the whole device cache holds "
                f"{self.cache.blocks.num_device_blocks}; lower max_tokens or give the cache more blocks")
        self._generators[seq.seq_id] = make_generator(params, self.device)
        seq.counters_at_start = self._counters()
        self.scheduler.add(seq)
        return seq

    def _encode(self, prompt: str | list[int], chat: bool) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidRequestError("the prompt is empty: give some text or token ids")
            if self.tokenizer is None:
                raise InvalidRequestError("this engine has no tokenizer: pass token ids")
            if chat:
                return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty: give some text or token ids")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"token ids must be integers in [0, {vocab})")
        return ids

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, seq: Sequence) -> None:
        if seq.status is not Status.FINISHED:
            self._finish(seq, "abort")

    # ------------------------------------------------------------ stepping

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Run one prefill segment and one decode batch; returns the sequences finished now."""
        plan = self.scheduler.schedule()
        finished = []
        if plan.decode:
            t0 = time.perf_counter()
            ids = [s.seq_id for s in plan.decode]
            self.policy.before_decode(ids)
            if self.graphs is not None:
                logits = self.graphs.run(ids, [s.last_token for s in plan.decode], [s.num_cached for s in plan.decode])
            else:
                tokens = torch.tensor([s.last_token for s in plan.decode], device=self.device)
                positions = torch.tensor([s.num_cached for s in plan.decode], device=self.device)
                self.attention.plan_decode(ids)
                logits = self.model.logits(self.model(tokens, positions, self.attention))
            self.cache.commit(ids, [1] * len(ids))
            if self.on_logits is not None:
                for seq, row in zip(plan.decode, logits):
                    self.on_logits(seq, row)
            next_tokens = sample(logits, [s.params for s in plan.decode], [self._generators[i] for i in ids])
            dt = time.perf_counter() - t0
            for seq, tok in zip(plan.decode, next_tokens):
                seq.num_cached += 1
                seq.decode_s += dt
                if self._append(seq, tok):
                    finished.append(seq)
        if plan.prefill is not None:
            seq, start, end = plan.prefill, plan.prefill.num_cached, plan.prefill_end
            t0 = time.perf_counter()
            if start == 0 and self._layerwise(seq):  # the whole prompt in this step, layer by layer
                end = seq.prompt_len
                hidden = self.layerwise.run(seq.seq_id, seq.prompt_ids)
            else:
                self.attention.plan_prefill(seq.seq_id, start, end, observe=end == seq.prompt_len)
                tokens = torch.tensor(seq.prompt_ids[start:end], device=self.device)
                hidden = self.model(tokens, torch.arange(start, end, device=self.device), self.attention)
                self.cache.commit([seq.seq_id], [end - start])
            seq.num_cached = end
            if end == seq.prompt_len:
                self.policy.after_prefill(seq.seq_id)
                if self.policy.offloads:
                    self.policy.shrink_reserve(seq.seq_id, seq.max_len)
                logits = self.model.logits(hidden[-1:])
                if self.on_logits is not None:
                    self.on_logits(seq, logits[0])
                tok = sample(logits, [seq.params], [self._generators[seq.seq_id]])[0]
                seq.status = Status.DECODE
                seq.prefill_s += time.perf_counter() - t0
                if self._append(seq, tok):
                    finished.append(seq)
            else:
                seq.prefill_s += time.perf_counter() - t0
        return finished

    def _append(self, seq: Sequence, token: int) -> bool:
        """Add a generated token; finish the sequence if a stop condition holds."""
        if seq.forced is not None:
            token = seq.forced[len(seq.output_ids)]
        seq.output_ids.append(token)
        reason = None
        if token in self.eos_ids and not seq.params.ignore_eos:
            reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens:
            reason = "length"
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_ids)
            for stop in seq.params.stop:
                cut = seq.text.find(stop)
                if cut >= 0:
                    seq.text, reason = seq.text[:cut], "stop"
                    break
        if reason:
            self._finish(seq, reason)
        return reason is not None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq.status in (Status.PREFILL, Status.DECODE):
            seq.kv = {**self.cache.accounting(seq.seq_id).as_dict(), **self._policy_stats(seq)}
            seq.kept_host_ids = self.cache.blocks.detach_host(seq.seq_id, seq.keep_host_blocks)
            self.cache.release(seq.seq_id)
            self.policy.forget(seq.seq_id)
        seq.status = Status.FINISHED
        self.scheduler.remove(seq)
        self._generators.pop(seq.seq_id, None)

    def _counters(self) -> dict:
        """The engine's running totals: copies, and the policy's counters (misses, cycles, ...)."""
        return {"blocks_copied": self.cache.blocks_copied, "bytes_copied": self.cache.bytes_copied,
                **self.policy.stats()}

    def _policy_stats(self, seq: Sequence) -> dict:
        """Counters since the sequence was added (exact when it ran alone)."""
        start = seq.counters_at_start
        stats = {"policy": self.config.policy.name, "budget": self.config.policy.budget,
                 **{k: v - start.get(k, 0) for k, v in self._counters().items()}}
        if stats.get("cycles"):
            stats["bytes_copied_per_cycle"] = stats["bytes_copied"] / stats["cycles"]
        return stats

    # ------------------------------------------------------------ convenience

    def score_continuation(self, context: list[int], continuation: list[int]) -> torch.Tensor:
        """Log-probabilities [len(continuation)] of ``continuation`` after ``context``, teacher-forced
        through the decode path (so the attention policy is what is measured; the first token is
        scored from the prefill)."""
        logprobs: list[torch.Tensor] = []
        self.teacher_force(context, continuation,
                           lambda i, row: logprobs.append(torch.log_softmax(row.float(), -1)[continuation[i]]))
        return torch.stack(logprobs).cpu()

    def teacher_force(self, context: list[int], continuation: list[int],
                      visit: Callable[[int, torch.Tensor], None]) -> None:
        """Feed ``continuation`` after ``context`` through the decode path whatever the model would
        choose, calling ``visit(i, logits [V])`` with the logits that predict ``continuation[i]``
        (i = 0 from the prefill). Other sequences' logits still reach ``on_logits``."""
        if not continuation:
            raise InvalidRequestError("continuation is empty")
        seq = self.add_request(context, SamplingParams(max_tokens=len(continuation), ignore_eos=True))
        if len(seq.output_ids) or seq.params.max_tokens < len(continuation):
            self.abort(seq)
            raise PromptTooLongError("context plus continuation exceed the model's context")
        seq.forced = list(continuation)
        previous = self.on_logits

        def record(s: Sequence, row: torch.Tensor) -> None:
            if s is seq:
                visit(len(s.output_ids), row)
            elif previous is not None:
                previous(s, row)

        self.on_logits = record
        try:
            while seq.status is not Status.FINISHED:
                self.step()
        finally:
            self.on_logits = previous

    @torch.inference_mode()
    def prompt_logits(self, ids: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """Prefill ``ids`` alone, segment by segment, yielding (start, logits [T, V] float32) of
        every position; the KV is released at the end. For perplexity and parity checks."""
        seq = Sequence(self._encode(ids, chat=False), SamplingParams(max_tokens=1))
        if seq.prompt_len > self.max_model_len:
            raise PromptTooLongError(f"text has {seq.prompt_len} tokens; the context holds {self.max_model_len}")
        self.cache.admit(seq.seq_id, self.cache.blocks.blocks_for(seq.prompt_len))
        try:
            for start in range(0, seq.prompt_len, self.config.scheduler.prefill_chunk):
                end = min(seq.prompt_len, start + self.config.scheduler.prefill_chunk)
                self.attention.plan_prefill(seq.seq_id, start, end)
                tokens = torch.tensor(ids[start:end], device=self.device)
                hidden = self.model(tokens, torch.arange(start, end, device=self.device), self.attention)
                self.cache.commit([seq.seq_id], [end - start])
                yield start, self.model.logits(hidden)
        finally:
            self.cache.release(seq.seq_id)

    def generate(self, prompts: Iterable[str | list[int]], params: SamplingParams | None = None,
                 chat: bool = False) -> list[Completion]:
        seqs = [self.add_request(p, params, chat=chat) for p in prompts]
        while any(s.status is not Status.FINISHED for s in seqs):
            self.step()
        return [Completion(s.request_id, s.prompt_ids, s.output_ids, s.text, s.finish_reason, s.prefill_s,
                           s.decode_s, s.kv) for s in seqs]
