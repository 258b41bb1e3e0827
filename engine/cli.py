"""The ``lsa`` command line: ``lsa generate`` and ``lsa demo``."""
from __future__ import annotations

import argparse
import json
import sys
import time

from engine.errors import LSAError
from engine.evaluation import add_eval_parser, run_eval
from engine.indexer_train import add_train_indexer_parser, run_train_indexer
from engine.traces import add_dump_traces_parser, run_dump_traces


def _engine_args(p: argparse.ArgumentParser) -> None:
    from engine.config import EngineConfig
    from engine.options import add_arguments

    add_arguments(p.add_argument_group("engine (every field of EngineConfig)"), EngineConfig)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsa", description="lsa-serve: long-context LLM serving with "
                                     "Lookahead Sparse Attention")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def add_subcommands(sub) -> None:
    """Register this CLI's subcommands on ``sub`` (``lsa`` in cluster/cli.py adds its own);
    ``COMMANDS`` maps each name to its handler."""
    gen = sub.add_parser("generate", help="generate from one prompt")
    gen.add_argument("prompt", nargs="?", help="prompt text (or --prompt-file)")
    gen.add_argument("--prompt", dest="prompt_opt", help=argparse.SUPPRESS)
    gen.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    _engine_args(gen)
    _sampling_args(gen)
    demo = sub.add_parser("demo", help="long-context demo: hide a fact in a long document and ask for it")
    demo.add_argument("--context-tokens", type=int, default=3000)
    demo.add_argument("--depth", type=float, default=0.5, help="where the fact sits, 0 = start, 1 = end")
    demo.add_argument("--haystack", default=None, help="directory of .txt files (default: shared essays, "
                      "else synthetic filler)")
    demo.add_argument("--json", action="store_true")
    _engine_args(demo)
    _sampling_args(demo)
    demo.set_defaults(max_tokens=32)
    add_eval_parser(sub)
    add_dump_traces_parser(sub)
    add_train_indexer_parser(sub)
    try:  # benchmarks/ sits next to the packages: present when run from the repository
        from benchmarks.decode import add_bench_parser
    except ImportError:
        return
    add_bench_parser(sub)


def _make_engine(args):
    from engine.config import EngineConfig
    from engine.llm import LLMEngine
    from engine.options import from_args

    return LLMEngine.from_config(from_args(args, EngineConfig))


def _sampling(args):
    from engine.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def _run(engine, prompt, params, chat: bool, progress: bool):
    """Step the engine over one request, with a progress bar over the prompt when it is long."""
    from tqdm import tqdm

    seq = engine.add_request(prompt, params, chat=chat)
    bar = tqdm(total=seq.prompt_len, desc="prefill", unit="tok", disable=not progress, file=sys.stderr)
    while engine.has_work():
        engine.step()
        if not bar.disable and bar.n < seq.prompt_len:
            bar.update(seq.num_cached - bar.n)
            if bar.n >= seq.prompt_len:
                bar.close()
    bar.close()
    from engine.sequence import Completion

    return Completion(seq.request_id, seq.prompt_ids, seq.output_ids, seq.text, seq.finish_reason,
                      seq.prefill_s, seq.decode_s, seq.kv)


def _print_result(result, as_json: bool, extra: dict | None = None) -> None:
    info = {**result.as_dict(), **(extra or {})}
    if as_json:
        print(json.dumps(info))
        return
    print(result.text)
    kv = result.kv
    print(f"\n--- {info['num_prompt_tokens']} prompt tokens, {info['num_generated_tokens']} generated "
          f"({result.finish_reason}); prefill {result.prefill_s:.2f} s "
          f"({info['num_prompt_tokens'] / max(result.prefill_s, 1e-9):.0f} tok/s), "
          f"decode {result.decode_tokens_per_s:.1f} tok/s", file=sys.stderr)
    print(f"--- KV: full-context {kv['full_kv_bytes'] / 2**20:.1f} MiB, on device {kv['device_kv_bytes'] / 2**20:.1f} "
          f"MiB ({100 * kv['device_kv_fraction']:.1f}% of full), host mirror {kv['host_kv_bytes'] / 2**20:.1f} MiB",
          file=sys.stderr)
    for key, value in (extra or {}).items():
        print(f"--- {key}: {value}", file=sys.stderr)


def cmd_generate(args) -> int:
    prompt = args.prompt if args.prompt is not None else args.prompt_opt
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    if prompt is None:
        raise SystemExit("lsa generate: give a prompt, --prompt TEXT or --prompt-file FILE")
    params = _sampling(args)
    engine = _make_engine(args)
    result = _run(engine, prompt, params, args.chat, progress=not args.json)
    _print_result(result, args.json)
    return 0


def cmd_demo(args) -> int:
    from engine.haystack import BUILTIN_NEEDLES, haystack_dir, load_haystack, niah_prompt

    params = _sampling(args)
    t0 = time.perf_counter()
    engine = _make_engine(args)
    print(f"loaded {args.model} on {engine.device} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    needle = BUILTIN_NEEDLES[0]
    source = args.haystack or haystack_dir()
    text = load_haystack(args.haystack, min_chars=args.context_tokens * 6)
    ids = niah_prompt(engine.tokenizer, text, [needle], needle.question, args.context_tokens, args.depth)
    print(f"question: {needle.question} (the answer is hidden at depth {args.depth} of a {len(ids)}-token "
          f"document from {source or 'synthetic filler'})", file=sys.stderr)
    result = _run(engine, ids, params, chat=False, progress=not args.json)
    found = needle.answer.lower() in result.text.lower()
    _print_result(result, args.json, {"expected": needle.answer, "correct": found})
    return 0


def cmd_bench(args) -> int:
    from benchmarks.decode import run_bench

    return run_bench(args)


COMMANDS = {"generate": cmd_generate, "demo": cmd_demo, "eval": run_eval, "dump-traces": run_dump_traces,
            "train-indexer": run_train_indexer, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LSAError as exc:
        print(f"lsa: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
