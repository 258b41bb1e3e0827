"""Bad input gets a typed error whose message says what to do; never a crash or a hang."""
import json
import shutil

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.errors import (CacheFullError, InvalidRequestError, LSAError, ModelFormatError, ModelNotFoundError,
                           PromptTooLongError, SessionBusy, SessionEvicted, SessionNotFound, StoreUnavailable,
                           UnsupportedModelError, http_error)
from engine.llm import LLMEngine
from engine.loader import load_model, random_model
from engine.sampling import SamplingParams
from engine.weights import load_config, resolve_model

TINY = ModelConfig(architecture="llama", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=1,
                   num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64, eos_token_ids=(2,))


@pytest.fixture(scope="module")
def engine():
    cfg = EngineConfig(cache=CacheConfig(block_size=16, num_device_blocks=8),
                       scheduler=SchedulerConfig(max_num_seqs=2, prefill_chunk=16))
    return LLMEngine(random_model(TINY, "cpu", torch.float32), cfg)


def _hf_dir(tmp_path, **overrides):
    import transformers

    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    if overrides:
        raw = json.loads((path / "config.json").read_text())
        raw.update(overrides)
        (path / "config.json").write_text(json.dumps(raw))
    return path


def test_unknown_model_name():
    with pytest.raises(ModelNotFoundError, match="embedded names: smollm2-135m"):
        resolve_model("no-such-model")


def test_path_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match="neither a .gguf file nor a Hugging Face model directory"):
        resolve_model(str(tmp_path / "notes.txt"))


def test_unsupported_architecture(tmp_path):
    path = _hf_dir(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="dense GQA Llama family"):
        load_config(resolve_model(str(path)))


def test_unsupported_rope_scaling(tmp_path):
    path = _hf_dir(tmp_path, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        load_config(resolve_model(str(path)))


def test_config_with_missing_field(tmp_path):
    path = _hf_dir(tmp_path)
    raw = json.loads((path / "config.json").read_text())
    del raw["hidden_size"]
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFormatError, match="hidden_size"):
        load_config(resolve_model(str(path)))


def test_truncated_safetensors(tmp_path):
    path = _hf_dir(tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    source = resolve_model(str(path))
    with pytest.raises(ModelFormatError, match="truncated or corrupt"):
        load_model(source, "cpu", torch.float32)


def test_gguf_truncated_and_corrupt(tmp_path):
    try:
        source = resolve_model("smollm2-135m")
    except ModelNotFoundError:
        pytest.skip("embedded model not installed")
    truncated = tmp_path / "truncated.gguf"
    with open(source.path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(5_000_000))  # header intact, tensor data cut off
    with pytest.raises(ModelFormatError, match="re-copy or reinstall"):
        load_config(resolve_model(str(truncated)))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"NOTAGGUF" + bytes(range(256)) * 100)
    with pytest.raises(ModelFormatError):
        load_config(resolve_model(str(corrupt)))
    copied = tmp_path / "copy"
    copied.mkdir()
    shutil.copy(source.path, copied / "m.gguf")
    assert resolve_model(str(copied)).path.name == "m.gguf"  # a directory with one .gguf works too


def test_empty_prompt(engine):
    for prompt in ("", "   ", []):
        with pytest.raises(InvalidRequestError, match="empty"):
            engine.add_request(prompt)


def test_prompt_longer_than_context(engine):
    with pytest.raises(PromptTooLongError, match="shorten the prompt"):
        engine.add_request(list(range(3, 50)) * 2)  # 94 tokens > 64


def test_max_tokens_clamped_to_context(engine):
    seq = engine.add_request(list(range(3, 43)), SamplingParams(max_tokens=1000, ignore_eos=True))
    while engine.has_work():
        engine.step()
    assert len(seq.prompt_ids) + len(seq.output_ids) == 64 and seq.finish_reason == "length"


def test_request_larger_than_the_cache_is_final():
    cfg = EngineConfig(cache=CacheConfig(block_size=16, num_device_blocks=2))
    small = LLMEngine(random_model(TINY, "cpu", torch.float32), cfg)
    with pytest.raises(PromptTooLongError, match="more blocks") as never:  # can never fit: not retryable
        small.add_request(list(range(3, 40)), SamplingParams(max_tokens=10))
    assert never.value.kind == "final" and http_error(never.value).status == 400


def test_bad_token_ids_and_sampling(engine):
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request([1, 2, 999])
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(stop=("",))):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)


@pytest.mark.parametrize("param,value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", "8"), ("max_tokens", True), ("max_tokens", 10**12),
    ("temperature", -0.1), ("temperature", "hot"), ("temperature", float("nan")), ("temperature", None),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", "abc"),
    ("top_k", 1.5), ("top_k", "abc"), ("top_k", -1), ("top_k", False),
    ("seed", "abc"), ("seed", 2**70), ("seed", 1.0),
    ("stop", [1]), ("stop", 123), ("stop", [""]), ("stop", ["x"] * 17), ("stop", {"a": 1}),
    ("ignore_eos", "yes"),
    ("presence_penalty", 2.5), ("presence_penalty", "x"), ("frequency_penalty", -3), ("frequency_penalty", float("inf")),
])
def test_every_sampling_param_is_checked_and_named(param, value):
    """A bad type or range of any parameter is a FINAL error naming it (OpenAI's ``param``)."""
    with pytest.raises(InvalidRequestError) as bad:
        SamplingParams(**{param: value})
    assert bad.value.param == param and param in bad.value.message
    answer = http_error(bad.value)
    assert answer.status == 400 and answer.body()["error"]["param"] == param


def test_error_kinds_map_to_http_once():
    cases = [(PromptTooLongError("long", param="max_tokens"), 400, "context_length_exceeded"),
             (SessionNotFound("gone"), 404, "session_not_found"), (SessionEvicted("lru"), 404, "session_evicted"),
             (SessionBusy("busy"), 409, "session_busy"), (CacheFullError("full", retry_after_s=2.5), 429, "overloaded"),
             (StoreUnavailable("down"), 503, "unavailable"), (KeyError("bug"), 500, "internal_error")]
    for exc, status, code in cases:
        answer = http_error(exc)
        assert (answer.status, answer.code) == (status, code), exc
        assert answer.body()["error"]["message"]
    assert http_error(CacheFullError("full", retry_after_s=2.5)).headers == {"Retry-After": "3"}
    assert "Retry-After" in http_error(StoreUnavailable("down")).headers

    class Wrapped(Exception):  # as Ray wraps a remote error: the cause decides
        cause = SessionEvicted("evicted")
    assert http_error(Wrapped()).status == 404

    class ActorDiedError(Exception):  # a Ray error by name: a dependency is down
        pass
    assert http_error(ActorDiedError()).status == 503


def test_all_errors_share_a_base():
    for cls in (ModelNotFoundError, ModelFormatError, UnsupportedModelError, InvalidRequestError, CacheFullError):
        assert issubclass(cls, LSAError)
