"""Our Llama-family runtime against Hugging Face transformers on small random models.

Tolerance (fp32 on CPU): max |logit difference| < 2e-4, with logits of order 1; the two
implementations differ only in summation order.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from engine.hooks import LogitsObserver
from engine.llm import LLMEngine  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.weights import resolve_model  # noqa: E402

ATOL = 2e-4
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
              max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

CASES = {
    "llama3-gqa-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=5000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "llama2-mha-bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2-gqa-bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6)),
    "mistral-gqa": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, sliding_window=None)),
}


def _hf_model(name, tmp_path_factory):
    cfg_cls, model_cls, extra = CASES[name]
    torch.manual_seed(hash(name) % 1000)
    config = cfg_cls(**COMMON, **extra)
    hf = model_cls(config).eval()
    with torch.no_grad():  # random biases: HF initialises them to zero, which would hide bugs
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    hf, path = _hf_model(request.param, tmp_path_factory)
    ours = load_model(resolve_model(str(path)), "cpu", torch.float32)
    return hf, ours


def _engine(model, block_size=16, chunk=24, seqs=4, **engine):
    cfg = EngineConfig(cache=CacheConfig(block_size=block_size, num_device_blocks=64),
                       scheduler=SchedulerConfig(max_num_seqs=seqs, prefill_chunk=chunk), **engine)
    return LLMEngine(model, cfg)


def _sampled_logits(engine, prompts, max_tokens=6):
    """Prefill and continuous-batch decode of ``prompts``: every sampled row's logits, fp32 on the CPU."""
    recorded = []
    engine.hooks.append(LogitsObserver(lambda seq, row: recorded.append(row.float().cpu().clone())))
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    while engine.has_work():
        engine.step()
    return torch.stack(recorded)


def test_prefill_logits_match(pair):
    hf, ours = pair
    engine = _engine(ours)
    ids = torch.randint(3, 96, (77,)).tolist()  # 77 tokens: 4 segments, 5 blocks, partial tail
    got = torch.cat([logits for _, logits in engine.prompt_logits(ids)])
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < ATOL
    assert engine.cache.blocks.device[0].num_used == 0  # prompt_logits released its blocks


def test_continuous_batch_decode_matches(pair):
    """Three sequences of different lengths join at different steps and decode together;
    each step's logits equal transformers' full forward over the same tokens."""
    hf, ours = pair
    engine = _engine(ours, seqs=3)
    recorded = {}
    engine.hooks.append(LogitsObserver(lambda seq, row: recorded.setdefault(seq.seq_id, []).append(row.clone())))
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (5, 40, 70)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    batch_sizes = []
    while engine.has_work():
        batch_sizes.append(len(engine.scheduler.schedule.__self__.running))
        engine.step()
    assert max(batch_sizes) == 3  # they really ran together
    for seq in seqs:
        full = seq.prompt_ids + seq.output_ids
        with torch.no_grad():
            want = hf(torch.tensor([full])).logits[0].float()
        got = torch.stack(recorded[seq.seq_id])  # one row per sampled token
        positions = range(seq.prompt_len - 1, len(full) - 1)
        assert got.shape[0] == len(seq.output_ids) == 12
        assert (got - want[list(positions)]).abs().max().item() < ATOL
        assert seq.output_ids == want[list(positions)].argmax(-1).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)")
def test_cuda_bf16_matches(pair):
    """The same model in bf16 on CUDA (Triton kernels) against transformers in fp32 on CPU:
    relative L2 error of the logits < 2e-2, and the same top-1 token wherever transformers'
    top-2 margin exceeds twice the largest logit error of that row (closer calls may flip)."""
    hf, ours = pair
    model = ours.to(device="cuda", dtype=torch.bfloat16)
    model.model.rotary.inv_freq = model.model.rotary.inv_freq.float()
    cfg = EngineConfig(device="cuda", cache=CacheConfig(block_size=16, num_device_blocks=64),
                       scheduler=SchedulerConfig(max_num_seqs=3, prefill_chunk=24))
    engine = LLMEngine(model, cfg)
    recorded = {}
    engine.hooks.append(LogitsObserver(lambda seq, row: recorded.setdefault(seq.seq_id, []).append(row.float().cpu())))
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (5, 40, 70)]
    seqs = [engine.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True)) for p in prompts]
    while engine.has_work():
        engine.step()
    for seq in seqs:
        full = seq.prompt_ids + seq.output_ids
        with torch.no_grad():
            want = hf(torch.tensor([full])).logits[0].float()[seq.prompt_len - 1:len(full) - 1]
        got = torch.stack(recorded[seq.seq_id])
        assert (got - want).norm() / want.norm() < 2e-2
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * (got - want).abs().amax(-1)
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    ours.to(device="cpu", dtype=torch.float32)
    ours.model.rotary.inv_freq = ours.model.rotary.inv_freq.float()


def test_fused_projections_give_the_unfused_logits():
    """q|k|v and gate|up fused into one Linear each (what the loader does) change no logit beyond
    fp32 rounding: prefill and continuous-batch decode of the same random model (biases
    everywhere, GQA), fused and not, through the engine."""
    from engine.config import ModelConfig
    from engine.loader import random_model

    cfg = ModelConfig(architecture="qwen2", vocab_size=96, hidden_size=64, intermediate_size=112, num_layers=2,
                      num_heads=8, num_kv_heads=2, head_dim=16, qkv_bias=True, mlp_bias=True,
                      max_position_embeddings=512)
    plain, fused = random_model(cfg, "cpu", torch.float32, seed=5, fuse=False), random_model(cfg, "cpu", torch.float32,
                                                                                              seed=5)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert not hasattr(attn, "q_proj") and attn.qkv_proj.weight.shape == (8 * 16 + 2 * 2 * 16, 64)
    assert not hasattr(mlp, "up_proj") and mlp.gate_up_proj.bias.shape == (2 * 112,)
    assert plain.model.layers[0].self_attn.qkv_proj is None
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (9, 40)]
    logits = []
    for model in (plain, fused):
        logits.append(_sampled_logits(_engine(model, seqs=2), prompts))
    scale = logits[0].abs().max().item()
    assert logits[0].shape == (12, 96) and (logits[0] - logits[1]).abs().max().item() <= 1e-5 * max(1.0, scale)


def test_fused_decode_gives_the_unfused_logits(monkeypatch):
    """The decode path with the norms, SiLU and residual adds inside the projections
    (kernels.decode_linear; Triton's interpreter on the CPU) against the separate kernels, both on
    the Triton backend: prefill and continuous-batch decode of the same random model (GQA, no
    biases), logits equal to fp32 rounding; a model with biases keeps the separate kernels."""
    from engine.config import ModelConfig
    from engine.loader import random_model
    from kernel_cases import CUDA  # sets TRITON_INTERPRET on CPU

    device = "cuda" if CUDA else "cpu"
    monkeypatch.setenv("LSA_KERNELS", "triton")
    cfg = ModelConfig(architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=112, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (9, 40)]
    logits = []
    for fused in ("0", "1"):
        monkeypatch.setenv("LSA_FUSED_DECODE", fused)
        model = random_model(cfg, device, torch.float32, seed=11)
        probe = torch.zeros(2, 64, device=device)
        assert model.decode_fused_for(probe) == (fused == "1")
        assert not model.decode_fused_for(torch.zeros(33, 64, device=device))  # prefill-sized: cuBLAS
        logits.append(_sampled_logits(_engine(model, seqs=2, device=device), prompts))
    scale = logits[0].abs().max().item()
    assert logits[0].shape == (12, 96) and (logits[0] - logits[1]).abs().max().item() <= 1e-5 * max(1.0, scale)
    biased = random_model(ModelConfig(**{**cfg.__dict__, "qkv_bias": True}), device, torch.float32, seed=11)
    assert not biased.decode_fused_for(torch.zeros(2, 64, device=device))


def test_decode_gemv_gives_the_cublas_logits(monkeypatch):
    """``LSA_DECODE_GEMV=1``: a decode batch's q|k|v (with the rotary), o, gate|up (with the SwiGLU),
    down and LM-head projections through the plain Triton GEMV (Triton's interpreter on the CPU, fp16; bf16 on CUDA) give the logits of the
    Linears to half-precision rounding, through the engine (prefill keeps the Linears); the
    switch reaches every layer and is on by default."""
    import kernels.projection as projection
    from engine.config import ModelConfig
    from engine.loader import random_model
    from kernel_cases import CUDA  # sets TRITON_INTERPRET on CPU

    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float16)
    monkeypatch.setenv("LSA_KERNELS", "triton")
    calls = []
    real = projection.decode_gemv_triton
    monkeypatch.setattr(projection, "decode_gemv_triton",
                        lambda x, w, t, glu=False, rotary=None: calls.append((*w.shape, glu, rotary is not None))
                        or real(x, w, t, glu, rotary))
    cfg = ModelConfig(architecture="llama", vocab_size=512, hidden_size=512, intermediate_size=512, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=128, max_position_embeddings=512)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (9, 20)]
    logits = []
    for gemv in ("0", "1"):
        monkeypatch.setenv("LSA_DECODE_GEMV", gemv)
        model = random_model(cfg, device, dtype, seed=13)
        assert all(layer.mlp.gemv == layer.self_attn.gemv == (gemv == "1") for layer in model.model.layers)
        calls.clear()
        logits.append(_sampled_logits(_engine(model, seqs=2, device=device), prompts, max_tokens=4))
        # o, down and the LM head [512, 512], gate|up [1024, 512] ending with the SwiGLU, q|k|v
        # ([1024, 512] too) with the rotary
        assert set(calls) == (set() if gemv == "0" else {(512, 512, False, False), (1024, 512, True, False),
                                                          (1024, 512, False, True)})
    rel = (logits[0] - logits[1]).norm() / logits[0].norm()
    assert logits[0].shape == (8, 512) and rel < 2e-2, rel
    monkeypatch.delenv("LSA_DECODE_GEMV")
    assert random_model(cfg, "cpu", torch.float32, seed=13).decode_gemv  # on by default (a no-op off CUDA)
