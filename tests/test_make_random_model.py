"""benchmarks/make_random_model.py: a random model directory that the normal loader reads (config,
safetensors, SmolLM2 tokenizer), that transformers reads as the same model, that generates."""
import json

import pytest
import torch

from benchmarks.make_random_model import make_random_model
from engine.config import EngineConfig, SchedulerConfig
from engine.llm import LLMEngine
from engine.sampling import SamplingParams
from engine.weights import load_state_dict, resolve_model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("random-models")
    one = make_random_model(root / "one", "tiny", seed=7, dtype="fp32", device="cpu", layers=2, max_position=4096)
    sharded = make_random_model(root / "sharded", "tiny", seed=7, dtype="fp32", device="cpu", layers=2,
                                max_position=4096, shard_bytes=1 << 20, tokenizer=str(root / "one"))  # its files
    return one, sharded


def test_files_config_and_tokenizer(model_dirs):
    one, sharded = model_dirs
    assert one["files"] == ["model.safetensors"] and len(sharded["files"]) > 1
    raw = json.loads(open(f"{one['dir']}/config.json").read())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(one["dir"])
    assert raw["vocab_size"] == len(tokenizer) == one["vocab_size"] == 49152  # the SmolLM2 tokenizer's size
    assert raw["num_hidden_layers"] == 2 and raw["max_position_embeddings"] == 4096
    assert raw["eos_token_id"] == tokenizer.eos_token_id and tokenizer.chat_template
    again = AutoTokenizer.from_pretrained(sharded["dir"])  # from the first one's files: the same tokenizer
    assert again.get_vocab() == tokenizer.get_vocab() and again.chat_template == tokenizer.chat_template
    index = json.loads(open(f"{sharded['dir']}/model.safetensors.index.json").read())
    assert sorted(set(index["weight_map"].values())) == sharded["files"]


def test_shards_hold_the_same_weights_as_one_file(model_dirs):
    one, sharded = model_dirs
    a, b = (resolve_model(m["dir"]) for m in model_dirs)
    from engine.weights import load_config

    state_a, state_b = load_state_dict(a, load_config(a)), load_state_dict(b, load_config(b))
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert torch.equal(state_a["model.norm.weight"], torch.ones(128))
    q = state_a["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std().item() - 128 ** -0.5) < 0.01  # N(0, 1 / fan_in)


def test_loads_through_the_engine_and_matches_transformers(model_dirs):
    one, _ = model_dirs
    engine = LLMEngine.from_config(EngineConfig(model=one["dir"], device="cpu", dtype="fp32",
                                                scheduler=SchedulerConfig(max_model_len=1024)))
    out = engine.generate(["The lighthouse keeper"], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert len(out.token_ids) == 6 and isinstance(out.text, str)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(one["dir"], torch_dtype=torch.float32).eval()
    ids = engine.tokenizer.encode("The lighthouse keeper")
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    got = torch.cat([logits for _, logits in engine.prompt_logits(ids)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
