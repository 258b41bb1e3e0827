"""A prompt prefilled once, handed to other engines over the same model.

Prefill is dense and the same for every attention policy, so a grid that runs one prompt
under many policies (``lsa eval``) need not prefill it once per policy. ``PromptRecorder``
(a full-attention policy) records what a prefill leaves behind; ``PromptState`` carries it;
an engine given a state (``LLMEngine.add_request(..., prompt_state=...)``) writes it into its
cache instead of running the model (``write_prompt``), shows its policy the same last prompt
queries a prefill would, and samples the first token from the recorded logits:

    capture engine (full)          K, V of every layer [L, Hkv, T, D]; last W queries of the
      prefill, segment by segment  prompt's last segment [L, W, Hq, D]; logits of the last token [V]
    policy engine                  append slots, write K/V, commit (host mirror, summaries) in the
      write_prompt                 same segments as its own prefill; policy.observe_prefill per
                                   layer; after_prefill as usual

A policy engine's numbers are then those of its own prefill, bit for bit, when both use the
same model, dtype and ``prefill_chunk`` (tests/test_prompt_state.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import InvalidRequestError
from engine.hooks import LogitsObserver
from engine.policies import Policy
from engine.sampling import SamplingParams


@dataclass(frozen=True)
class PromptState:
    """What a dense prefill of ``prompt_ids`` leaves: K/V, the last queries, the next-token logits."""

    prompt_ids: tuple[int, ...]
    keys: torch.Tensor  # [L, Hkv, T, D] after rotary, the model dtype
    values: torch.Tensor  # [L, Hkv, T, D]
    queries: torch.Tensor  # [L, W, Hq, D] the last W queries of the prompt's last prefill segment
    logits: torch.Tensor  # [V] float32, predict the first generated token
    prefill_chunk: int  # the segments the prefill ran in (the last segment's length bounds W)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def last_segment(self) -> int:
        """Tokens of the prefill's last segment: a policy observes at most that many queries."""
        return self.num_tokens - (self.num_tokens - 1) // self.prefill_chunk * self.prefill_chunk

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.queries, self.logits))


class PromptRecorder(Policy):
    """Full attention that records each prompt's prefill: the last ``window`` queries of every
    layer and, once the prompt is in the cache, its K/V. ``take(seq_id)`` hands them over."""

    def __init__(self, config, num_layers: int, block_size: int, window: int):
        super().__init__(config, num_layers, block_size)
        self.prefill_window = window
        self._queries: dict[int, dict[int, torch.Tensor]] = {}
        self._done: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # after prefill

    def observes_prefill(self, layer: int) -> bool:
        return True

    def observe_prefill(self, seq_id, layer, q, keys, scale):
        self._queries.setdefault(seq_id, {})[layer] = q.clone()

    def after_prefill(self, seq_id: int) -> None:
        n = self.cache.num_tokens(seq_id)
        kv = [self.cache.gather(seq_id, layer, n) for layer in range(self.num_layers)]
        queries = self._queries.pop(seq_id)
        self._done[seq_id] = (torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv]),
                              torch.stack([queries[layer] for layer in range(self.num_layers)]))

    def take(self, seq_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, queries) of a prefilled sequence, forgotten here."""
        return self._done.pop(seq_id)

    def forget(self, seq_id: int) -> None:  # a finished sequence's record stays until taken
        self._queries.pop(seq_id, None)


def capture_prompt(engine, prompt_ids: list[int]) -> PromptState:
    """Prefill ``prompt_ids`` on ``engine`` (whose policy is a :class:`PromptRecorder`) and
    return its state. The engine runs the prompt alone and keeps nothing of it."""
    recorder = engine.policy
    if not isinstance(recorder, PromptRecorder):
        raise InvalidRequestError("capture_prompt needs an engine built with a PromptRecorder policy")
    logits: list[torch.Tensor] = []
    hook = LogitsObserver(lambda seq, row: logits.append(row.clone()))
    engine.hooks.append(hook)
    try:
        seq = engine.add_request(list(prompt_ids), SamplingParams(max_tokens=1, ignore_eos=True))
        while engine.has_work():
            engine.step()
    finally:
        engine.hooks.remove(hook)
    keys, values, queries = recorder.take(seq.seq_id)
    return PromptState(tuple(prompt_ids), keys, values, queries, logits[0], engine.config.scheduler.prefill_chunk)


def write_prompt(cache, policy: Policy, seq_id: int, state: PromptState, prefill_chunk: int,
                 scale: float) -> torch.Tensor:
    """Put a captured prompt into an admitted, empty sequence as its own prefill would leave it:
    K/V written and committed segment by segment, the policy shown the last prompt queries of
    every layer it observes. Returns the logits of the last prompt token [1, V]."""
    if prefill_chunk != state.prefill_chunk:
        raise InvalidRequestError(f"the prompt state was prefilled in segments of {state.prefill_chunk} tokens, "
                                  f"this engine prefills in {prefill_chunk}: use the same prefill_chunk")
    num_layers, n = state.keys.shape[0], state.num_tokens
    captured = state.queries.shape[1]
    window = min(policy.prefill_window, state.last_segment)
    if window > captured:
        raise InvalidRequestError(f"the policy observes the prompt's last {window} queries; the state holds "
                                  f"{captured}: capture with a window of at least {window}")
    keys = state.keys.to(cache.device)
    values = state.values.to(cache.device)
    for start in range(0, n, prefill_chunk):
        end = min(n, start + prefill_chunk)
        slots = cache.append_slots([seq_id], [end - start])
        for layer in range(num_layers):
            group_slots, offsets = slots[cache.group_of[layer]]
            cache.write(layer, keys[layer, :, start:end].transpose(0, 1), values[layer, :, start:end].transpose(0, 1),
                        group_slots, offsets)  # [T, Hkv, D]
        cache.commit([seq_id], [end - start])
    for layer in range(num_layers):
        if policy.observes_prefill(layer):
            layer_keys, _ = cache.gather(seq_id, layer, n)  # [Hkv, n, D]
            q = state.queries[layer].to(cache.device)
            policy.observe_prefill(seq_id, layer, q[q.shape[0] - window:], layer_keys, scale)
    return state.logits.to(cache.device)[None]
