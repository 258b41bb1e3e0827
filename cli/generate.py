"""``lsa generate`` and ``lsa demo``: the engine in this process, one prompt, no Ray."""
from __future__ import annotations

import argparse
import json
import sys
import time


def add_commands(sub) -> None:
    gen = sub.add_parser("generate", help="generate from one prompt", description="Generate from one prompt "
                         "with the engine in this process (no Ray).")
    gen.add_argument("prompt", nargs="?", help="prompt text (or --prompt-file)")
    gen.add_argument("--prompt", dest="prompt_opt", help=argparse.SUPPRESS)
    gen.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    _engine_args(gen)
    _sampling_args(gen)
    gen.set_defaults(func=run_generate)

    demo = sub.add_parser("demo", help="long-context demo in one process: hide a fact in a long document and "
                          "ask for it", description="Hide a fact in a long document and ask for it, with the "
                          "engine in this process (no Ray; `lsa cluster-demo` is the served version).")
    demo.add_argument("--context-tokens", type=int, default=3000, help="document length in tokens")
    demo.add_argument("--depth", type=float, default=0.5, help="where the fact sits, 0 = start, 1 = end")
    demo.add_argument("--haystack", default=None, help="directory of .txt files (default: shared essays, "
                      "else synthetic filler)")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    _engine_args(demo)
    _sampling_args(demo)
    demo.set_defaults(max_tokens=32, func=run_demo)


def _engine_args(p: argparse.ArgumentParser) -> None:
    from engine.config import EngineConfig
    from engine.options import add_arguments

    add_arguments(p.add_argument_group("engine (every field of EngineConfig)"), EngineConfig)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set holding this mass")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0: no limit")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


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

    from engine.sequence import Completion

    seq = engine.add_request(prompt, params, chat=chat)
    bar = tqdm(total=seq.prompt_len, desc="prefill", unit="tok", disable=not progress, file=sys.stderr)
    while engine.has_work():
        engine.step()
        if not bar.disable and bar.n < seq.prompt_len:
            bar.update(seq.num_cached - bar.n)
            if bar.n >= seq.prompt_len:
                bar.close()
    bar.close()
    if seq.error is not None:
        raise seq.error
    return Completion(seq.request_id, seq.prompt_ids, seq.output_ids, seq.text, seq.finish_reason,
                      seq.prefill_s, seq.decode_s, seq.kv)


def kv_line(kv: dict, device: str) -> str:
    """The KV accounting in one line. The resident KV counts whole blocks and the index keys,
    so at a context of a few blocks it can exceed the full-context KV."""
    mib = 1 / 2**20
    line = (f"KV: full-context {kv['full_kv_bytes'] * mib:.1f} MiB, resident on {device} "
            f"{kv['device_kv_bytes'] * mib:.1f} MiB ({100 * kv['device_kv_fraction']:.1f}% of full")
    if kv["device_kv_fraction"] > 1.0:
        line += ": whole blocks and index keys outweigh a context this short"
    return line + f"), host mirror {kv['host_kv_bytes'] * mib:.1f} MiB"


def _print_result(result, device: str, as_json: bool, extra: dict | None = None) -> None:
    info = {**result.as_dict(), **(extra or {})}
    if as_json:
        print(json.dumps(info))
        return
    print(result.text)
    print(f"\n--- {info['num_prompt_tokens']} prompt tokens, {info['num_generated_tokens']} generated "
          f"({result.finish_reason}); prefill {result.prefill_s:.2f} s "
          f"({info['num_prompt_tokens'] / max(result.prefill_s, 1e-9):.0f} tok/s), "
          f"decode {result.decode_tokens_per_s:.1f} tok/s", file=sys.stderr)
    print(f"--- {kv_line(result.kv, device)}", file=sys.stderr)
    for key, value in (extra or {}).items():
        print(f"--- {key}: {value}", file=sys.stderr)


def _read_prompt(args) -> str:
    from engine.errors import InvalidRequestError

    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise InvalidRequestError(f"cannot read --prompt-file {args.prompt_file}: "
                                      f"{exc.strerror or exc}") from exc
    prompt = args.prompt if args.prompt is not None else args.prompt_opt
    if prompt is None:
        raise InvalidRequestError("give a prompt: lsa generate TEXT, or --prompt-file FILE")
    return prompt


def run_generate(args) -> int:
    prompt = _read_prompt(args)
    params = _sampling(args)
    engine = _make_engine(args)
    result = _run(engine, prompt, params, args.chat, progress=not args.json)
    _print_result(result, engine.device.type, args.json)
    return 0


def run_demo(args) -> int:
    from lab.haystack import BUILTIN_NEEDLES, haystack_dir, load_haystack, niah_prompt

    params = _sampling(args)
    source = args.haystack or haystack_dir()
    text = load_haystack(args.haystack, min_chars=args.context_tokens * 6)
    t0 = time.perf_counter()
    engine = _make_engine(args)
    print(f"loaded {args.model} on {engine.device} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    needle = BUILTIN_NEEDLES[0]
    ids = niah_prompt(engine.tokenizer, text, [needle], needle.question, args.context_tokens, args.depth)
    print(f"question: {needle.question} (the answer is hidden at depth {args.depth} of a {len(ids)}-token "
          f"document from {source or 'synthetic filler'})", file=sys.stderr)
    result = _run(engine, ids, params, chat=False, progress=not args.json)
    found = needle.answer.lower() in result.text.lower()
    _print_result(result, engine.device.type, args.json, {"expected": needle.answer, "correct": found})
    return 0
