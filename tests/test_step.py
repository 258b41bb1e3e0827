"""A step's stages: the scheduler's batches and post-processing rules, and the hooks outside the core loop."""
import pytest
import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.errors import InvalidRequestError, PromptTooLongError
from engine.hooks import LogitsObserver, score_continuation, teacher_force
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.sampling import SamplingParams
from engine.scheduler import DecodeBatch, OutputRules, PrefillSegment, Scheduler
from engine.sequence import Sequence, Status

TINY = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512, eos_token_ids=(2,))


class WordTokenizer:
    eos_token_id = 3

    def decode(self, ids):
        return " ".join(f"w{t}" for t in ids)


def test_output_rules_stop_at_eos_length_and_stop_strings():
    rules = OutputRules({2, 3}, WordTokenizer())
    seq = Sequence([9], SamplingParams(max_tokens=3))
    assert [rules.append(seq, t) for t in (7, 8, 9)] == [None, None, "length"]
    assert seq.text == "w7 w8 w9"
    seq = Sequence([9], SamplingParams(max_tokens=5))
    assert [rules.append(seq, t) for t in (7, 3)] == [None, "stop"]  # the tokenizer's EOS counts too
    seq = Sequence([9], SamplingParams(max_tokens=5, ignore_eos=True))
    assert [rules.append(seq, t) for t in (2, 2)] == [None, None]
    seq = Sequence([9], SamplingParams(max_tokens=5, stop=("w1",)))
    assert [rules.append(seq, t) for t in (7, 12)] == [None, "stop"] and seq.text == "w7 "  # cut before the stop
    seq = Sequence([9], SamplingParams(max_tokens=5, stop=("w1",)))
    assert OutputRules({2}).append(seq, 12) is None and seq.text == ""  # no tokenizer: no text, no stop strings


def test_schedule_gives_the_decode_batch_then_one_prefill_segment():
    admitted, released = [], []
    sched = Scheduler(4, prefill_chunk=5, rules=OutputRules({2}), can_admit=lambda s: True,
                      admit=admitted.append, release=released.append)
    decoding, waiting = Sequence([4] * 3, SamplingParams()), Sequence([4] * 12, SamplingParams())
    decoding.status = Status.DECODE
    sched.running.append(decoding)
    sched.add(waiting)
    batches = sched.schedule()
    assert admitted == [waiting] and waiting.status is Status.PREFILL
    assert [type(b) for b in batches] == [DecodeBatch, PrefillSegment]
    assert batches[0].seqs == [decoding] and batches[1].seq is waiting and batches[1].end == 5
    waiting.num_cached = 10
    assert sched.schedule()[1].end == 12  # the last segment stops at the prompt's end
    finished = sched.postprocess([decoding, waiting], [2, 7])  # EOS for one, a first token for the other
    assert finished == [decoding] and released == [decoding] and decoding.status is Status.FINISHED
    assert waiting.status is Status.DECODE and sched.running == [waiting]


@pytest.fixture(scope="module")
def model():
    return random_model(TINY, "cpu", torch.float32, seed=4)


def _engine(model):
    return LLMEngine(model, EngineConfig(cache=CacheConfig(block_size=16, num_device_blocks=64),
                                         scheduler=SchedulerConfig(max_num_seqs=3, prefill_chunk=32)))


def test_score_continuation_equals_the_prefill_of_the_whole_text(model):
    gen = torch.Generator().manual_seed(0)
    context = torch.randint(4, 64, (70,), generator=gen).tolist()
    continuation = torch.randint(4, 64, (20,), generator=gen).tolist()
    engine = _engine(model)
    got = score_continuation(engine, context, continuation).double()  # decode path, one token a step
    logits = torch.cat([lg for _, lg in _engine(model).prompt_logits(context + continuation)]).double()
    want = torch.log_softmax(logits, -1)[len(context) - 1: -1].gather(1, torch.tensor(continuation)[:, None])[:, 0]
    assert got.shape == (20,) and (got - want).abs().max() < 1e-4
    assert engine.hooks == [] and not engine.has_work()


def test_teacher_forcing_steers_only_its_sequence(model):
    engine = _engine(model)
    rows = {}
    engine.hooks.append(LogitsObserver(lambda seq, row: rows.setdefault(seq.seq_id, []).append(row.clone())))
    gen = torch.Generator().manual_seed(1)
    other = engine.add_request(torch.randint(4, 64, (40,), generator=gen).tolist(),
                               SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(4):
        engine.step()
    forced, visited = [5, 6, 7, 8, 9, 10], []
    teacher_force(engine, torch.randint(4, 64, (33,), generator=gen).tolist(), forced,
                  lambda i, row: visited.append(i))
    assert visited == list(range(len(forced)))
    assert engine.scheduler.running == [other] and len(engine.hooks) == 1  # the forced one finished and left
    while engine.has_work():
        engine.step()
    assert other.output_ids == [int(r.argmax()) for r in rows[other.seq_id]]  # greedy, never overridden
    assert len(other.output_ids) == 30 and other.status is Status.FINISHED


def test_teacher_force_refuses_what_cannot_be_forced(model):
    engine = _engine(model)
    with pytest.raises(InvalidRequestError, match="empty"):
        teacher_force(engine, [4, 5, 6], [], lambda i, row: None)
    with pytest.raises(PromptTooLongError):
        teacher_force(engine, [4] * 500, [5] * 20, lambda i, row: None)
    assert not engine.has_work() and engine.hooks == []


def test_a_short_prompt_is_prefilled_beside_a_long_one():
    """Several sequences prefill side by side: the step's prefill tokens go to the fewest-left
    first, so a short prompt waits one step, not the long prompt's whole prefill."""
    sched = Scheduler(4, prefill_chunk=100, rules=OutputRules({2}), can_admit=lambda s: True,
                      admit=lambda s: None, release=lambda s: None, max_prefill_seqs=4)
    long = Sequence([4] * 1000, SamplingParams())
    sched.add(long)
    assert [(b.seq, b.end) for b in sched.schedule()] == [(long, 100)]
    long.num_cached = 100
    short = Sequence([4] * 30, SamplingParams())
    sched.add(short)
    assert [(b.seq, b.end) for b in sched.schedule()] == [(short, 30), (long, 170)]  # 100 tokens in all
    single = Scheduler(4, prefill_chunk=100, rules=OutputRules({2}), can_admit=lambda s: True,
                       admit=lambda s: None, release=lambda s: None, max_prefill_seqs=1)
    single.running.append(long)
    long.status = Status.PREFILL
    single.add(Sequence([4] * 30, SamplingParams()))
    assert [b.seq for b in single.schedule()] == [long]  # one at a time: the short one waits


def test_decode_steps_run_between_the_layers_of_a_layerwise_prefill(model):
    from engine.config import PolicyConfig

    cfg = EngineConfig(cache=CacheConfig(block_size=16, num_device_blocks=64),
                       scheduler=SchedulerConfig(max_num_seqs=3, prefill_chunk=32, layerwise_prefill=True),
                       policy=PolicyConfig("streaming", budget=0.5, min_resident_tokens=0))
    engine = LLMEngine(model, cfg)
    gen = torch.Generator().manual_seed(2)
    decoding = engine.add_request(torch.randint(4, 64, (20,), generator=gen).tolist(),
                                  SamplingParams(max_tokens=20, ignore_eos=True))
    while decoding.status is not Status.DECODE:  # layer by layer too: a step per layer
        engine.step()
    long_ids = torch.randint(4, 64, (300,), generator=gen).tolist()
    long = engine.add_request(long_ids, SamplingParams(max_tokens=4, ignore_eos=True))
    tokens_during = []
    while long.status is not Status.DECODE:
        before = len(decoding.output_ids)
        engine.step()
        tokens_during.append(len(decoding.output_ids) - before)
    assert len(tokens_during) == TINY.num_layers and all(t == 1 for t in tokens_during)  # a token every layer
    while engine.has_work():
        engine.step()
    alone = LLMEngine(model, cfg).generate([long_ids], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert long.output_ids == alone.token_ids


def test_streamed_text_is_the_whole_outputs_decode_token_by_token():
    """OutputRules decodes only a window of the newest tokens (not the whole output at every token):
    on the embedded model's byte-level tokenizer, text with accents, CJK and emoji split across
    tokens, the text after every token is a prefix of the whole output's decode (a character whose
    bytes are not all there yet is held back) and equals it at the end; random token ids too."""
    from engine.errors import ModelNotFoundError
    from engine.tokenizer import Tokenizer
    from engine.weights import resolve_model

    try:
        tok = Tokenizer(resolve_model("smollm2-135m"))
    except ModelNotFoundError:
        pytest.skip("embedded model not installed")
    gen = torch.Generator().manual_seed(17)
    text = ("Zoë's café served crème brûlée. 東京の天気は晴れです。 The 🦙 and the 🐍 met at "
            "naïve coördinates;\n\tindented  spaces,   and ü-umlauts ") * 3
    for ids, expect in ((tok.encode(text, add_special_tokens=False), text),
                        (torch.randint(0, 49152, (300,), generator=gen).tolist(), None)):
        rules = OutputRules(set(), tok)
        seq = Sequence([1], SamplingParams(max_tokens=len(ids), ignore_eos=True))
        held = 0
        for i, t in enumerate(ids):
            reason = rules.append(seq, t)
            whole = tok.decode(ids[: i + 1])
            assert whole.startswith(seq.text) and len(whole) - len(seq.text) <= 2, (i, seq.text[-20:], whole[-20:])
            held += len(whole) > len(seq.text)
        assert reason == "length" and seq.text == tok.decode(ids)
        if expect is not None:
            assert seq.text == expect and held > 0  # split characters were held back, then given
