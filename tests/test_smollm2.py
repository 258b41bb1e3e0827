"""The embedded default model, SmolLM2-135M-Instruct (GGUF, Q4_1), against transformers
loading the same GGUF file. Both dequantize the same weights to fp32.

Measured: max |logit difference| 6.5e-5 on a 317-token prompt (logits of order 10); we assert
< 2e-3. Greedy continuation of 32 tokens: identical.
"""
import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from engine.config import EngineConfig, SchedulerConfig  # noqa: E402
from engine.errors import ModelNotFoundError  # noqa: E402
from engine.llm import LLMEngine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.weights import resolve_model  # noqa: E402

try:
    SOURCE = resolve_model("smollm2-135m")
except ModelNotFoundError as exc:  # pragma: no cover - the test extra installs it
    pytest.skip(f"embedded model not installed: {exc}", allow_module_level=True)

TEXT = ("The lighthouse keeper kept a logbook of every ship that passed the point. " * 3 +
        "In the spring of that year the weather turned, and storms came in from the west, "
        "one after another, until the harbour was full of boats waiting for calm water. ")


@pytest.fixture(scope="module")
def engine():
    return LLMEngine.from_config(EngineConfig(scheduler=SchedulerConfig(max_num_seqs=2, prefill_chunk=128)))


@pytest.fixture(scope="module")
def hf_model():
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(SOURCE.path.parent), gguf_file=SOURCE.path.name, dtype=torch.float32).eval()


def test_logits_match_transformers(engine, hf_model):
    ids = engine.tokenizer.encode(TEXT * 4)
    assert 250 <= len(ids) <= 400, len(ids)
    got = torch.cat([logits for _, logits in engine.prompt_logits(ids)])
    with torch.no_grad():
        want = hf_model(torch.tensor([ids])).logits[0].float()
    diff = (got - want).abs().max().item()
    print(f"max |logit diff| over {len(ids)} tokens: {diff:.2e}")
    assert diff < 2e-3
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() == 1.0


def test_greedy_continuation_identical(engine, hf_model):
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": "Tell me a short story about a lighthouse."}])
    ours = engine.generate([ids], SamplingParams(max_tokens=32, ignore_eos=True))[0].token_ids
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                min_new_tokens=32, pad_token_id=2)
    assert ours == out[0, len(ids):].tolist()


def test_chat_answers_sensibly(engine):
    out = engine.generate(["What is the capital of France?"], SamplingParams(max_tokens=24), chat=True)[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
