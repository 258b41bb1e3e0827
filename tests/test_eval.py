"""``lsa eval`` end to end on SmolLM2 at a tiny context (every task, every policy, in one grid),
the shared prefill against separate ones, a grid without full (its own agreement reference),
plus the pieces that decide the numbers: needle scoring, needles-file validation, multi-key and
session prompts, token agreement. The model is loaded once for the module and handed to
``lsa eval``."""
import itertools
import json
import random

import pytest
import torch

pytest.importorskip("gguf")

from cli import main  # noqa: E402
from engine.errors import InvalidRequestError, ModelNotFoundError  # noqa: E402
from engine.weights import resolve_model  # noqa: E402
from lab import evaluation  # noqa: E402
from lab.haystack import synthetic_filler  # noqa: E402
from lab.running import RunInputs, run_samples  # noqa: E402
from lab.tasks import (Sample, TaskSpec, agreement, answer_found, build_samples, load_needles,  # noqa: E402
                       multikey_needles)

try:
    resolve_model("smollm2-135m")
except ModelNotFoundError as exc:  # pragma: no cover - the test extra installs it
    pytest.skip(f"embedded model not installed: {exc}", allow_module_level=True)

POLICIES = ("full", "lsa", "quest", "streaming", "snapkv", "oracle")
TASKS = ("niah", "multikey", "session", "ppl", "agreement")
TINY = ["--contexts", "384", "--depths", "0.5", "--limit", "1", "--max-tokens", "6", "--ppl-tokens", "16",
        "--agreement-tokens", "8", "--block-size", "16", "--budgets", "0.25", "--min-resident-tokens", "0",
        "--cycle", "4", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def loaded():
    # One thread: on a small shared CPU, two torch threads competing with other processes
    # stall for seconds per step; one thread keeps the module well under 90 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield evaluation.load("smollm2-135m", "cpu", "auto")
    torch.set_num_threads(threads)


@pytest.fixture
def shared_model(loaded, monkeypatch):
    """``lsa eval`` uses the module's model instead of loading its own."""
    monkeypatch.setattr(evaluation, "load", lambda *a: loaded)
    return loaded


def _spec(**kw):
    base = dict(contexts=(384,), depths=(0.5,), needles=(), limit=1, max_tokens=6, max_model_len=8192)
    return TaskSpec(**{**base, **kw})


# ------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def every_policy(loaded, tmp_path_factory):
    """One ``lsa eval`` over every policy and task (full first: the others' agreement reference):
    its out directory and results.json."""
    out = tmp_path_factory.mktemp("every-policy")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "load", lambda *a: loaded)
        rc = main(["eval", "--policies", ",".join(POLICIES), "--tasks", ",".join(TASKS), "--texts", "essays,pydoc",
                   "--out", str(out), *TINY])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def test_eval_end_to_end(every_policy):
    out, result = every_policy
    assert {"config", "timings", "aggregates", "records", "errors"} <= set(result)
    assert result["errors"] == []
    assert result["config"]["command"].startswith("lsa eval --policies " + ",".join(POLICIES))
    assert result["timings"]["total_s"] > 0 and result["timings"]["captured_prompts"] == 6
    assert [run["policy"] for run in result["timings"]["runs"]] == list(POLICIES)
    md = (out / "results.md").read_text()
    for title in ("niah", "multikey", "session", "ppl (essays)", "ppl (pydoc)", "agreement (essays)"):
        assert f"### {title}:" in md
    assert "| agreement % | teacher-forced % | first div. | n |" in md
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = md_tables(md)
    assert len(tables) == 7  # niah, multikey, session, ppl and agreement on each text
    for header, rows in tables:  # every policy has a row in every table, as wide as its header
        assert sorted(row.split("|")[1].strip() for row in rows) == sorted(POLICIES), header
        assert all(len(row.split("|")) == len(header.split("|")) for row in rows), header
    for policy in POLICIES:
        check_policy(result, policy)


def md_tables(md: str) -> list[tuple[str, list[str]]]:
    """results.md's tables: (header line, row lines)."""
    lines = md.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("| policy |")]
    return [(lines[i], list(itertools.takewhile(lambda line: line.startswith("| "), lines[i + 2:]))) for i in starts]


def check_policy(result: dict, policy: str) -> None:
    """One policy's records and aggregates in the grid's results."""
    records = [r for r in result["records"] if r["policy"] == policy]
    assert sorted(r["task"] for r in records) == sorted(["niah", "multikey", "ppl", "ppl", "agreement", "agreement"]
                                                        + ["session"] * 5), policy
    assert {r["budget"] for r in records} == ({None} if policy == "full" else {0.25})
    by_task = {r["task"]: r for r in records}
    for task in ("niah", "multikey", "session"):
        r = by_task[task]
        assert r["correct"] == answer_found(r["reply"], r["answer"])
        assert 0 < len(r["token_ids"]) <= 6 and "device_kv_fraction" in r["kv"]
    sessions = [r for r in records if r["task"] == "session"]
    assert sorted(r["depth"] for r in sessions) == [0.1, 0.28, 0.46, 0.64, 0.82] and [r["turn"] for r in sessions] \
        == [0, 1, 2, 3, 4]
    assert all(r["prefill_tokens"] < 100 for r in sessions)  # each turn prefills its question, not the document
    assert {r["text"] for r in records if r["task"] in ("ppl", "agreement")} == {"essays", "pydoc"}
    assert by_task["ppl"]["scored_tokens"] == 16 and by_task["ppl"]["ppl"] > 1.0
    assert len(by_task["agreement"]["token_ids"]) == 8
    assert 0.0 <= by_task["agreement"]["agreement"] <= 1.0
    assert len(by_task["agreement"]["forced_token_ids"]) == 8
    assert 0.0 <= by_task["agreement"]["agreement_forced"] <= 1.0
    if policy not in ("full", "quest", "oracle"):  # a resident set under the budget (lsa: + a cycle's blocks)
        assert by_task["ppl"]["kv"]["device_kv_fraction"] < 0.5, policy

    aggregates = [r for r in result["aggregates"] if r["policy"] == policy]
    totals = {(r["task"], r["text"]): r for r in aggregates if r["context"] == "all"}
    assert {t for t, _ in totals} == set(TASKS)
    niah = totals[("niah", None)]
    assert niah["accuracy"] == float(by_task["niah"]["correct"]) and niah["ci"][0] <= niah["accuracy"] <= niah["ci"][1]
    ppl = [r for r in records if r["task"] == "ppl" and r["text"] == "pydoc"][0]
    assert totals[("ppl", "pydoc")]["ppl"] == pytest.approx(ppl["ppl"])
    (depth_row,) = [r for r in aggregates if r["task"] == "niah" and r["depth"] is not None]
    assert (depth_row["context"], depth_row["depth"], depth_row["n"]) == (384, 0.5, 1)
    if policy == "full":  # the reference compared with itself
        agree = totals[("agreement", "essays")]
        assert agree["agreement"] == 1.0 and agree["agreement_forced"] == 1.0
        assert by_task["agreement"]["first_divergence"] is None
        assert totals[("ppl", "essays")]["vs_full"] == 0.0


def test_shared_prefill_gives_the_numbers_of_separate_prefills(shared_model, tmp_path):
    """The grid with each prompt prefilled once for every policy against each policy prefilling
    its own: the same records, bit for bit (one sample at a time: decoded together, a written-in
    prompt joins the batch at another step than one prefilled in segments, so the rows of a
    step differ; tests/test_prompt_state.py shows the tokens are still the same then)."""
    argv = ["eval", "--policies", "full,lsa,snapkv", "--tasks", "niah,session,ppl,agreement", "--batch", "1", *TINY,
            "--prefill-chunk", "128"]
    results = []
    for shared in ("--shared-prefill", "--no-shared-prefill"):
        assert main([*argv, shared, "--out", str(tmp_path / shared)]) == 0
        results.append(json.loads((tmp_path / shared / "results.json").read_text())["records"])
    shared, separate = results
    assert len(shared) == len(separate) == 3 * (1 + 5 + 1 + 1)
    for a, b in zip(shared, separate):
        assert (a["policy"], a["key"]) == (b["policy"], b["key"])
        for field in ("token_ids", "forced_token_ids", "correct", "reply", "nll"):
            assert a.get(field) == b.get(field), (a["key"], field)
        if a["task"] != "session":  # sessions share the documents' KV through the host arena instead
            assert a["kv"]["device_kv_bytes"] == b["kv"]["device_kv_bytes"]


def test_keep_going_records_a_failing_policy(shared_model, tmp_path, monkeypatch):
    """A grid without full: its agreement reference comes from a full engine run for it alone;
    streaming fails, and with --keep-going lsa's records are kept and the failure recorded."""
    from lab import grid

    real = grid.run_samples

    def run_samples(engine, *a, **kw):
        if engine.config.policy.name == "streaming":
            raise RuntimeError("boom")
        return real(engine, *a, **kw)

    monkeypatch.setattr(grid, "run_samples", run_samples)
    out = tmp_path / "out"
    argv = ["eval", "--policies", "streaming,lsa", "--tasks", "agreement", "--out", str(out), *TINY]
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)
    assert main([*argv, "--keep-going"]) == 1
    result = json.loads((out / "results.json").read_text())
    assert result["errors"] == [{"policy": "streaming", "budget": 0.25, "error": "RuntimeError: boom"}]
    (agreement,) = result["records"]
    assert (agreement["policy"], agreement["task"]) == ("lsa", "agreement")
    assert len(agreement["forced_token_ids"]) == 8 and 0.0 <= agreement["agreement"] <= 1.0  # against the reference
    assert "streaming@0.25: RuntimeError: boom" in (out / "results.md").read_text()


def test_bad_inputs_are_reported_before_loading(tmp_path, capsys, monkeypatch):
    def no_load(*a):
        raise AssertionError("the model must not load for a bad needles file")

    monkeypatch.setattr(evaluation, "load", no_load)
    bad = tmp_path / "needles.jsonl"
    bad.write_text('{"needle": "The code is 42.", "question": "What is the code?", "answer": "42"}\n\n'
                   '{"needle": "The colour is red.", "question": "What colour?"}\n')
    assert main(["eval", "--needles", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3" in err and "answer" in err
    assert main(["eval", "--texts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "cannot read the evaluation text" in capsys.readouterr().err


# ------------------------------------------------------------------ scoring and data

def test_answer_found():
    assert answer_found("The passphrase is blue lantern.", "blue lantern")
    assert answer_found("THE PASSPHRASE IS BLUE LANTERN", "Blue Lantern")
    assert not answer_found("The passphrase is red lantern.", "blue lantern")
    assert not answer_found("", "mango")


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"),
    ('["a", "b"]', "expected an object"),
    ('{"needle": "x is 1.", "question": "x?"}', "answer missing"),
    ('{"needle": "x is 1.", "question": "", "answer": "1"}', "question missing"),
    ('{"needle": "x is 1.", "question": "x?", "answer": 1}', "answer missing"),
    ('{"needle": "x is 1.", "question": "x?", "answer": "2"}', "does not appear in the needle"),
])
def test_needles_file_validation(tmp_path, line, message):
    path = tmp_path / "n.jsonl"
    path.write_text('{"needle": "The code is 42.", "question": "What is the code?", "answer": "42"}\n' + line + "\n")
    with pytest.raises(InvalidRequestError, match=rf"n\.jsonl:2: .*{message}"):
        load_needles(path)


def test_needles_file_ok_and_empty(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text('{"needle": "The code is 42.", "question": "What is the code?", "answer": "42"}\n')
    (needle,) = load_needles(path)
    assert (needle.question, needle.answer) == ("What is the code?", "42")
    path.write_text("\n\n")
    with pytest.raises(InvalidRequestError, match="no needles"):
        load_needles(path)
    with pytest.raises(InvalidRequestError, match="cannot read"):
        load_needles(tmp_path / "missing.jsonl")


def test_multikey_prompt_holds_every_key_and_asks_one(loaded):
    _, tokenizer = loaded
    spec = _spec(num_keys=4, limit=3)
    samples = build_samples("multikey", spec, tokenizer, synthetic_filler(20_000))
    assert len(samples) == 3
    for s in samples:
        text = tokenizer.decode(list(s.prompt_ids))
        document, question = text.split("</document>")
        needles, asked = multikey_needles(4, random.Random(f"0/384/0.5/{s.index}"))
        assert all(n.needle in document for n in needles)
        keys = [n.needle.split(" for ")[1].split(" is:")[0] for n in needles]
        assert [k for k in keys if k in question] == [keys[asked]]
        assert s.answer == needles[asked].answer and s.answer not in s.distractors
        assert len(s.distractors) == 3 and len(set(keys)) == 4


def test_window_samples_fit_the_model(loaded):
    _, tokenizer = loaded
    spec = _spec(contexts=(300, 1000), limit=2, ppl_tokens=40, agreement_tokens=10, max_model_len=500)
    text = synthetic_filler(30_000)
    ppl = build_samples("ppl", spec, tokenizer, text)
    assert [len(s.prompt_ids) + len(s.continuation) for s in ppl] == [300, 300, 500, 500]
    assert all(len(s.continuation) == 40 for s in ppl) and ppl[0].prompt_ids != ppl[1].prompt_ids
    agree = build_samples("agreement", spec, tokenizer, text)
    assert [len(s.prompt_ids) for s in agree] == [300, 300, 490, 490]


def test_agreement():
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, None)
    assert agreement([1, 2, 3, 4], [1, 2, 9, 4]) == (0.75, 2)
    assert agreement([1, 2, 3, 4], [1, 2]) == (0.5, 2)
    assert agreement([5], [6]) == (0.0, 0)


def test_teacher_forcing_reproduces_greedy_under_full_attention(loaded):
    """The agreement task's forced pass: full attention fed its own greedy tokens chooses them
    again at every position; a streaming engine fed other tokens still takes its first from
    the dense prefill."""
    from engine.config import CacheConfig, EngineConfig, PolicyConfig, SchedulerConfig
    from engine.llm import LLMEngine

    model, tokenizer = loaded
    prompt = tokenizer.encode(synthetic_filler(2000, seed=1), add_special_tokens=False)[:200]

    def engine(**policy):
        cfg = EngineConfig(device="cpu", cache=CacheConfig(block_size=16),
                           scheduler=SchedulerConfig(max_num_seqs=2, max_model_len=256),
                           policy=PolicyConfig(**{"min_resident_tokens": 0, **policy}))
        return LLMEngine(model, cfg, tokenizer)

    sample = Sample("agreement", 200, None, 0, tuple(prompt))
    reference: dict[str, list[int]] = {}
    full = engine(name="full")
    spec = _spec(agreement_tokens=8)
    (own,) = run_samples(full, [sample], RunInputs(spec, reference, is_reference=True))
    assert len(reference[sample.key]) == 8 and own["agreement_forced"] == 1.0
    (again,) = run_samples(full, [sample], RunInputs(spec, reference))  # the forced pass really run
    assert again["forced_token_ids"] == reference[sample.key] and again["agreement"] == 1.0
    greedy = reference[sample.key]
    reference[sample.key] = [greedy[0]] + [(t + 1) % 1000 for t in greedy[1:]]  # forced tokens that are not greedy
    (other,) = run_samples(engine(name="streaming", budget=0.25), [sample], RunInputs(spec, reference))
    assert len(other["forced_token_ids"]) == 8 and other["forced_token_ids"][0] == greedy[0]


def test_runs_full_once_and_first_and_variants():
    runs = evaluation._runs(("lsa", "full", "quest"), (0.05, 0.1))
    assert [(r.label, r.name, r.budget) for r in runs] == [("full", "full", None), ("lsa", "lsa", 0.05),
                                                           ("lsa", "lsa", 0.1), ("quest", "quest", 0.05),
                                                           ("quest", "quest", 0.1)]
    specs = evaluation._policy_list("full,planned=lsa:layer_plan=p.json:target_layers=3,4,7,lsa:tail_tokens=64")
    assert specs == ("full", "planned=lsa:layer_plan=p.json:target_layers=3,4,7", "lsa:tail_tokens=64")
    full, planned, tail = evaluation._runs(specs, (0.1,))
    assert (planned.label, planned.name, planned.overrides) == ("planned", "lsa", {"layer_plan": "p.json",
                                                                                    "target_layers": "3,4,7"})
    assert (tail.label, tail.overrides) == ("lsa:tail_tokens=64", {"tail_tokens": "64"})
    for bad, message in [(("dense",), "unknown policy"), (("lsa:tail_tokenz=3",), "did you mean 'tail_tokens'"),
                         (("lsa:budget=0.2",), "set by the grid"), (("lsa:cycle",), "KEY=VALUE"),
                         (("full:cycle=4",), "takes no settings"), (("a=lsa", "a=quest"), "labels repeat")]:
        with pytest.raises(InvalidRequestError, match=message):
            evaluation._runs(bad, (0.1,))
