"""``lsa calibrate``: find once per model which layers attend locally and which retrieve, and
store the layer plan beside the model (engine/policies/layer_plan.py reads it).

    for each text window (essays, pydoc, ...):   a dense prefill, K of every layer, the last
                                                 ``queries`` queries (engine/prompt_state.py)
    per layer and KV head:                       at the budget's K blocks, the mass a recent
                                                 window holds and the mass a set fixed in
                                                 advance from the window's first queries holds
                                                 (lab/attention_profile.py)
    plan:                                        layers where the fixed set holds more than the
                                                 window by ``margin`` retrieve, the others are
                                                 local; Level-1 scores at the retrieving layers

The local group keeps ``local_recent`` of its budget recent (1.0: a window, no selection);
``local_weight`` scales its budget against the retrieving group's (the total is held).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engine.config import PolicyConfig
from engine.errors import InvalidRequestError
from engine.policies.layer_plan import GroupPlan, LayerPlan

DEFAULT_TEXTS = ("essays", "pydoc")


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    from engine.options import HelpFormatter

    p = subparsers.add_parser("calibrate", formatter_class=HelpFormatter,
                              help="find which layers attend locally and which retrieve; write a layer plan for "
                                   "lsa (--layer-plan) beside the model")
    p.add_argument("--model", default="smollm2-135m", help="embedded name, Hugging Face directory or .gguf file")
    p.add_argument("--texts", default=",".join(DEFAULT_TEXTS), help="essays, pydoc, or text files, comma-separated")
    p.add_argument("--context", type=int, default=2048, help="tokens per window")
    p.add_argument("--windows", type=int, default=4, help="windows per text")
    p.add_argument("--queries", type=int, default=96, help="last prompt positions whose attention is measured")
    p.add_argument("--observe", type=int, default=32, help="of them, the first ones that choose the fixed set")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block")
    p.add_argument("--budget", type=float, default=0.10, help="resident fraction the curves are compared at")
    p.add_argument("--margin", type=float, default=0.0, help="a layer retrieves when the fixed set holds this much "
                   "more mass than the recent window")
    p.add_argument("--local-recent", type=float, default=1.0, help="share of a local layer's budget kept recent")
    p.add_argument("--local-weight", type=float, default=1.0, help="budget of a local layer against a retrieving one")
    p.add_argument("--targets", type=int, default=0, help="Level-1 index layers: 0, LSA's default (three over the "
                   "middle); N > 0, the N retrieving layers that gain most (on SmolLM2 those, layers 3, 4 and 7, "
                   "took NIAH at 4K from 80%% to 10%%: docs/accuracy.md)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32")
    p.add_argument("--out", default=None, help="plan file (default: beside the model, <model>.lsa-plan.json)")
    return p


def default_plan_path(model: str) -> Path:
    """Beside the model: ``<file>.lsa-plan.json`` for a GGUF, ``lsa-plan.json`` in an HF directory."""
    from engine.weights import resolve_model

    source = resolve_model(model)
    return source.path.with_name(source.path.name + ".lsa-plan.json") if source.kind == "gguf" \
        else source.path / "lsa-plan.json"


def derive_plan(profiles, identity: dict, k: int, margin: float, local_recent: float, local_weight: float,
                targets: int, calibration: dict) -> LayerPlan:
    """A layer plan from per-layer profiles (lab/attention_profile.py) compared at ``k`` blocks."""
    gains = [float(p.selected[:, k].mean() - p.recent[:, k].mean()) for p in profiles]
    retrieve = [i for i, g in enumerate(gains) if g > margin]
    local = [i for i, g in enumerate(gains) if g <= margin]
    if not retrieve:
        raise InvalidRequestError("no layer holds more with a fixed selection than with a recent window here: "
                                  "a layer plan would be StreamingLLM; lower --margin or calibrate on other text")
    ranked = sorted(retrieve, key=lambda i: -gains[i])
    # index layers: LSA's default unless asked for by gain (the layers where a fixed set gains most
    # over a window are not the ones whose queries find what a question needs: docs/accuracy.md)
    index_layers = ranked[:targets] if targets > 0 else PolicyConfig(name="lsa").layers(len(profiles))
    groups = [GroupPlan(tuple(retrieve), 1.0, None, "retrieve")]
    if local:
        groups.append(GroupPlan(tuple(local), local_weight, local_recent, "local"))
    heads = []
    for i, p in enumerate(profiles):  # KV heads whose better kind is not their layer's
        kinds = (p.selected[:, k] - p.recent[:, k] > margin).tolist()
        heads.append(sum(kind != (i in retrieve) for kind in kinds))
    calibration = {**calibration, "compared_at_blocks": k, "margin": margin, "selection_gain": gains,
                   "heads_against_their_layer": heads,
                   "per_layer": [{"recent": p.recent[:, k].tolist(), "selected": p.selected[:, k].tolist(),
                                  "oracle": p.oracle[:, k].tolist()} for p in profiles]}
    return LayerPlan(identity, tuple(groups), tuple(sorted(index_layers)), calibration)


def run_calibrate(args) -> int:
    import torch

    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.llm import LLMEngine
    from engine.policies.layer_plan import model_identity
    from engine.prompt_state import PromptRecorder, capture_prompt
    from lab.attention_profile import profile_states
    from lab.evaluation import load
    from lab.haystack import load_text

    if args.observe >= args.queries or min(args.windows, args.context) < 1 or args.targets < 0:
        raise InvalidRequestError("--observe must be below --queries; --windows, --context >= 1; --targets >= 0")
    if not 0.0 < args.budget <= 1.0:
        raise InvalidRequestError(f"--budget must be in (0, 1], got {args.budget}")
    out = Path(args.out) if args.out else default_plan_path(args.model)
    texts = [t for t in args.texts.split(",") if t.strip()]
    t0 = time.perf_counter()
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    model, tokenizer = load(args.model, device, args.dtype)
    config = EngineConfig(device=device, cache=CacheConfig(block_size=args.block_size, host_mirror=False),
                          scheduler=SchedulerConfig(max_num_seqs=1, prefill_chunk=args.context,
                                                    max_model_len=args.context + 1),
                          policy=PolicyConfig(name="full"))
    recorder = PromptRecorder(config.policy, model.config.num_layers, args.block_size, args.queries)
    engine = LLMEngine(model, config, tokenizer, policy=recorder)
    states = []
    for name in texts:
        ids = tokenizer.encode(load_text(name, min_chars=8 * args.context * args.windows)
                               [: 8 * args.context * (args.windows + 1)], add_special_tokens=False)
        if len(ids) < args.context:
            raise InvalidRequestError(f"text {name} has {len(ids)} tokens; --context is {args.context}")
        stride = (len(ids) - args.context) // max(1, args.windows - 1)
        states += [capture_prompt(engine, ids[i * stride: i * stride + args.context]) for i in range(args.windows)]
    k = max(3, int(args.budget * args.context / args.block_size))
    profiles = profile_states(states, args.block_size, k, args.observe)
    plan = derive_plan(profiles, model_identity(model), k, args.margin, args.local_recent, args.local_weight,
                       args.targets, {"model": args.model, "texts": texts, "context": args.context,
                                      "windows": args.windows, "queries": args.queries, "observe": args.observe,
                                      "block_size": args.block_size, "budget": args.budget, "dtype": str(
                                          next(model.parameters()).dtype), "seconds": round(time.perf_counter() - t0, 1)})
    try:
        plan.save(out)
    except OSError as exc:
        raise InvalidRequestError(f"cannot write the layer plan to {out}: {exc.strerror or exc}; give --out") from exc
    for g in plan.groups:
        print(f"{g.name}: layers {','.join(map(str, g.layers))} (weight {g.weight:g}, recent "
              f"{'tail rule' if g.recent is None else g.recent})", file=sys.stderr)
    print(f"Level-1 index layers {','.join(map(str, plan.target_layers))}; KV heads against their layer: "
          f"{sum(plan.calibration['heads_against_their_layer'])} of {len(profiles) * model.config.num_kv_heads}",
          file=sys.stderr)
    print(f"layer plan: {out}  (lsa ... --layer-plan {out})", file=sys.stderr)
    return 0
