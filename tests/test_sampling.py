"""OpenAI's presence and frequency penalties, against float64 arithmetic done here: the
penalized logits, the greedy pick, the distribution a seeded sampler draws from, and every
token an engine picks over a whole greedy generation (its raw logits seen by a hook)."""
from collections import Counter

import pytest
import torch

from engine.hooks import LogitsObserver
from engine.llm import LLMEngine
from engine.sampling import SamplingParams, make_generator, penalize, sample
from tiny import engine_config, tokens

SEED = 4  # the conftest's model fixture


def expected(row: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    out = row.double().clone()
    for token, count in Counter(generated).items():
        out[token] -= presence + frequency * count
    return out


@pytest.mark.parametrize("presence,frequency", [(0.0, 0.7), (1.3, 0.0), (-0.5, 1.9), (2.0, -2.0)])
def test_penalized_logits_are_float64_arithmetic(presence, frequency):
    gen = torch.Generator().manual_seed(int(presence * 10 + frequency * 100) % 97)
    row = torch.randn(50, generator=gen) * 3
    generated = torch.randint(0, 50, (40,), generator=gen).tolist()  # repeats included
    got = penalize(row, generated, SamplingParams(presence_penalty=presence, frequency_penalty=frequency))
    torch.testing.assert_close(got.double(), expected(row, generated, presence, frequency), rtol=0, atol=1e-5)
    assert torch.equal(penalize(row, [], SamplingParams(frequency_penalty=1.0)), row)


def test_greedy_rows_take_the_penalized_argmax_and_unpenalized_rows_are_untouched():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 20, generator=gen)
    top = int(logits[0].argmax())
    logits[0, top] += 0.5  # a clear winner that a penalty of 2 per use must topple
    outputs = [[top, top, 7], [top], []]
    params = [SamplingParams(frequency_penalty=2.0), SamplingParams(), SamplingParams(presence_penalty=1.0)]
    picked = sample(logits, params, [None] * 3, outputs=outputs)
    assert picked[0] == int(expected(logits[0], outputs[0], 0.0, 2.0).argmax()) != top
    assert picked[1] == int(logits[1].argmax())  # no penalty: the plain argmax
    assert picked[2] == int(logits[2].argmax())  # nothing generated yet: nothing to penalize


def test_seeded_sampling_draws_from_the_penalized_distribution():
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0])
    generated = [0, 0, 1, 3]
    params = SamplingParams(temperature=0.8, presence_penalty=0.4, frequency_penalty=0.6, seed=11)
    probs = torch.softmax(expected(row, generated, 0.4, 0.6) / 0.8, dim=0)
    generator = make_generator(params, "cpu")
    draws = Counter(sample(row[None], [params], [generator], outputs=[generated])[0] for _ in range(6000))
    for token in range(5):
        assert abs(draws[token] / 6000 - probs[token].item()) < 0.025, (token, draws, probs)
    plain = torch.softmax(row.double() / 0.8, dim=0)
    assert abs(draws[0] / 6000 - plain[0].item()) > 0.1  # the penalty moved the distribution


def test_engine_picks_each_token_from_the_penalized_logits(model):
    raw: list[torch.Tensor] = []
    engine = LLMEngine(model, engine_config(16))
    engine.hooks.append(LogitsObserver(lambda seq, row: raw.append(row.double().clone())))
    params = SamplingParams(max_tokens=24, ignore_eos=True, presence_penalty=0.8, frequency_penalty=1.1)
    out = engine.generate([tokens(30, seed=2)], params)[0].token_ids
    assert len(out) == len(raw) == 24
    for i, token in enumerate(out):
        assert token == int(expected(raw[i], out[:i], 0.8, 1.1).argmax()), i
    plain = LLMEngine(model, engine_config(16)).generate([tokens(30, seed=2)], SamplingParams(max_tokens=24, ignore_eos=True))
    assert plain[0].token_ids != out  # the penalties changed the generation
