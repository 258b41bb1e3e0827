"""``lsa eval``: accuracy of the attention policies against full attention on one model.

The model is loaded once; one engine is built per (policy, budget, context) over it, ``full``
once (it has no budget) and first, since its greedy tokens are the agreement reference. Every
policy sees the same prompts, and, by default, the same prefill: prefill is dense and the
same for every policy, so each prompt is prefilled once (engine/prompt_state.py) and written
into each policy's engine, which then decodes its samples many at once (``--batch``). Tasks
live in :mod:`lab.tasks`, the batched running in :mod:`lab.running`, the report in
:mod:`lab.report`; docs/accuracy.md says what each task measures.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.options import add_arguments, from_args
from lab.haystack import TEXT_NAMES
from lab.report import run_label
from lab.runs import Run
from lab.tasks import SESSION_TURNS, TASKS, TEXT_TASKS, TaskSpec, build_samples, load_needles

POLICY_NAMES = ("full", "lsa", "quest", "streaming", "snapkv", "oracle", "oracle_head")
GRID_FIELDS = ("policy", "budget", "max_num_seqs", "max_model_len")  # set per run by the grid
EVAL_DEFAULTS = {"stagger_boundaries": False}  # a sample's numbers do not depend on its batch


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values: {exc}") from exc
    return parse


def _limit(text: str) -> int | dict[str, int]:
    """``--limit``: one count for every task, or ``niah=4,ppl=20``."""
    try:
        if "=" not in text:
            return int(text)
        pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
        return {task.strip(): int(n) for task, n in pairs}
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N or TASK=N,...: {exc}") from exc


def _policy_list(text: str) -> tuple[str, ...]:
    """Comma-separated policy specs, where a variant's list value keeps its commas
    (``lsa:target_layers=3,4,7,streaming``: a piece of digits continues the previous spec)."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if piece.lstrip("-").isdigit() and specs and "=" in specs[-1]:
            specs[-1] += "," + piece
        elif piece:
            specs.append(piece)
    return tuple(specs)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="accuracy harness: needle-in-a-haystack, multi-key retrieval, "
                              "perplexity and agreement with full attention, per policy and budget")
    g = p.add_argument_group("grid")
    g.add_argument("--tasks", type=_csv(str), default=TASKS, help=f"comma-separated, of {','.join(TASKS)}")
    g.add_argument("--policies", type=_policy_list, default=("full", "lsa"), help=f"of {','.join(POLICY_NAMES)}; a "
                   "variant as [LABEL=]NAME:KEY=VALUE[:KEY=VALUE...] (config fields of its own)")
    g.add_argument("--budgets", type=_csv(float), default=(0.1,), help="resident fractions, e.g. 0.05,0.1,0.2")
    g.add_argument("--contexts", type=_csv(int), default=(2048, 4096), help="context lengths in tokens "
                   "(shortened to fit the model with the generated tokens)")
    g.add_argument("--depths", type=_csv(float), default=(0.1, 0.3, 0.5, 0.7, 0.9), help="needle depths, 0..1")
    g.add_argument("--limit", type=_limit, default=None, help="samples per grid cell, or per task as "
                   "TASK=N,... (default: every needle for "
                   "niah, 4 documents (20 answers) for session, 2 for the other tasks)")
    g.add_argument("--batch", type=int, default=20, help="samples decoded together (the engines' max_num_seqs)")
    g.add_argument("--shared-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="prefill each prompt once for every policy (prefill is dense and the same for all)")
    g.add_argument("--keep-going", action="store_true", help="record a failing (policy, budget) and go on")
    d = p.add_argument_group("data")
    d.add_argument("--haystack", default=None, help="directory of .txt files (default: shared essays, else "
                   "synthetic filler)")
    d.add_argument("--needles", default=None, help='JSONL of {"needle","question","answer"} (default: built-in)')
    d.add_argument("--texts", type=_csv(str), default=("essays",), help="texts for ppl and agreement: essays (the "
                   "haystack), pydoc (the Python reference of this interpreter), or text file paths")
    d.add_argument("--num-keys", type=int, default=4, help="multikey: needles per prompt, one asked")
    d.add_argument("--max-tokens", type=int, default=32, help="tokens generated for niah and multikey")
    d.add_argument("--ppl-tokens", type=int, default=256, help="ppl: last tokens of each window, teacher-forced")
    d.add_argument("--agreement-tokens", type=int, default=64, help="agreement: greedy tokens compared")
    d.add_argument("--seed", type=int, default=0, help="seed of the synthetic filler and the multikey samples")
    e = p.add_argument_group("engine and policy (every field of EngineConfig; --policies and --budgets above)")
    e.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's; 1 is "
                   "steadier on a small machine shared with other work)")
    add_arguments(e, EngineConfig, exclude=GRID_FIELDS, defaults=EVAL_DEFAULTS)
    p.add_argument("--out", default="eval-out", help="directory for results.json, results.md, accuracy.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _runs(policies, budgets) -> list[Run]:
    """The runs: full once without a budget and first, the others per budget. A policy is
    ``[LABEL=]NAME[:KEY=VALUE...]``: a registered policy with config fields of its own, e.g.
    ``planned=lsa:layer_plan=plan.json:tail_tokens=64`` (LABEL names it in the tables)."""
    specs = [parse_policy(text) for text in dict.fromkeys(policies)]
    labels = [s.label for s in specs]
    if len(set(labels)) < len(labels):
        raise InvalidRequestError(f"policy labels repeat: {labels}")
    runs = [Run("full", "full", None, {})] if any(s.name == "full" and not s.overrides for s in specs) else []
    return runs + [Run(s.label, s.name, b, s.overrides) for s in specs if s.label != "full" for b in budgets]


def parse_policy(text: str) -> Run:
    """A policy spec of ``--policies`` (budget unset)."""
    head, *pairs = text.split(":")
    label, _, name = head.rpartition("=")
    label = label or (text if pairs else name)
    if name not in POLICY_NAMES:
        raise InvalidRequestError(f"unknown policy {name!r} in {text!r}; use {', '.join(POLICY_NAMES)}")
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequestError(f"policy {text!r}: expected KEY=VALUE after ':', got {pair!r}")
        if key in GRID_FIELDS:
            raise InvalidRequestError(f"policy {text!r}: {key} is set by the grid (--policies, --budgets)")
        overrides[key] = value
    if overrides:
        from engine.options import build, flatten

        build(EngineConfig, {**flatten(EngineConfig()), **overrides})  # unknown keys and bad values: now
    if name == "full" and overrides:
        raise InvalidRequestError(f"policy {text!r}: full attention takes no settings")
    return Run(label, name, None, overrides)


def load(model_name: str, device: str, dtype: str):
    """(model, tokenizer) shared by every engine of the run."""
    from engine.config import parse_dtype
    from engine.loader import load_model
    from engine.tokenizer import Tokenizer
    from engine.weights import resolve_model

    source = resolve_model(model_name)
    return load_model(source, device, parse_dtype(dtype, device)), Tokenizer(source)


def _validate(args) -> None:
    bad_tasks = [t for t in args.tasks if t not in TASKS]
    if bad_tasks:
        raise InvalidRequestError(f"unknown tasks {bad_tasks}; use {', '.join(TASKS)}")
    if not args.tasks or not args.contexts or not args.policies:
        raise InvalidRequestError("--tasks, --policies and --contexts need at least one value")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        raise InvalidRequestError(f"depths must be in [0, 1], got {args.depths}")
    if any(not 0.0 < b <= 1.0 for b in args.budgets):
        raise InvalidRequestError(f"budgets must be in (0, 1], got {args.budgets}")
    limits = args.limit.values() if isinstance(args.limit, dict) else [args.limit]
    if any(n is not None and n < 1 for n in limits):
        raise InvalidRequestError("--limit must be >= 1")
    if isinstance(args.limit, dict) and set(args.limit) - set(TASKS):
        raise InvalidRequestError(f"--limit names unknown tasks {sorted(set(args.limit) - set(TASKS))}")
    if args.batch < 1:
        raise InvalidRequestError("--batch must be >= 1")
    if not args.texts:
        raise InvalidRequestError(f"--texts needs at least one of {', '.join(TEXT_NAMES)} or a file")
    if min(args.max_tokens, args.ppl_tokens, args.agreement_tokens) < 1:
        raise InvalidRequestError("--max-tokens, --ppl-tokens and --agreement-tokens must be >= 1")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_eval(args) -> int:
    import torch
    from tqdm import tqdm

    from lab.grid import EvalGrid
    from lab.haystack import BUILTIN_NEEDLES, haystack_dir, load_haystack, load_text, text_label
    from lab.report import write_outputs

    _validate(args)
    runs = _runs(args.policies, args.budgets)
    needles = load_needles(args.needles) if args.needles else BUILTIN_NEEDLES
    haystack_source = args.haystack or haystack_dir()
    session_limit = args.limit.get("session") if isinstance(args.limit, dict) else args.limit
    sessions = (session_limit or 4) if "session" in args.tasks else 1
    min_chars = 8 * max(args.contexts) * sessions
    haystack = load_haystack(args.haystack, min_chars=min_chars, seed=args.seed)  # bad paths: before the model loads
    texts = {} if not set(args.tasks) & set(TEXT_TASKS) else \
        {text_label(name): haystack if name == "essays" else load_text(name) for name in dict.fromkeys(args.texts)}
    base = from_args(args, EngineConfig)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tokenizer = load(args.model, base.device_name, args.dtype)
    load_s = time.perf_counter() - t_start

    longest_new = max(args.max_tokens, args.agreement_tokens)
    model_len = min(model.config.max_position_embeddings, max(args.contexts) + longest_new)
    spec = TaskSpec(contexts=args.contexts, depths=args.depths, needles=tuple(needles), limit=args.limit,
                    num_keys=args.num_keys, ppl_tokens=args.ppl_tokens, agreement_tokens=args.agreement_tokens,
                    max_tokens=args.max_tokens, max_model_len=model_len, seed=args.seed)
    t0 = time.perf_counter()
    samples = []
    for task in args.tasks:
        sources = texts.items() if task in TEXT_TASKS else [(None, haystack)]
        samples += [s for name, text in sources for s in build_samples(task, spec, tokenizer, text, name)]
    build_s = time.perf_counter() - t0

    grid = EvalGrid(args, base, model, tokenizer, spec, runs)
    need_reference = any(s.task == "agreement" for s in samples) and not any(r.name == "full" for r in runs)
    per_run = sum(SESSION_TURNS if s.task == "session" else 1 for s in samples)
    total = per_run * len(runs) + (sum(s.task == "agreement" for s in samples) if need_reference else 0)
    config = {k: v for k, v in vars(args).items() if k != "command"}
    config.update(command=_command_line(args), device=base.device_name,
                  haystack_source=str(haystack_source or "synthetic filler"), num_needles=len(needles),
                  max_model_len=model_len, git_commit=_git_commit(), texts=list(texts),
                  runs=[run_label(r.label, r.budget) for r in runs])

    def result(partial: bool) -> dict:
        return {"config": config, "partial": partial,
                "timings": {"load_model_s": round(load_s, 2), "build_samples_s": round(build_s, 2),
                            "total_s": round(time.perf_counter() - t_start, 2), **grid.timings},
                "errors": grid.errors, "records": grid.records}

    with tqdm(total=total, unit="sample", disable=args.quiet, file=sys.stderr) as bar:
        grid.run(samples, need_reference, bar, checkpoint=lambda: write_outputs(Path(args.out), result(True),
                                                                               plot=False))
    paths = write_outputs(Path(args.out), result(False))
    for kind, path in paths.items():
        print(f"{kind}: {path}", file=sys.stderr)
    return 1 if grid.errors else 0


def _command_line(args) -> str:
    """``lsa eval`` with the flags that differ from their defaults, to rerun the same grid."""
    parser = argparse.ArgumentParser()
    defaults = vars(add_eval_parser(parser.add_subparsers()).parse_args([]))
    words = ["lsa", "eval"]
    for key, value in vars(args).items():
        if key not in defaults or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            if isinstance(value, dict):
                text = ",".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, tuple):
                text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
            else:
                text = str(value)
            words += [flag, shlex.quote(text)]
    return " ".join(words)
