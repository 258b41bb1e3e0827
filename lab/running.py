"""Running the samples of ``lsa eval`` on one engine, many at once.

The samples of a task go to the engine together; its scheduler decodes up to ``max_num_seqs``
of them in one batch (on a GPU a decode step of 20 sequences costs about one of 1). A sample
whose prompt was prefilled once for every policy (``states``: engine/prompt_state.py) is
written in instead of prefilled. Teacher-forced passes (ppl, agreement) feed each sequence its
own continuation through a ``TeacherForcing`` hook. Sessions run through the serving path
(engine/sessions.py, driven as actors/decode_worker.py drives it): the documents live in one host arena shared by every run, each turn a
request on its session, as a served session's turns are.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.hooks import TeacherForcing
from engine.sampling import SamplingParams
from engine.sequence import Sequence, Status
from engine.host_arena import ArenaLayout, HostArena, IdPool
from engine.sessions import SessionManager, Turn
from lab.tasks import SESSION_TURNS, Sample, TaskSpec, agreement, answer_found


@dataclass
class RunInputs:
    """What every sample of one run shares."""

    spec: TaskSpec
    reference: dict[str, list[int]]  # full attention's greedy tokens per agreement sample key
    is_reference: bool = False  # this run is full attention: it fills ``reference``
    states: dict | None = None  # sample key -> PromptState, when the prefill is shared
    on_done: Callable[[int], None] | None = None  # told how many records are done
    steps: int = 0  # engine steps taken (a batch's cost on a device is about one step's)


def run_samples(engine, samples: list[Sample], inputs: RunInputs) -> list[dict]:
    """Records of ``samples`` (no session samples) run on ``engine``, in the order given."""
    out: dict[str, dict] = {}
    for task in dict.fromkeys(s.task for s in samples):
        group = [s for s in samples if s.task == task]
        if task == "ppl":
            out.update(_ppl(engine, group, inputs))
        elif task == "agreement":
            out.update(_agreement(engine, group, inputs))
        else:
            out.update(_answers(engine, group, inputs))
        if inputs.on_done:
            inputs.on_done(len(group))
    return [out[s.key] for s in samples]


def _base(sample: Sample) -> dict:
    return {"task": sample.task, "key": sample.key, "text": sample.text, "context": sample.context,
            "depth": sample.depth, "index": sample.index, "prompt_tokens": len(sample.prompt_ids)}


def _add(engine, sample: Sample, params: SamplingParams, inputs: RunInputs) -> Sequence:
    state = inputs.states.get(sample.key) if inputs.states else None
    return engine.add_request(None if state is not None else list(sample.prompt_ids), params, prompt_state=state)


def _finish(engine, seqs: list[Sequence], inputs: RunInputs) -> float:
    """Step until every one of ``seqs`` finished; the seconds it took."""
    t0 = time.perf_counter()
    while any(s.status is not Status.FINISHED for s in seqs):
        engine.step()
        inputs.steps += 1
    return time.perf_counter() - t0


def _generate(engine, samples: list[Sample], params: SamplingParams, inputs: RunInputs):
    seqs = [_add(engine, s, params, inputs) for s in samples]
    return seqs, _finish(engine, seqs, inputs) / max(1, len(seqs))


def teacher_force_many(engine, samples: list[Sample], continuations: list[list[int]], visit,
                       inputs: RunInputs) -> tuple[list[Sequence], float]:
    """Feed each sample its continuation through the decode path, all at once; ``visit(k, i,
    logits [V])`` sees the logits that predict ``continuations[k][i]``."""
    seqs, hooks = [], []
    try:
        for k, (sample, cont) in enumerate(zip(samples, continuations)):
            seq = _add(engine, sample, SamplingParams(max_tokens=len(cont), ignore_eos=True), inputs)
            if seq.params.max_tokens < len(cont):
                engine.abort(seq)
                raise ValueError(f"{sample.key}: prompt plus continuation exceed the model's context")
            hooks.append(TeacherForcing(seq, cont, lambda i, row, k=k: visit(k, i, row)))
            engine.hooks.append(hooks[-1])
            seqs.append(seq)
        wall = _finish(engine, seqs, inputs)
    finally:
        for hook in hooks:
            engine.hooks.remove(hook)
    return seqs, wall / max(1, len(seqs))


def _answers(engine, samples: list[Sample], inputs: RunInputs) -> dict[str, dict]:
    seqs, wall = _generate(engine, samples, SamplingParams(max_tokens=inputs.spec.max_tokens), inputs)
    out = {}
    for s, seq in zip(samples, seqs):
        record = {**_base(s), "reply": seq.text, "token_ids": list(seq.output_ids), "prefill_s": round(seq.prefill_s, 4),
                  "decode_s": round(seq.decode_s, 4), "kv": seq.kv, "answer": s.answer, "question": s.question,
                  "correct": answer_found(seq.text, s.answer), "wall_s": round(wall, 4)}
        if s.distractors:
            record["distractor_hit"] = any(answer_found(seq.text, d) for d in s.distractors)
        out[s.key] = record
    return out


def _ppl(engine, samples: list[Sample], inputs: RunInputs) -> dict[str, dict]:
    nll = [0.0] * len(samples)
    conts = [list(s.continuation) for s in samples]

    def visit(k, i, row):
        nll[k] -= float(torch.log_softmax(row.double(), -1)[conts[k][i]])

    seqs, wall = teacher_force_many(engine, samples, conts, visit, inputs)
    return {s.key: {**_base(s), "scored_tokens": len(c), "nll": nll[k], "ppl": math.exp(nll[k] / len(c)),
                    "kv": seq.kv, "wall_s": round(wall, 4)}
            for k, (s, c, seq) in enumerate(zip(samples, conts, seqs))}


def _agreement(engine, samples: list[Sample], inputs: RunInputs) -> dict[str, dict]:
    """Free-running: greedy tokens against full's; teacher-forced: full's tokens fed back, so one
    early flip does not change the later context."""
    params = SamplingParams(max_tokens=inputs.spec.agreement_tokens, ignore_eos=True)
    seqs, wall = _generate(engine, samples, params, inputs)
    if inputs.is_reference:
        inputs.reference.update((s.key, list(seq.output_ids)) for s, seq in zip(samples, seqs))
    missing = [s.key for s in samples if s.key not in inputs.reference]
    if missing:
        raise RuntimeError(f"no full-attention reference for {missing[0]}: run full first")
    refs = [inputs.reference[s.key] for s in samples]
    if inputs.is_reference:
        forced, forced_wall = refs, 0.0
    else:
        forced = [[0] * len(r) for r in refs]

        def visit(k, i, row):
            forced[k][i] = int(row.argmax())

        _, forced_wall = teacher_force_many(engine, samples, refs, visit, inputs)
    out = {}
    for s, seq, ref, f in zip(samples, seqs, refs, forced):
        same, first = agreement(ref, list(seq.output_ids))
        out[s.key] = {**_base(s), "reply": seq.text, "token_ids": list(seq.output_ids),
                      "prefill_s": round(seq.prefill_s, 4), "decode_s": round(seq.decode_s, 4), "kv": seq.kv,
                      "agreement": same, "first_divergence": first, "forced_token_ids": list(f),
                      "agreement_forced": agreement(ref, list(f))[0], "wall_s": round(wall + forced_wall, 4)}
    return out


# ------------------------------------------------------------------ sessions


class HostBlocks:
    """The host ids of the eval's arena: free, leased to an engine, or a session's. The eval's
    stand-in for a node's session table (actors/session_table.py; lab does not import actors):
    one arena sized for every document, so nothing is ever evicted."""

    def __init__(self, num_blocks: int):
        self.free = list(range(num_blocks))
        self.sessions: dict[str, tuple[list[int], list[int]]] = {}  # session id -> (context ids, host ids)

    def lease(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"the eval's host arena is full: {n} blocks wanted, {len(self.free)} free")
        ids, self.free = self.free[:n], self.free[n:]
        return ids

    def give_back(self, ids: list[int]) -> None:
        self.free += ids

    def put(self, session_id: str, context_ids: list[int], host_ids: list[int]) -> None:
        self.sessions[session_id] = (list(context_ids), list(host_ids))

    def delete(self, session_id: str) -> None:
        self.free += self.sessions.pop(session_id)[1]


@dataclass
class EvalSessions:
    """The host arena and session table every run of one context shares. With a shared
    prefill, the first run creates the sessions (prefills each document once) and every later
    run asks its turns on them; otherwise each run creates and deletes its own."""

    layout: ArenaLayout
    num_blocks: int
    shared: bool = True
    arena: HostArena = field(init=False)
    table: HostBlocks = field(init=False)
    sessions: dict[str, str] = field(default_factory=dict)  # sample key -> session id

    def __post_init__(self):
        self.arena = HostArena.private(self.layout, self.num_blocks)
        self.table = HostBlocks(self.num_blocks)

    def engine_arena(self) -> HostArena:
        """The arena as one engine maps it: the same rows, a pool of its own (leased from the table)."""
        return HostArena(self.arena.host, self.arena.summary, IdPool())


class _SessionDriver:
    """A ``SessionManager`` on one engine and the shared host blocks, driven in this thread as
    actors/decode_worker.py drives it on its admission and settling threads: lease before a
    turn starts; when it ends, a created session's blocks are put (a turn's session is
    never evicted here, so no pin is needed)."""

    def __init__(self, engine, table: HostBlocks, pool: IdPool):
        self.table = table
        self.manager = SessionManager(engine, pool)

    def _start(self, turn: Turn) -> Sequence:
        turn.leased = self.table.lease(turn.to_lease)
        return self.manager.start(turn)

    def create(self, session_id: str, context_ids: list[int]) -> Sequence:
        return self._start(self.manager.admit_create(session_id, context_ids))

    def ask(self, session_id: str, question_ids: list[int], params: SamplingParams) -> Sequence:
        context_ids, host_ids = self.table.sessions[session_id]
        return self._start(self.manager.admit_ask(session_id, context_ids, host_ids, question_ids, params))

    def step(self) -> list[Turn]:
        turns = self.manager.step()
        for turn in turns:
            if turn.created is not None:
                self.table.put(turn.session_id, turn.context_ids, turn.created)
        return turns

    def trim_pool(self) -> None:
        self.table.give_back(self.manager.surplus())


def run_sessions(engine, arena: HostArena, store: EvalSessions, samples: list[Sample], inputs: RunInputs,
                 owner: str) -> list[dict]:
    """Every session sample on ``engine`` (built over ``arena``, from ``store.engine_arena()``):
    its document made a session if it is not one yet, then its questions asked in order, turn t
    of every document at once. A record per answer."""
    manager = _SessionDriver(engine, store.table, arena.allocator)
    created = []
    for s in samples:
        if s.key not in store.sessions:
            session_id = f"{owner}/{s.key}"
            created.append((s.key, session_id, manager.create(session_id, list(s.prompt_ids))))
    _settle(manager, [seq for _, _, seq in created], inputs)
    for key, session_id, _ in created:
        store.sessions[key] = session_id
    records = []
    params = SamplingParams(max_tokens=inputs.spec.max_tokens)
    for t in range(SESSION_TURNS):
        asked = [(s, manager.ask(store.sessions[s.key], list(s.turns[t].question_ids), params)) for s in samples]
        prefilled = {seq.seq_id: None for _, seq in asked}
        t0 = time.perf_counter()
        for turn in _settle(manager, [seq for _, seq in asked], inputs):
            prefilled[turn.seq.seq_id] = turn.prefill_tokens
        wall = (time.perf_counter() - t0) / max(1, len(asked))
        for s, seq in asked:
            turn = s.turns[t]
            records.append({"task": "session", "key": f"{s.key}/{t}", "text": None, "context": s.context,
                            "depth": turn.depth, "index": s.index, "turn": t,
                            "prompt_tokens": len(s.prompt_ids) + len(turn.question_ids),
                            "prefill_tokens": prefilled[seq.seq_id], "reply": seq.text,
                            "token_ids": list(seq.output_ids), "prefill_s": round(seq.prefill_s, 4),
                            "decode_s": round(seq.decode_s, 4), "kv": seq.kv, "answer": turn.answer,
                            "question": turn.question, "correct": answer_found(seq.text, turn.answer),
                            "wall_s": round(wall, 4)})
        if inputs.on_done:
            inputs.on_done(len(samples))
    if not store.shared:
        for key, session_id, _ in created:
            store.table.delete(session_id)
            store.sessions.pop(key)
    manager.trim_pool()
    return records


def _settle(manager: _SessionDriver, seqs: list[Sequence], inputs: RunInputs) -> list:
    """Step the manager until every one of ``seqs`` finished; the turns that finished meanwhile."""
    done = []
    while any(s.status is not Status.FINISHED for s in seqs):
        done += manager.step()
        inputs.steps += 1
    return done
