"""A request as it moves through the engine: prompt, generated tokens, status and timing."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from engine.sampling import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted: no cache reserved yet
    PREFILL = "prefill"  # admitted, prompt partly in the cache
    DECODE = "decode"  # prompt in the cache, generating
    FINISHED = "finished"


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_cached: int = 0  # tokens whose K/V are in the cache (vLLM's num_computed_tokens)
    text: str = ""
    text_offsets: tuple[int, int] = (0, 0)  # output tokens: where the last decode window began, and its end
    finish_reason: str | None = None  # stop, length, abort (cancelled), error (``error`` set)
    error: Exception | None = None  # why the engine failed this sequence (alone)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv: dict = field(default_factory=dict)  # accounting snapshot taken when the sequence finishes
    counters_at_start: dict = field(default_factory=dict)  # the engine's copy and policy counters when added
    prefix_host_ids: list[int] = field(default_factory=list)  # session blocks already mirrored (not prefilled)
    keep_host_blocks: int = 0  # leading host blocks a session keeps when the sequence finishes
    kept_host_ids: list[int] = field(default_factory=list)  # ... filled in when it finishes
    prompt_state: object | None = None  # a PromptState: the prompt was prefilled elsewhere (engine/prompt_state.py)

    def __post_init__(self):
        if not self.request_id:
            self.request_id = f"req-{self.seq_id}"

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def max_len(self) -> int:
        """Tokens the cache must hold at most: the prompt and every generated token but the last."""
        return self.prompt_len + self.params.max_tokens - 1

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]


@dataclass(frozen=True)
class Completion:
    """What a finished request returns."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    prefill_s: float
    decode_s: float
    kv: dict

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.token_ids) - 1) / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"request_id": self.request_id, "text": self.text, "token_ids": self.token_ids,
                "num_prompt_tokens": len(self.prompt_ids), "num_generated_tokens": len(self.token_ids),
                "finish_reason": self.finish_reason, "prefill_s": round(self.prefill_s, 4),
                "decode_s": round(self.decode_s, 4),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2), "kv": self.kv}
