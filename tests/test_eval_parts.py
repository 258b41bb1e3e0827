"""Pieces of ``lsa eval`` that decide its numbers, without a model run: the 95% intervals,
the texts, the session task's prompts (the served format), the aggregates."""
import math
import random

import pytest

from engine.errors import InvalidRequestError
from lab.haystack import load_text, text_label
from lab.report import aggregate
from lab.stats import bootstrap, pooled_ppl, ppl_ratio, wilson


def test_wilson_matches_the_closed_form_and_known_values():
    assert wilson(0, 0) == (0.0, 1.0)
    low, high = wilson(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)  # the textbook value for 0/20
    low, high = wilson(10, 20)
    assert (low, high) == (pytest.approx(0.2993, abs=1e-4), pytest.approx(0.7007, abs=1e-4))
    low, high = wilson(20, 20)
    assert high == 1.0 and low == pytest.approx(0.8389, abs=1e-4)
    rng = random.Random(3)
    for _ in range(50):  # against the formula in float64 written out another way
        n = rng.randint(1, 200)
        k = rng.randint(0, n)
        z = 1.959963984540054
        p = k / n
        a, b = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        lo, hi = wilson(k, n)
        assert lo == pytest.approx(max(0.0, (a - b) / (1 + z * z / n)), abs=1e-12)
        assert hi == pytest.approx(min(1.0, (a + b) / (1 + z * z / n)), abs=1e-12)


def test_bootstrap_intervals():
    values = [0.1, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8, 0.6]
    low, high = bootstrap(lambda xs: sum(xs) / len(xs), values)
    assert low < sum(values) / len(values) < high and 0.1 <= low and high <= 0.9
    assert bootstrap(lambda xs: sum(xs) / len(xs), values) == (low, high)  # seeded: reproducible
    assert bootstrap(lambda xs: xs[0], [4.0]) == (4.0, 4.0)
    same = [(10.0, 5), (12.0, 5), (8.0, 5)]
    assert ppl_ratio([(w, w) for w in same]) == 1.0
    assert bootstrap(ppl_ratio, [(w, w) for w in same]) == (1.0, 1.0)  # paired: no spread when equal
    assert pooled_ppl(same) == pytest.approx(math.exp(30 / 15))


def _record(policy, budget, task, key, **kw):
    return {"policy": policy, "budget": budget, "task": task, "key": key, "text": kw.pop("text", None),
            "context": 1024, "depth": kw.pop("depth", None), "wall_s": 1.0, "kv": kw.pop("kv", {}), **kw}


def test_aggregates_carry_intervals_and_the_paired_ppl_ratio():
    kv = {"device_kv_bytes": 150, "index_kv_bytes": 10, "staged_kv_bytes": 40, "full_kv_bytes": 1000}
    records = [_record("full", None, "ppl", f"ppl/essays/1024/-/{i}", text="essays", nll=10.0 + i, scored_tokens=10)
               for i in range(4)]
    records += [_record("lsa", 0.1, "ppl", f"ppl/essays/1024/-/{i}", text="essays", nll=11.0 + i, scored_tokens=10,
                        kv=kv) for i in range(4)]
    records += [_record("lsa", 0.1, "niah", f"niah/-/1024/0.5/{i}", depth=0.5, correct=i < 3) for i in range(4)]
    rows = {(r["policy"], r["task"], r["context"], r["depth"]): r for r in aggregate(records)}
    lsa = rows[("lsa", "ppl", 1024, None)]
    assert lsa["vs_full"] == pytest.approx(math.exp(4.6) / math.exp(4.5) - 1)
    assert lsa["vs_full_ci"][0] == pytest.approx(lsa["vs_full"])  # every window 1 nat/10 tokens worse
    assert lsa["kv"]["attended_kv_fraction"] == pytest.approx(0.1)
    niah = rows[("lsa", "niah", 1024, None)]
    assert niah["accuracy"] == 0.75 and niah["ci"] == wilson(3, 4)
    assert ("lsa", "niah", 1024, 0.5) in rows


def test_texts_by_name():
    text = load_text("pydoc")
    assert len(text) > 100_000 and "assert_stmt" in text  # CPython's reference, read at run time
    assert text_label("pydoc") == "pydoc" and text_label("/a/b/notes.txt") == "notes"
    with pytest.raises(InvalidRequestError, match="cannot read the evaluation text"):
        load_text("/nonexistent/file.txt")


def test_session_prompts_are_the_served_format():
    pytest.importorskip("gguf")
    sessions_api = pytest.importorskip("cluster.sessions_api")
    from engine.tokenizer import Tokenizer
    from engine.weights import resolve_model
    from lab import haystack
    from lab.tasks import TaskSpec, build_samples

    assert (haystack.SESSION_DOC_HEAD, haystack.SESSION_DOC_TAIL, haystack.SESSION_QUESTION, haystack._SPLIT) == \
        (sessions_api.DOC_HEAD, sessions_api.DOC_TAIL, sessions_api.QUESTION, sessions_api.SENTINEL)
    tokenizer = Tokenizer(resolve_model("smollm2-135m"))
    spec = TaskSpec(contexts=(600,), depths=(0.5,), needles=(), limit=2, max_tokens=8, max_model_len=2048)
    samples = build_samples("session", spec, tokenizer, haystack.load_haystack(None, min_chars=40_000))
    assert len(samples) == 2 and samples[0].prompt_ids != samples[1].prompt_ids  # documents differ
    for s in samples:
        document = tokenizer.decode(list(s.prompt_ids))
        assert len(s.turns) == 5 and sorted(t.depth for t in s.turns) == [0.1, 0.28, 0.46, 0.64, 0.82]
        facts = [f for f in haystack.SESSION_FACTS if f.answer == s.turns[0].answer]
        assert facts and facts[0].needle in document
        for turn in s.turns:  # context + question is the chat prompt of the document and the question
            whole = tokenizer.decode(list(s.prompt_ids) + list(turn.question_ids), skip_special_tokens=False)
            assert whole.rstrip().endswith("assistant") and f"Question: {turn.question}" in whole
        assert 560 <= len(s.prompt_ids) + max(len(t.question_ids) for t in s.turns) <= 600  # the prompt fits
    assert [t.depth for t in samples[1].turns][0] == 0.28  # document d starts from fact d
