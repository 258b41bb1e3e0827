"""The HTTP contract, written once: pydantic models of every request and response of lsa-serve.

The server (cluster/ingress.py) validates bodies with them, the Python client
(cluster/client.py) builds and reads bodies with them, and the test double
(tests/test_client.py) answers with them. Imports pydantic only (no Ray, no torch).

    POST   /v1/completions        CompletionRequest      -> Completion | SSE of Completion chunks
    POST   /v1/chat/completions   ChatCompletionRequest  -> ChatCompletion | SSE of ChatCompletionChunk
    GET    /v1/models[/{id}]                             -> ModelList | Model
    POST   /v1/sessions           SessionCreate          -> SessionCreated   (cluster/protocol_sessions.py)
    POST   /v1/sessions/{id}/ask  SessionAsk             -> SessionAnswer
    DELETE /v1/sessions/{id}                             -> SessionDeleted
    errors                                               -> ErrorResponse {"error": {message, type, param, code}}
    batch files (lsa batch)       BatchRequestLine in, BatchOutputLine out (cluster/batch_openai.py)

Requests are strict (OpenAI's types: no "0.5" for a number) and closed: a field this server
does not know is a 400 naming it, and an OpenAI field it does not implement (``tools``,
``response_format``, ...) is a 400 that says so, never silently ignored. Responses are
open (``extra="ignore"`` when read), so that a client keeps working with a newer server.

Defaults, as OpenAI's: ``temperature`` 1.0 and ``top_p`` 1.0 (sampling; give 0 for greedy),
``n`` 1; no ``max_tokens`` on a chat request means up to the model's context or EOS; a
completion request without ``max_tokens`` gets 16 tokens. Session turns (``/v1/sessions``,
this server's own API) are greedy unless a temperature is given.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_N = 16  # choices per request (each is a sequence on a worker)
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_TOP_LOGPROBS = 20  # chat; completions allow 5 (OpenAI's limits)
MAX_SEED = (1 << 63) - 1
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# OpenAI parameters this server does not implement: a request that sets one (to anything but
# null or its no-op value) is a 400 naming it.
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"}), "logit_bias": (None, {}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "verbosity": (None,), "service_tier": (None, "auto", "default"),
    "store": (None, False), "metadata": (None, {}), "best_of": (None, 1), "echo": (None, False),
    "suffix": (None, ""), "min_p": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
}


class ProtocolError(ValueError):
    """A body that does not follow the contract: ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def loc_name(loc: tuple) -> str | None:
    """A pydantic location as OpenAI writes a param: ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "float", "bool", "none") or "[" in str(part):
            continue  # the union member pydantic tried, not a field
        else:
            out += ("." if out else "") + str(part)
    return out or None


def parse(model: type[BaseModel], body: Any) -> BaseModel:
    """``body`` (decoded JSON or msgpack) as ``model``, or a ``ProtocolError`` naming the field."""
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object", None, "invalid_type")
    check_unsupported(body)
    try:  # an unsupported parameter left here has its no-op value: it changes nothing
        return model.model_validate({k: v for k, v in body.items() if k not in UNSUPPORTED})
    except ValidationError as exc:
        # the deepest location is the most specific (a union's member that came closest)
        first = max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))
        param = loc_name(tuple(first["loc"]))
        if first["type"] == "extra_forbidden":
            raise ProtocolError(f"unknown parameter '{param}'", param, "unknown_parameter") from None
        if first["type"] == "missing":
            raise ProtocolError(f"'{param}' is required", param, "missing_required_parameter") from None
        message = first["msg"].removeprefix("Value error, ")
        raise ProtocolError(f"{param}: {message}" if param else message, param, "invalid_value") from None


def check_unsupported(body: dict) -> None:
    """A 400 for an OpenAI parameter this server does not implement, set to something that matters."""
    for name, harmless in UNSUPPORTED.items():
        if name in body and not any(body[name] == h and type(body[name]) is type(h) for h in harmless):
            raise ProtocolError(f"'{name}' is not supported by lsa-serve", name, "unsupported_parameter")


class Request(BaseModel):
    """A request body: closed and strictly typed."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Reply(BaseModel):
    """A response body: read leniently (a newer server may add fields)."""

    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------- sampling


class StreamOptions(Request):
    include_usage: bool = False


class Sampling(Request):
    """What OpenAI requests and session turns share."""

    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)  # an extension, as vLLM's: 0 is no limit
    seed: Optional[int] = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    stop: Optional[Union[str, list[str]]] = None
    ignore_eos: Optional[bool] = None  # an extension, as vLLM's
    # OpenAI's: lower the logits of tokens already generated, once (presence) or per use (frequency)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stop

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class OpenAIRequest(Sampling):
    model: Optional[str] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = Field(None, min_length=1, max_length=256)  # pins a conversation (a session key)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _consistent(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def token_limit(self) -> Optional[int]:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class CompletionRequest(OpenAIRequest):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("one prompt per request (send a batch as separate requests or use lsa batch)")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        if isinstance(prompt, list) and any(t < 0 for t in prompt):
            raise ValueError("token ids are non-negative integers")
        return prompt


class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def num_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None


# ------------------------------------------------------------------------------- answers


class PromptTokensDetails(Reply):
    cached_tokens: int = 0  # prompt tokens whose KV was reused (a session's, or a held prefix)


class Usage(Reply):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(Reply):
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: Optional[list[dict[str, float]]] = None
    text_offset: list[int] = []


class CompletionChoice(Reply):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class Completion(Reply):
    """A completion, and (``object`` ``text_completion`` too, as OpenAI's) each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(Reply):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(Reply):
    content: Optional[list[TokenLogprob]] = None


class AssistantMessage(Reply):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None


class ChatChoice(Reply):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletion(Reply):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(Reply):
    role: Optional[str] = None
    content: Optional[str] = None


class ChunkChoice(Reply):
    index: int
    delta: Delta
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(Reply):
    """One SSE event of a streamed chat; with ``include_usage`` the last has no choices and
    the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class Model(Reply):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "lsa-serve"
    max_model_len: Optional[int] = None


class ModelList(Reply):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(Reply):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(Reply):
    error: ErrorDetail


__all__ = [name for name in dir() if name[0].isupper() and not name.startswith("Optional")] + [
    "parse", "check_unsupported", "loc_name"]
