"""The engine: one process, one device. Requests in, completions out, continuous batching.

    step:  for each batch the scheduler gives (the decode batch, then a prefill segment):
               logits = runner.run(batch)                  engine/runner.py
               tokens = sample(logits), hooks around it    engine/hooks.py
               finished += scheduler.postprocess(tokens)   engine/scheduler.py

Overlapped decode (``overlap_decode``, on CUDA by default): a step that is only a decode batch
of greedy rows no hook acts on is launched and left in flight, its tokens argmax-ed on the
device; the next step, if it is the same batch, is launched with those tokens as its input
before the host reads them, so the GPU never waits for the host's sampling, post-processing,
scheduling and step preparation (~0.3 ms a step at batch 1, docs/perf.md):

    call k:    launch step k (its input: step k-1's tokens, on the device) | read step k-1's tokens,
               post-process them (stream, finish)
    call k+1:  launch step k+1 (input: step k's) ...                       | read step k's ...

A sequence that finishes on step k-1's token has run step k too: that step's token is dropped
(its KV, of the last real token, is right). Anything else in the step (a prefill segment, a
sequence joining or leaving the batch, a sampled or penalized row, a hook) lands the step in
flight first and runs as without overlap.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from engine.config import EngineConfig, ModelConfig
from engine.errors import InvalidRequestError, PromptTooLongError
from engine.hooks import StepHook
from engine.kv_cache import BlockKVCache
from engine.model import LlamaForCausalLM
from engine.policies import Policy, make_policy
from engine.runner import ModelRunner
from engine.sampling import SamplingParams, make_generator, sample
from engine.scheduler import Batch, DecodeBatch, OutputRules, Scheduler
from engine.sequence import Completion, Sequence, Status

DEFAULT_CPU_KV_BYTES = 4 << 30


@dataclass
class InFlight:
    """A decode step launched whose tokens the host has not read yet: they stay on the device
    (``tokens``, the next step's input) and come to ``host`` (page-locked on CUDA) by ``ready``."""

    batch: DecodeBatch
    tokens: torch.Tensor  # [n] int64 on the device
    host: torch.Tensor  # [n] int64
    ready: torch.cuda.Event | None


class LLMEngine:
    """``add_request`` then ``step`` until done, or ``generate`` for a list of prompts."""

    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, tokenizer=None, policy: Policy | None = None,
                 arena=None):
        """``policy`` overrides the one ``config.policy`` names (e.g. a tracing policy).
        ``arena``: an external host mirror and host-id allocator (a HostArena)."""
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device  # the engine runs where its model is
        self.dtype = next(model.parameters()).dtype
        mc: ModelConfig = model.config
        self.max_model_len = min(config.scheduler.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        eos_ids = set(mc.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        cache_cfg = config.cache
        self.block_size = cache_cfg.block_size_for(self.max_model_len)
        self.policy = policy or make_policy(config.policy, mc.num_layers, self.block_size)
        self.policy.check_model(model)
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
                                  arena=arena, host_dtype=cache_cfg.host_dtype, index_keys=self.policy.index_keys)
        self.policy.bind(self.cache)
        self.runner = ModelRunner(model, self.cache, self.policy, config.scheduler, self.max_model_len)
        self.scheduler = Scheduler(config.scheduler.max_num_seqs, config.scheduler.prefill_chunk,
                                   OutputRules(eos_ids, tokenizer),
                                   can_admit=lambda s: self.cache.blocks.can_reserve(self._admit_blocks(s)),
                                   admit=self._admit, release=self._release,
                                   max_prefill_seqs=config.scheduler.max_prefill_seqs)
        self._generators: dict[int, torch.Generator | None] = {}
        self.hooks: list[StepHook] = []  # tools that watch or steer decoding (engine/hooks.py); none when serving
        self.trace = None  # a StepTrace: each batch's timing, the host work around them (engine/trace.py)
        overlap = config.scheduler.overlap_decode
        self.overlap_decode = self.device.type == "cuda" if overlap is None else overlap
        self._in_flight: InFlight | None = None  # the decode step launched, its tokens not read (overlap)
        # CUDA: two page-locked rows and their events, for the step in flight's tokens and the one launched after
        self._token_buffers: torch.Tensor | None = None
        self._token_events: list[torch.cuda.Event] = []
        self._flip = 0

    def _admit(self, seq: Sequence) -> None:
        self.cache.admit(seq.seq_id, self._admit_blocks(seq))
        if seq.prefix_host_ids:  # a session turn: its prefix is not prefilled; loaded, or streamed layer by layer
            self.cache.attach_prefix(seq.seq_id, seq.prefix_host_ids, load=not self.runner.prefills_layerwise(seq))
            seq.num_cached = len(seq.prefix_host_ids) * self.cache.block_size

    def _admit_blocks(self, seq: Sequence) -> int:
        if self.runner.prefills_layerwise(seq):
            return self.policy.decode_reserve(seq.max_len)
        return self.policy.admit_blocks(seq.prompt_len, seq.max_len)

    def _release(self, seq: Sequence) -> None:
        """A sequence finished: snapshot its accounting, keep its session blocks, free the rest."""
        if seq.status in (Status.PREFILL, Status.DECODE):
            if self._in_flight is not None:
                # the step in flight may still be writing this sequence's completed blocks into their host
                # rows, which now go on (a session's, prefix blocks, the pool): only once they have landed
                self.cache.mirror.wait_writes()
            seq.kv = {**self.cache.accounting(seq.seq_id).as_dict(), **self._policy_stats(seq)}
            seq.kept_host_ids = self.cache.blocks.detach_host(seq.seq_id, seq.keep_host_blocks)
            self.cache.release(seq.seq_id)
            self.policy.forget(seq.seq_id)
        self.runner.forget(seq.seq_id)
        self._generators.pop(seq.seq_id, None)

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

    def add_request(self, prompt: str | list[int] | None, params: SamplingParams | None = None,
                    request_id: str = "", chat: bool = False, prefix_host_ids: list[int] = (),
                    prompt_state=None) -> Sequence:
        """Queue a request. ``prompt_state`` (a PromptState of engine/prompt_state.py, captured over
        this engine's model): the prompt is its tokens (``prompt`` None or the same ids), and its
        prefill is written in from the state instead of run. ``prefix_host_ids``: host-mirror blocks
        holding the prompt's first tokens (a session's context, prefix blocks): loaded when
        admitted, not prefilled."""
        params = params or SamplingParams()
        if prompt_state is not None:
            if prompt is not None and list(prompt) != list(prompt_state.prompt_ids):
                raise InvalidRequestError("the prompt differs from the prompt state's tokens")
            prompt = list(prompt_state.prompt_ids)
        ids = self._encode(prompt, chat, trusted=len(prefix_host_ids) * self.cache.block_size)
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens; the context holds {self.max_model_len} including at least one "
                f"generated token: shorten the prompt")
        room = self.max_model_len - len(ids)
        if params.max_tokens > room:
            params = SamplingParams(**{**params.__dict__, "max_tokens": room})
        seq = Sequence(ids, params, request_id=request_id, prefix_host_ids=list(prefix_host_ids),
                       prompt_state=prompt_state)
        if self._admit_blocks(seq) > self.cache.blocks.num_device_blocks:
            raise PromptTooLongError(
                f"request needs {self._admit_blocks(seq)} device blocks but the whole device cache holds "
                f"{self.cache.blocks.num_device_blocks}: shorten the prompt, lower max_tokens or give the cache "
                f"more blocks")
        self._generators[seq.seq_id] = make_generator(params, self.device)
        seq.counters_at_start = self._counters()
        self.scheduler.add(seq)
        return seq

    def _encode(self, prompt: str | list[int], chat: bool, trusted: int = 0) -> list[int]:
        """Token ids of a prompt; given as ids, checked against the vocabulary, but for the first
        ``trusted`` (a prefix whose KV is mirrored: checked when it was first computed; a
        session turn's context need not be walked again in Python every turn)."""
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
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids[trusted:]):
            raise InvalidRequestError(f"token ids must be integers in [0, {vocab})")
        return ids

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, seq: Sequence, error: Exception | None = None) -> None:
        """Finish ``seq`` now (finish reason "abort"), freeing its KV; ``error``: why (kept on it)."""
        if seq.status is not Status.FINISHED:
            seq.error = error
            self.scheduler.finish(seq, "abort")

    # ------------------------------------------------------------ stepping

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Run this step's batches (the decode batch, then prefill segments), each scheduled,
        run, then post-processed; returns the sequences finished now. A failure that belongs to
        some sequences (a prefill segment, a row's sampling, its stop strings) finishes those
        with ``error`` set (finish reason "error"); the others go on. With overlapped decode
        (module doc), the tokens post-processed are those of the decode step launched in the
        call before, and this call's decode step is left in flight."""
        finished = []
        t = time.perf_counter()
        batches = self.scheduler.schedule()
        if self.trace is not None:
            self.trace.note("schedule", len(batches), t)
        flight, self._in_flight = self._in_flight, None
        if flight is not None:
            if self._continues(flight, batches):
                return self._step_overlapped(flight, batches[0])
            finished += self._land(flight)  # the batch changed: as without overlap, from the tokens read
            batches = self.scheduler.schedule()
        for batch in batches:
            t0 = time.perf_counter()
            # cycle boundaries run so far: the trace counts each batch's (nothing to do untraced)
            cycles = getattr(self.policy, "cycles", 0) if self.trace is not None else 0
            if len(batches) == 1 and isinstance(batch, DecodeBatch) and self._overlaps(batch.seqs):
                try:
                    self._in_flight = self._launch(batch, None, t0, cycles)
                except Exception as exc:
                    finished += self.scheduler.fail(batch.seqs, exc)
                continue
            try:
                logits = self.runner.run(batch)
            except Exception as exc:  # a prefill segment is one sequence's; a decode batch, its rows'
                finished += self.scheduler.fail(batch.seqs, exc)
                continue
            if logits is None:  # a prefill segment short of its prompt's end
                self._timed(batch, t0, cycles)
                continue
            tokens, failed = self._sample(batch.seqs, logits)
            self._timed(batch, t0, cycles)
            for i, exc in failed.items():
                finished += self.scheduler.fail([batch.seqs[i]], exc)
            ok = [i for i in range(len(tokens)) if i not in failed]
            t = time.perf_counter()
            finished += self.scheduler.postprocess([batch.seqs[i] for i in ok], [tokens[i] for i in ok])
            if self.trace is not None:
                self.trace.note("postprocess", len(ok), t)
        return finished

    # ------------------------------------------------------------ overlapped decode

    def _overlaps(self, seqs: list[Sequence]) -> bool:
        """Whether a decode batch of ``seqs`` may be left in flight: greedy rows without
        penalties (their token is the logits' argmax, taken on the device), no hook acting."""
        return self.overlap_decode and all(
            s.params.greedy and not s.params.penalized and not any(h.acts_on(s) for h in self.hooks) for s in seqs)

    def _continues(self, flight: InFlight, batches: list[Batch]) -> bool:
        """This step is the decode batch in flight again, and nothing else."""
        return (len(batches) == 1 and isinstance(batches[0], DecodeBatch)
                and [s.seq_id for s in batches[0].seqs] == [s.seq_id for s in flight.batch.seqs]
                and self._overlaps(batches[0].seqs))

    def _step_overlapped(self, flight: InFlight, batch: DecodeBatch) -> list[Sequence]:
        """Launch ``batch`` with the tokens in flight as its input, then read and post-process
        them; the new step stays in flight."""
        t0 = time.perf_counter()
        cycles = getattr(self.policy, "cycles", 0) if self.trace is not None else 0
        try:
            launched, error = self._launch(batch, flight.tokens, t0, cycles), None
        except Exception as exc:  # the step in flight is good: its tokens land, then its rows fail
            launched, error = None, exc
        self._in_flight = launched  # in flight while the step before lands (a sequence finishing waits for it)
        finished = self._land(flight)
        if error is not None:
            finished += self.scheduler.fail([s for s in batch.seqs if s.status is not Status.FINISHED], error)
        return finished

    def _launch(self, batch: DecodeBatch, fed: torch.Tensor | None, t0: float, cycles: int) -> InFlight:
        """Run the decode batch (``fed``: its input tokens on the device) and take each row's
        greedy token on the device, copied to the host without waiting for it."""
        logits = self.runner.run(batch, fed)
        tokens = logits.argmax(dim=-1)
        ready = None
        if self.device.type == "cuda":
            if self._token_buffers is None:
                self._token_buffers = torch.empty(2, self.config.scheduler.max_num_seqs, dtype=torch.int64,
                                                  pin_memory=True)
                self._token_events = [torch.cuda.Event(), torch.cuda.Event()]
            # the other row is the step in flight's; this one's last step has landed
            host, ready = self._token_buffers[self._flip, : len(batch.seqs)], self._token_events[self._flip]
            self._flip ^= 1
            host.copy_(tokens, non_blocking=True)
            ready.record()
        else:
            host = tokens.cpu()
        self._timed(batch, t0, cycles)
        return InFlight(batch, tokens, host, ready)

    def _land(self, flight: InFlight) -> list[Sequence]:
        """Read a step in flight's tokens and post-process them; rows whose sequence finished
        meanwhile (on the step before's token, or aborted) are dropped."""
        t = time.perf_counter()
        if flight.ready is not None:
            flight.ready.synchronize()
        tokens = flight.host.tolist()
        seqs = flight.batch.seqs
        live = [i for i, s in enumerate(seqs) if s.status is Status.DECODE]
        waited = time.perf_counter() - t
        for i in live:
            seqs[i].decode_s += waited
        finished = self.scheduler.postprocess([seqs[i] for i in live], [tokens[i] for i in live])
        if self.trace is not None:
            self.trace.note("land", len(live), t)
        return finished

    def _timed(self, batch: Batch, t0: float, cycles: int) -> None:
        batch.add_time(time.perf_counter() - t0)
        if self.trace is not None:  # engine/trace.py
            if isinstance(batch, DecodeBatch):  # with the cycle boundaries it ran
                self.trace.note("decode", len(batch.seqs), t0, 0.0, getattr(self.policy, "cycles", 0) - cycles,
                                *(round(x, 6) for x in self.runner.decode_host_s))
            else:
                self.trace.note("prefill", [batch.seq.seq_id, batch.seq.num_cached], t0, least=0.0)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int | None], dict[int, Exception]]:
        """One token per sequence from logits [n, V], and the rows whose sampling failed; the
        hooks see the logits first and may override the tokens."""
        for hook in self.hooks:
            for seq, row in zip(seqs, logits):
                hook.observe(seq, row)
        failed: dict[int, Exception] = {}
        tokens = sample(logits, [s.params for s in seqs], [self._generators[s.seq_id] for s in seqs],
                        on_error=failed.__setitem__, outputs=[s.output_ids for s in seqs])
        for hook in self.hooks:
            tokens = [t if t is None else hook.override(seq, t) for seq, t in zip(seqs, tokens)]
        return tokens, failed

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
                self.runner.attention.plan_prefill(seq.seq_id, start, end)
                tokens = torch.tensor(ids[start:end], device=self.device)
                hidden = self.model(tokens, torch.arange(start, end, device=self.device), self.runner.attention)
                self.cache.commit([seq.seq_id], [end - start])
                yield start, self.model.logits(hidden)
        finally:
            self.cache.release(seq.seq_id)

    def generate(self, prompts: Iterable[str | list[int]], params: SamplingParams | None = None,
                 chat: bool = False) -> list[Completion]:
        seqs = [self.add_request(p, params, chat=chat) for p in prompts]
        while any(s.status is not Status.FINISHED for s in seqs):
            self.step()
        failed = next((s for s in seqs if s.error is not None), None)
        if failed is not None:
            raise failed.error
        return [Completion(s.request_id, s.prompt_ids, s.output_ids, s.text, s.finish_reason, s.prefill_s,
                           s.decode_s, s.kv) for s in seqs]
