"""Golden-block traces and the learned indexer on a tiny random model (CPU)."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from cli import main
from engine.config import CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig
from engine.errors import InvalidRequestError, LSAError
from engine.policies.indexer import IndexerFormatError, IndexerNotFoundError, LearnedIndexer
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.model import fuse_projections
from engine.sampling import SamplingParams
from lab.traces import TraceConfig, TraceJob, dump_traces, load_traces, read_manifest
from lab.train_indexer import TrainConfig, cross_layer_scores, recall_report, train_indexer
from tiny import TINY  # noqa: E402

TRACE = TraceConfig(block_size=8, cycle=8, window=4, target_layers=(1, 2), top_p=0.6, min_votes=2)
PROMPT, STEPS = 160, 32
TOPICS, TOPIC_TOKENS = 4, 15  # tokens 4..63 in 4 topics of 15


def tiny_model():
    """A random model with planted content-based attention: each token's embedding carries its
    topic's direction, and every head's q and k read it into the slowest rotary dimensions, so a
    query attends to the keys of its own topic wherever they are (as a real model attends to the
    passage a question is about). The rest of the weights stay random."""
    model = random_model(TINY, "cpu", torch.float32, seed=3, fuse=False)  # planted in q_proj / k_proj, then fused
    directions = torch.linalg.qr(torch.randn(TINY.hidden_size, TOPICS, generator=torch.Generator().manual_seed(4)))[0]
    slow = [6, 7, 14, 15]  # the rotary pairs that barely turn over a few hundred positions
    with torch.no_grad():
        topic = (torch.arange(4, 64) - 4) // TOPIC_TOKENS
        model.model.embed_tokens.weight[4:] += 3.0 * directions[:, topic].T
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.view(-1, TINY.head_dim, TINY.hidden_size)[:, slow] = 0.7 * directions.T
    return fuse_projections(model)


def sequences(n, seed, segment=16):
    """Prompts of one-topic segments; the last 8 prompt tokens and the continuation are about one topic."""
    gen = torch.Generator().manual_seed(seed)

    def words(count):
        topic = int(torch.randint(TOPICS, (1,), generator=gen))
        return (4 + topic * TOPIC_TOKENS + torch.randint(TOPIC_TOKENS, (count,), generator=gen)).tolist()

    out = []
    for _ in range(n):
        ids = []
        while len(ids) < PROMPT - 8:
            ids += words(segment)
        out.append(ids[: PROMPT - 8] + words(8 + STEPS + 1))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: thread start-up dominates, and a shared machine punishes oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def traces(tmp_path_factory, model):
    jobs = [TraceJob("train", ids, PROMPT, f"random-{i}") for i, ids in enumerate(sequences(12, seed=1))]
    jobs += [TraceJob("eval", ids, PROMPT, f"held-out-{i}") for i, ids in enumerate(sequences(4, seed=2))]
    out = tmp_path_factory.mktemp("traces")
    dump_traces(model, jobs, TRACE, out, "tiny-random")
    return out


@pytest.fixture(scope="module")
def trained(traces, tmp_path_factory):
    torch.manual_seed(0)
    manifest = read_manifest(traces)
    train = load_traces(traces, "train")
    from engine.policies.indexer import IndexerConfig, indexer_input_scales

    q_scale, k_scale = indexer_input_scales(train)
    shape = manifest["model_shape"]
    model = LearnedIndexer(IndexerConfig(num_heads=shape["num_heads"], num_kv_heads=shape["num_kv_heads"],
                                         head_dim=shape["head_dim"], embed_dim=16, hidden_dim=32,
                                         q_scale=q_scale, k_scale=k_scale, block_size=TRACE.block_size))
    untrained = LearnedIndexer(model.config)
    untrained.load_state_dict(model.state_dict())
    losses = train_indexer(model, train, TrainConfig(epochs=25, lr=1e-2, batch_size=8), progress=False)
    path = model.save(tmp_path_factory.mktemp("indexer"))
    return model, untrained.eval().requires_grad_(False), losses, path


def test_trace_shapes_and_manifest(traces):
    manifest = read_manifest(traces)
    per_seq = (STEPS - TRACE.cycle) // TRACE.cycle + 1
    assert manifest["counts"]["train"]["samples"] == 12 * per_seq
    assert manifest["counts"]["eval"]["samples"] == 4 * per_seq
    assert manifest["model_shape"] == {"num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    samples = load_traces(traces, "eval")
    for s in samples:
        m = (PROMPT + int(s["t"])) // TRACE.block_size  # complete blocks at the boundary
        assert s["queries"].shape == (2, TRACE.window, 4, 16)
        assert s["keys"].shape == (2, m, 2, 3, 16)
        assert s["labels"].shape == s["votes"].shape == (m,) and s["labels"].dtype == torch.bool
        assert s["mass"].shape == s["recent_mass"].shape == (4, m)
        assert torch.equal(s["labels"], s["votes"] >= TRACE.min_votes)
        assert (s["keys"][:, :, :, 0] <= s["keys"][:, :, :, 2]).all()  # min <= mean <= max
        assert (s["keys"][:, :, :, 2] <= s["keys"][:, :, :, 1]).all()
    golden = sum(int(s["labels"].sum()) for s in samples) / sum(s["labels"].numel() for s in samples)
    assert 0.05 < golden < 0.8  # labels that discriminate


class CaptureAttention:
    """Full causal attention over one whole sequence, recording post-RoPE q and k per layer."""

    def __init__(self):
        self.q, self.k = {}, {}

    def __call__(self, layer, q, k, v):
        self.q[layer], self.k[layer] = q, k
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        return out[0].transpose(0, 1)


def reference_labels(capture, t, m, total, trace):
    """Golden labels for the window [t, t + N) recomputed in float64 from the captured q and k."""
    b, golden = trace.block_size, torch.zeros(m, dtype=torch.bool)
    for step in range(t, t + trace.cycle):
        pos = PROMPT + step
        votes = torch.zeros(total // b + 1, dtype=torch.long)
        for layer in range(TINY.num_layers):
            q, k = capture.q[layer][pos], capture.k[layer][: pos + 1]  # [Hq, D], [pos + 1, Hkv, D]
            k = k.repeat_interleave(TINY.num_heads // TINY.num_kv_heads, dim=1)
            p = torch.softmax(torch.einsum("hd,thd->ht", q, k) * TINY.head_dim ** -0.5, -1).mean(0)
            per_block = torch.zeros(votes.numel(), dtype=torch.float64).index_add_(0, torch.arange(pos + 1) // b, p)
            order = torch.argsort(per_block, descending=True)
            before = per_block[order].cumsum(0) - per_block[order]
            votes[order[before < trace.top_p * per_block.sum()]] += 1
        golden |= (votes >= trace.min_votes)[:m]
    return golden


def test_labels_match_float64_full_attention(model, tmp_path):
    ids = sequences(1, seed=5)[0]
    dump_traces(model, [TraceJob("eval", ids, PROMPT)], TRACE, tmp_path, "tiny-random")
    samples = load_traces(tmp_path)
    ref_model, capture = copy.deepcopy(model).double(), CaptureAttention()
    n = PROMPT + STEPS
    ref_model(torch.tensor(ids[:n]), torch.arange(n), capture)
    for s in samples:
        t = int(s["t"])
        m = s["labels"].numel()
        assert torch.equal(s["labels"], reference_labels(capture, t, m, n, TRACE)), f"boundary {t}"
        for li, layer in enumerate(TRACE.target_layers):
            keys = capture.k[layer][: m * TRACE.block_size].view(m, TRACE.block_size, 2, 16)
            summary = torch.stack([keys.amin(1), keys.amax(1), keys.mean(1)], 2)  # [M, Hkv, 3, D]
            torch.testing.assert_close(s["keys"][li].double(), summary, atol=1e-4, rtol=1e-4)
            window = capture.q[layer][PROMPT + t - TRACE.window: PROMPT + t]
            torch.testing.assert_close(s["queries"][li].double(), window, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(s["recent_mass"].double(), reference_recent_mass(capture, t, m), atol=1e-4,
                                   rtol=1e-4)


def reference_recent_mass(capture, t, m):
    """[L, m]: per layer, the head-mean attention mass of each block over the W decode steps before
    t (zeros at t = 0), recomputed in float64."""
    b, out = TRACE.block_size, torch.zeros(TINY.num_layers, m, dtype=torch.float64)
    steps = range(max(0, t - TRACE.window), t)
    for step in steps:
        pos = PROMPT + step
        for layer in range(TINY.num_layers):
            q, k = capture.q[layer][pos], capture.k[layer][: pos + 1]
            k = k.repeat_interleave(TINY.num_heads // TINY.num_kv_heads, dim=1)
            p = torch.softmax(torch.einsum("hd,thd->ht", q, k) * TINY.head_dim ** -0.5, -1).mean(0)
            per_block = torch.zeros(pos // b + 1, dtype=torch.float64).index_add_(0, torch.arange(pos + 1) // b, p)
            out[layer] += per_block[:m] / len(steps)
    return out


def test_training_lowers_loss_and_beats_untrained_recall(traces, trained):
    model, untrained, losses, _ = trained
    assert losses[-1] < 0.8 * losses[0]
    held_out = load_traces(traces, "eval")
    # ~20 blocks per sample: at 0.1 only the sink and tail fit, so compare at 0.3 and 0.5
    report = recall_report({"learned": lambda s: cross_layer_scores(model, s),
                            "untrained": lambda s: cross_layer_scores(untrained, s)}, held_out, (0.3, 0.5))
    for budget in ("0.3", "0.5"):
        assert report["learned"][budget]["recall"] > report["untrained"][budget]["recall"]
        assert report["learned"][budget]["mass_recall"] > report["untrained"][budget]["mass_recall"]


def test_load_round_trip_gives_identical_scores(traces, trained):
    model, _, _, path = trained
    loaded = LearnedIndexer.load(path)
    assert loaded.config == model.config
    for s in load_traces(traces, "eval")[:3]:
        assert torch.equal(cross_layer_scores(loaded, s), cross_layer_scores(model, s))


def test_lsa_policy_runs_the_learned_indexer(model, trained):
    _, _, _, path = trained
    config = EngineConfig(cache=CacheConfig(block_size=TRACE.block_size, num_device_blocks=128),
                          scheduler=SchedulerConfig(max_num_seqs=2, prefill_chunk=64),
                          policy=PolicyConfig(name="lsa", budget=0.2, cycle=8, target_layers=(1, 2),
                                              query_window=4, indexer=str(path), min_resident_tokens=0))
    engine = LLMEngine(model, config)
    assert isinstance(engine.policy.indexer, LearnedIndexer)
    calls = []
    score = engine.policy.indexer.score
    engine.policy.indexer.score = lambda *a: calls.append(1) or score(*a)
    done = engine.generate(sequences(2, seed=7), SamplingParams(max_tokens=30, ignore_eos=True))
    assert [len(c.token_ids) for c in done] == [30, 30]
    assert calls and engine.policy.stats()["cycles"] > 0
    assert all(c.kv["device_kv_fraction"] < 0.6 for c in done)


def test_bad_paths_give_typed_errors(tmp_path, trained, traces):
    _, _, _, path = trained
    with pytest.raises(IndexerNotFoundError, match="not a directory"):
        LearnedIndexer.load(tmp_path / "nope")
    with pytest.raises(IndexerNotFoundError, match="lacks indexer.safetensors"):
        LearnedIndexer.load(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "indexer.json").write_text((path / "indexer.json").read_text())
    (broken / "indexer.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(IndexerFormatError, match="cannot read"):
        LearnedIndexer.load(broken)
    (broken / "indexer.json").write_text("{")
    with pytest.raises(IndexerFormatError, match="not a valid indexer config"):
        LearnedIndexer.load(broken)
    other = LearnedIndexer.load(path)
    s = load_traces(traces, "eval")[0]
    with pytest.raises(IndexerFormatError, match="4 query heads, 2 KV heads, head_dim 16"):
        keys = s["keys"][0, :, :, :, :8]  # another model's head_dim
        other.score(s["queries"][0, :, :, :8], keys[:, :, 0], keys[:, :, 1], keys[:, :, 2], torch.arange(3))
    with pytest.raises(LSAError):  # through the engine, before anything runs
        LLMEngine(tiny_model(), EngineConfig(policy=PolicyConfig(name="lsa", indexer=str(tmp_path / "nope"))))
    with pytest.raises(InvalidRequestError, match="no manifest.json"):
        load_traces(tmp_path)


def test_train_indexer_cli_writes_weights_and_report(traces, tmp_path, capsys):
    assert main(["train-indexer", "--traces", str(traces), "--out", str(tmp_path), "--epochs", "2",
                 "--embed-dim", "8", "--hidden-dim", "8", "--hard-negatives", "--loss", "focal", "--quiet"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["recall"]) >= {"learned", "quest (zero-training)", "recency", "learned, untrained"}
    assert set(report["recall"]["learned"]) == {"0.05", "0.1", "0.2"}
    assert len(report["train"]["epoch_losses"]) == 2
    assert "| learned |" in capsys.readouterr().out
    LearnedIndexer.load(tmp_path)
