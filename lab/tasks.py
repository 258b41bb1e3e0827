"""The tasks of ``lsa eval``: what each sample is, and how the samples are built.

Every task turns into a list of :class:`Sample` (token ids plus what the reply is checked
against); lab/running.py runs them on an :class:`~engine.llm.LLMEngine` whose attention policy
is under test, many at once, and returns JSON-ready records.

| task      | grid cell                   | metric                                                   |
|-----------|-----------------------------|----------------------------------------------------------|
| niah      | context x depth x needle    | answer string in the greedy reply (case-insensitive)     |
| multikey  | context x depth x sample    | the asked key's value in the reply; others are distractors |
| session   | context x document x turn   | one document, five facts at depths 0.1 .. 0.9, five questions |
|           |                             | asked as successive turns of one session; each answer scored |
| ppl       | text x context x window     | perplexity of the last tokens, teacher-forced via decode |
| agreement | text x context x window     | greedy tokens identical to full attention's, first divergence; |
|           |                             | teacher-forced: the policy's argmax on full's tokens     |
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InvalidRequestError
from lab.haystack import (SESSION_FACTS, Needle, needle_tokens, niah_prompt, place_needles, session_context_ids,
                          session_question_ids)

TASKS = ("niah", "multikey", "session", "ppl", "agreement")
TEXT_TASKS = ("ppl", "agreement")  # run on each of --texts; the others on the haystack
SESSION_TURNS = 5

_KEY_WORDS = ("amber harbor silent copper velvet northern hollow crimson lunar quiet rapid golden frozen "
              "bitter gentle hidden ancient wild").split()
_KEY_NOUNS = ("falcon lantern meadow orchard compass glacier violin pepper canyon ribbon walnut quarry "
              "beacon saddle thistle marble").split()


@dataclass(frozen=True)
class SessionTurn:
    """One question of a session: its token ids (a turn's suffix) and the fact it asks for."""

    question_ids: tuple[int, ...]
    question: str
    answer: str
    depth: float  # where the fact sits in the document


@dataclass(frozen=True)
class Sample:
    """One prompt of one task. ``answer`` is checked in the reply (niah, multikey);
    ``continuation`` is teacher-forced (ppl); agreement compares with full attention; a
    session's ``prompt_ids`` are its context and ``turns`` its questions, asked in order."""

    task: str
    context: int  # requested context length in tokens
    depth: float | None  # where the needles start (niah, multikey)
    index: int  # needle, window or document number inside the grid cell
    prompt_ids: tuple[int, ...]
    answer: str = ""
    question: str = ""
    distractors: tuple[str, ...] = ()  # multikey: values of the keys not asked
    continuation: tuple[int, ...] = ()
    text: str | None = None  # ppl and agreement: which text the window is of
    turns: tuple[SessionTurn, ...] = ()

    @property
    def key(self) -> str:
        depth = "-" if self.depth is None else f"{self.depth:g}"
        return f"{self.task}/{self.text or '-'}/{self.context}/{depth}/{self.index}"


# ------------------------------------------------------------------ needles and scoring

def answer_found(reply: str, answer: str) -> bool:
    """Needle scoring: the expected answer appears in the reply, ignoring case."""
    return answer.strip().lower() in reply.lower()


def load_needles(path: str | Path) -> tuple[Needle, ...]:
    """Needles from a JSONL file, one ``{"needle", "question", "answer"}`` object per line
    (blank lines allowed). Raises :class:`InvalidRequestError` naming the first bad line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read needles file {path}: {exc.strerror or exc}") from exc
    needles = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise InvalidRequestError(f"{where}: expected an object with needle, question and answer")
        missing = [k for k in ("needle", "question", "answer") if not isinstance(obj.get(k), str) or not obj[k].strip()]
        if missing:
            raise InvalidRequestError(f"{where}: {', '.join(missing)} missing or not a non-empty string")
        if not answer_found(obj["needle"], obj["answer"]):
            raise InvalidRequestError(f"{where}: the answer {obj['answer']!r} does not appear in the needle")
        needles.append(Needle(obj["needle"], obj["question"], obj["answer"]))
    if not needles:
        raise InvalidRequestError(f"needles file {path} has no needles")
    return tuple(needles)


def multikey_needles(num_keys: int, rng: random.Random) -> tuple[list[Needle], int]:
    """RULER-style keys: ``num_keys`` needles of the same form, distinct keys and 7-digit values;
    returns them and the index of the one to ask."""
    if num_keys < 1:
        raise InvalidRequestError(f"--num-keys must be >= 1, got {num_keys}")
    pairs = [(a, n) for a in _KEY_WORDS for n in _KEY_NOUNS]
    keys = [f"{a}-{n}" for a, n in rng.sample(pairs, num_keys)]
    values = rng.sample(range(1_000_000, 10_000_000), num_keys)
    needles = [Needle(f"One of the special magic numbers for {k} is: {v}.",
                      f"What is the special magic number for {k} mentioned in the provided text?", str(v))
               for k, v in zip(keys, values)]
    return needles, rng.randrange(num_keys)


# ------------------------------------------------------------------ building samples

@dataclass(frozen=True)
class TaskSpec:
    """What the samples are built from; shared by every policy so all see the same prompts."""

    contexts: tuple[int, ...]
    depths: tuple[float, ...]
    needles: tuple[Needle, ...]
    limit: int | dict | None  # samples per grid cell, or per task {task: n}; None: the task's default
    num_keys: int = 4
    ppl_tokens: int = 256
    agreement_tokens: int = 64
    max_tokens: int = 32  # generated tokens for niah and multikey
    max_model_len: int = 8192
    seed: int = 0

    def count(self, task: str) -> int | None:
        """Samples per grid cell of ``task``: ``limit``, or its entry for the task."""
        return self.limit.get(task) if isinstance(self.limit, dict) else self.limit

    def fit(self, context: int, new_tokens: int) -> int:
        """The requested context, shortened so that prompt plus new tokens fit the model."""
        return min(context, self.max_model_len - new_tokens)


def build_samples(task: str, spec: TaskSpec, tokenizer, text: str, text_name: str | None = None) -> list[Sample]:
    """The samples of one task: ``text`` is the haystack (niah, multikey, session) or the text
    whose windows ppl and agreement take (named ``text_name`` in the records)."""
    if task == "niah":
        return _niah_samples(spec, tokenizer, text)
    if task == "multikey":
        return _multikey_samples(spec, tokenizer, text)
    if task == "session":
        return _session_samples(spec, tokenizer, text)
    if task in TEXT_TASKS:
        return _window_samples(task, spec, tokenizer, text, text_name)
    raise InvalidRequestError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")


def _niah_samples(spec: TaskSpec, tokenizer, text: str) -> list[Sample]:
    needles = spec.needles[: spec.count("niah")] if spec.count("niah") else spec.needles
    return [Sample("niah", ctx, depth, i,
                   tuple(niah_prompt(tokenizer, text, [n], n.question, spec.fit(ctx, spec.max_tokens), depth)),
                   answer=n.answer, question=n.question)
            for ctx in spec.contexts for depth in spec.depths for i, n in enumerate(needles)]


def _multikey_samples(spec: TaskSpec, tokenizer, text: str) -> list[Sample]:
    samples = []
    for ctx in spec.contexts:
        for depth in spec.depths:
            for i in range(spec.count("multikey") or 2):
                rng = random.Random(f"{spec.seed}/{ctx}/{depth}/{i}")
                needles, asked = multikey_needles(spec.num_keys, rng)
                target = needles[asked]
                ids = niah_prompt(tokenizer, text, needles, target.question, spec.fit(ctx, spec.max_tokens), depth)
                samples.append(Sample("multikey", ctx, depth, i, tuple(ids), answer=target.answer,
                                      question=target.question,
                                      distractors=tuple(n.answer for j, n in enumerate(needles) if j != asked)))
    return samples


def _session_samples(spec: TaskSpec, tokenizer, haystack: str) -> list[Sample]:
    """``limit`` documents per context (default 4: 20 answers), each from its own stretch of the
    haystack with five facts at depths 0.1, 0.28, .. 0.82; document d asks them starting from
    fact d, so every depth comes at every turn across documents."""
    samples = []
    for ctx in spec.contexts:
        for d in range(spec.count("session") or 4):
            rng = random.Random(f"{spec.seed}/session/{ctx}/{d}")
            facts = rng.sample(SESSION_FACTS, SESSION_TURNS)
            questions = [session_question_ids(tokenizer, f.question) for f in facts]
            target = spec.fit(ctx, spec.max_tokens) - max(map(len, questions))  # context tokens at most
            budget = target - len(session_context_ids(tokenizer, "")) - needle_tokens(tokenizer, facts)
            start = (d * 4 * ctx) % max(1, len(haystack) - 8 * budget)  # about 4 characters a token
            while True:  # text and facts tokenized together may take a few tokens more than apart
                if budget < 16 * SESSION_TURNS:
                    raise InvalidRequestError(f"context {ctx} is too small for a session of {SESSION_TURNS} facts")
                document = place_needles(tokenizer, haystack[start:], facts, budget, 0.1)
                context_ids = session_context_ids(tokenizer, document)
                if len(context_ids) <= target:
                    break
                budget -= len(context_ids) - target
            depths = [0.1 + i * 0.9 / SESSION_TURNS for i in range(SESSION_TURNS)]
            order = [(d + t) % SESSION_TURNS for t in range(SESSION_TURNS)]
            turns = tuple(SessionTurn(tuple(questions[i]), facts[i].question, facts[i].answer, round(depths[i], 3))
                          for i in order)
            samples.append(Sample("session", ctx, None, d, tuple(context_ids), turns=turns))
    return samples


def _window_samples(task: str, spec: TaskSpec, tokenizer, text: str, text_name: str | None) -> list[Sample]:
    """Windows of ``context`` tokens of the text at evenly spread offsets: the prefix is the
    prompt; ppl teacher-forces its last ``ppl_tokens``, agreement generates after all of it."""
    count = spec.count(task) or 2
    new = spec.ppl_tokens if task == "ppl" else spec.agreement_tokens
    longest = max(spec.fit(c, 0 if task == "ppl" else new) for c in spec.contexts)
    ids = tokenizer.encode(text[: 8 * longest * count], add_special_tokens=False)
    if len(ids) < longest * count:
        ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < longest:
        raise InvalidRequestError(f"the text has {len(ids)} tokens; {task} needs at least {longest}")
    samples = []
    for ctx in spec.contexts:
        size = spec.fit(ctx, 0 if task == "ppl" else new)
        if task == "ppl" and size <= spec.ppl_tokens:
            raise InvalidRequestError(f"context {ctx} must exceed --ppl-tokens {spec.ppl_tokens}")
        stride = (len(ids) - size) // max(1, count - 1) if count > 1 else 0
        for i in range(count):
            window = ids[i * stride: i * stride + size]
            if task == "ppl":
                samples.append(Sample(task, ctx, None, i, tuple(window[:-new]), continuation=tuple(window[-new:]),
                                      text=text_name))
            else:
                samples.append(Sample(task, ctx, None, i, tuple(window), text=text_name))
    return samples


def agreement(reference: list[int], tokens: list[int]) -> tuple[float, int | None]:
    """Fraction of positions where ``tokens`` equals the full-attention ``reference``, and the
    first position where they differ (None if identical)."""
    n = max(len(reference), len(tokens))
    if n == 0:
        return 1.0, None
    same = [i < len(reference) and i < len(tokens) and reference[i] == tokens[i] for i in range(n)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return sum(same) / n, first
