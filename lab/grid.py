"""The grid of ``lsa eval``: for each context, every (policy, budget) run over the same samples.

    capture      each prompt prefilled once, densely (engine/prompt_state.py)   --shared-prefill
    sessions     one host arena and session table for all runs (lab/running.py)
    for each run (full first: its greedy tokens are the agreement reference):
        an engine of the run's policy and budget, decoding --batch samples together (of
        every context); the captured prompts written in, the sessions asked on the shared arena

Memory: the captured prompts are held until the last run is done (K and V of every layer:
189 MB per 8K prompt of SmolLM2 in bf16, on the model's device; 120 such prompts are 23 GB).
"""
from __future__ import annotations

import time

from engine.config import EngineConfig
from engine.llm import LLMEngine
from engine.options import replace
from engine.prompt_state import PromptRecorder, capture_prompt
from engine.host_arena import ArenaLayout
from lab.report import run_label
from lab.running import RunInputs, EvalSessions, run_samples, run_sessions
from lab.runs import Run
from lab.tasks import TaskSpec


class EvalGrid:
    """Runs the samples of each context under every (policy, budget); collects records and errors."""

    def __init__(self, args, base: EngineConfig, model, tokenizer, spec: TaskSpec, runs: list[Run]):
        self.args, self.base, self.model, self.tokenizer = args, base, model, tokenizer
        self.spec, self.runs = spec, runs
        self.model_len = spec.max_model_len
        self.block_size = base.cache.block_size_for(self.model_len)
        self.records: list[dict] = []
        self.errors: list[dict] = []
        self.timings: dict = {"capture_s": 0.0, "captured_prompts": 0, "captured_bytes_max": 0, "runs": []}

    def make_engine(self, run: Run, arena=None) -> LLMEngine:
        """The run's engine; full attention without a host mirror unless it serves sessions (its
        KV never leaves the device: the mirror would only cost host memory, pinned on CUDA)."""
        mirror = {} if run.name != "full" or arena is not None else {"host_mirror": False}
        config = replace(self.base, policy=run.name, budget=1.0 if run.budget is None else run.budget,
                         max_num_seqs=self.args.batch, max_model_len=self.model_len, **mirror, **run.overrides)
        return LLMEngine(self.model, config, self.tokenizer, arena=arena)

    def capture(self, samples) -> dict:
        """Sample key -> PromptState for every sample but the sessions (which share their own way)."""
        config = replace(self.base, policy="full", max_num_seqs=1, max_model_len=self.model_len, host_mirror=False)
        p = config.policy
        recorder = PromptRecorder(p, self.model.config.num_layers, self.block_size,
                                  max(p.observation_window, p.query_window))
        engine = LLMEngine(self.model, config, self.tokenizer, policy=recorder)
        t0 = time.perf_counter()
        states = {s.key: capture_prompt(engine, list(s.prompt_ids)) for s in samples if s.task != "session"}
        self.timings["capture_s"] = round(self.timings["capture_s"] + time.perf_counter() - t0, 2)
        self.timings["captured_prompts"] += len(states)
        self.timings["captured_bytes_max"] = max(self.timings["captured_bytes_max"],
                                                 sum(st.nbytes() for st in states.values()))
        return states

    def eval_sessions(self, sessions) -> EvalSessions | None:
        if not sessions:
            return None
        layout = ArenaLayout.of(self.model.config, self.block_size, next(self.model.parameters()).dtype)
        per_seq = -(-self.model_len // self.block_size) + 2
        return EvalSessions(layout, 2 * max(len(sessions), self.args.batch) * per_seq + 64,
                            shared=self.args.shared_prefill)

    def run(self, samples, need_reference: bool, bar, checkpoint=None) -> None:
        """Every run over ``samples`` (all contexts: an engine serves them together); after each
        run ``checkpoint()`` (the results so far are written, so a run cut short leaves them)."""
        plain = [s for s in samples if s.task != "session"]
        sessions = [s for s in samples if s.task == "session"]
        bar.set_description("prefill (shared)")
        states = self.capture(plain) if self.args.shared_prefill and plain else None
        store = self.eval_sessions(sessions)
        reference: dict[str, list[int]] = {}
        done = bar.update
        if need_reference:
            bar.set_description("full (agreement reference)")
            agreement = [s for s in plain if s.task == "agreement"]
            run_samples(self.make_engine(Run("full", "full", None)), agreement,
                        RunInputs(self.spec, reference, True, states, done))
        for run in self.runs:
            label = run_label(run.label, run.budget)
            bar.set_description(label)
            t_run = time.perf_counter()
            inputs = RunInputs(self.spec, reference, run.name == "full", states, done)
            try:
                records = run_samples(self.make_engine(run), plain, inputs) if plain else []
                if sessions:
                    arena = store.engine_arena()
                    records += run_sessions(self.make_engine(run, arena), arena, store, sessions, inputs, owner=label)
                self.records += [{"policy": run.label, "budget": run.budget, **r} for r in records]
            except Exception as exc:  # noqa: BLE001 - recorded with --keep-going, re-raised otherwise
                if not self.args.keep_going:
                    raise
                self.errors.append({"policy": run.label, "budget": run.budget, "error": f"{type(exc).__name__}: {exc}"})
            self.timings["runs"].append({"policy": run.label, "budget": run.budget,
                                         "seconds": round(time.perf_counter() - t_run, 2), "steps": inputs.steps})
            if checkpoint:
                checkpoint()
