"""``lsa dump-traces``: golden-block traces for training the Level-1 indexer without the model.

The model reads calibration text: prefill a context of P tokens, then teacher-force the next S
tokens through the decode path under :class:`TracePolicy` (full attention; it only records).
Every ``stride`` decode steps (default: the cycle N) a boundary t yields one sample:

    decode step   0 ... t-W ... t-1 | t ........ t+N-1 | ...
    inputs            last W queries | (what the indexer sees at the boundary)
    labels                           | blocks full attention needs over these N steps
    blocks        0 .. M-1 complete at the boundary (M = (P + t) // B); later ones are the tail

    queries [Lt, W, Hq, D]     post-RoPE queries of the last W positions before t, target layers
                               (the last prompt queries fill the window at t = 0)
    keys    [Lt, M, Hkv, 3, D] min / max / mean key of each complete block (cache.mirror.summary)
    labels  [M] bool           golden blocks (below)
    votes   [M] int32          per block, the most layers that picked it at one step of the window
    mass    [L, M] float32     per layer, mean over the window of the block's attention mass
                               (averaged over query heads), for mass-weighted recall
    recent_mass [L, M] float32 the same over the W decode steps before t (what
                               ``index_score="attention"`` computes at the boundary); zeros at t = 0

Golden labels (the FlashMemory recipe, per token, then over the window): at each decode step and
layer, the head-averaged attention mass over all blocks of the sequence is sorted and the
smallest set holding ``top_p`` (0.6) of it is "picked"; a block is golden for the step if at
least ``min_votes`` (3) layers pick it; a block is golden for the sample if it is golden at some
step of the window. Blocks completed inside the window are never labelled: they are the tail.

One safetensors shard per traced sequence holds its samples (``{i}.queries`` ...), and
``manifest.json`` says what the shards are (model shape, block size, layers, split, counts).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import kernels
from engine.config import CacheConfig, EngineConfig, PolicyConfig, SchedulerConfig
from engine.errors import InvalidRequestError
from engine.policies import Policy

FORMAT = "lsa-traces/1"
FIELDS = ("queries", "keys", "labels", "votes", "mass")
OPTIONAL_FIELDS = ("recent_mass",)  # absent from shards written before 2026-12-02


@dataclass(frozen=True)
class TraceConfig:
    block_size: int = 16
    cycle: int = 64  # N: the label window, decode steps
    window: int = 8  # W: recent queries the indexer sees (PolicyConfig.query_window)
    target_layers: tuple[int, ...] = ()
    top_p: float = 0.6
    min_votes: int = 3
    stride: int | None = None  # decode steps between samples; None: the cycle

    def __post_init__(self):
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if min(self.cycle, self.window, self.min_votes, self.block_size) < 1 or (self.stride or 1) < 1:
            raise InvalidRequestError("cycle, window, min_votes, block_size and stride must be >= 1")
        if not self.target_layers:
            raise InvalidRequestError("give at least one target layer")

    @property
    def every(self) -> int:
        return self.stride or self.cycle


# ---------------------------------------------------------------- labels


def picked_blocks(mass: torch.Tensor, num_blocks: torch.Tensor, top_p: float) -> torch.Tensor:
    """mass [S, L, Mmax] (rows padded past num_blocks [S]) -> bool [S, L, Mmax]: per step and
    layer, the smallest highest-mass set of blocks holding ``top_p`` of the row's mass."""
    idx, _ = kernels.select_blocks(mass, num_blocks, top_p=top_p)  # [S, L, Mmax], -1 padded
    picks = torch.zeros(mass.shape[0], mass.shape[1], mass.shape[2] + 1, dtype=torch.bool)
    picks.scatter_(2, torch.where(idx < 0, mass.shape[2], idx), True)
    return picks[..., :-1]


def golden_labels(mass: torch.Tensor, num_blocks: torch.Tensor, m: int, top_p: float, min_votes: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [m] bool, votes [m] int32) of the first ``m`` blocks from the window's mass [S, L, Mmax]."""
    votes = picked_blocks(mass, num_blocks, top_p).sum(1)  # [S, Mmax] layers picking each block
    return (votes >= min_votes).any(0)[:m], votes.amax(0)[:m].to(torch.int32)


# ---------------------------------------------------------------- recording


class TracePolicy(Policy):
    """Full attention that records, for one sequence at a time, the target layers' queries, the
    complete blocks' key summaries at each boundary, and every layer's block mass per step."""

    selects_each_step = True  # select() records each step's block mass on the host: eager steps
    observes_decode = True

    def __init__(self, config: PolicyConfig, num_layers: int, block_size: int, trace: TraceConfig):
        super().__init__(config, num_layers, block_size)
        self.trace = trace
        self.prefill_window = trace.window
        self.targets = trace.target_layers
        self.reset()

    def reset(self) -> None:
        self._queries = {layer: deque(maxlen=self.trace.window) for layer in self.targets}
        self._step = 0
        self.snapshots: list[dict] = []  # per boundary: t, queries, keys
        self.step_mass: list[list[torch.Tensor]] = []  # per decode step, per layer: mass [blocks so far]

    def observes_prefill(self, layer: int) -> bool:
        return layer in self.targets

    def observe_prefill(self, seq_id, layer, q, keys, scale):
        self._queries[layer].extend(q[-self.trace.window:].float().cpu())

    def observe_decode(self, layer, seq_ids, q):
        if len(seq_ids) != 1:
            raise InvalidRequestError("TracePolicy traces one sequence at a time")
        if layer in self.targets:
            self._queries[layer].append(q[0].float().cpu())

    def before_decode(self, seq_ids: list[int]) -> None:
        if self._step % self.trace.every == 0:
            self.snapshots.append(self._snapshot(seq_ids[0]))
        self.step_mass.append([None] * self.num_layers)
        self._step += 1

    def _snapshot(self, seq_id: int) -> dict:
        host_ids = self.cache.host_blocks(seq_id)  # complete blocks, logical order
        self.cache.mirror.wait_writes()
        summary = self.cache.mirror.summary[torch.tensor(host_ids, dtype=torch.long)]  # [M, L, 3, Hkv, D]
        keys = summary[:, list(self.targets)].permute(1, 0, 3, 2, 4).float()  # [Lt, M, Hkv, 3, D]
        queries = torch.stack([torch.stack(list(self._queries[layer])) for layer in self.targets])
        return {"t": self._step, "queries": queries, "keys": keys.clone()}

    def select(self, layer, q, table, num_blocks, last_len, logical):
        k_cache, v_cache = self.cache.layer(layer)
        _, mass = kernels.sparse_decode_attention(q, k_cache, v_cache, table, num_blocks, last_len,
                                                  q.shape[-1] ** -0.5, return_block_mass=True)
        n = int(num_blocks[0])
        per_block = torch.zeros(n)
        per_block[torch.tensor(logical[0][:n])] = mass[0, :, :n].mean(0).cpu()  # head mean, sums to 1
        self.step_mass[-1][layer] = per_block
        return None

    def samples(self) -> list[dict[str, torch.Tensor]]:
        """The boundaries whose whole label window was traced, as tensors (see the module doc)."""
        out = []
        n = self.trace.cycle
        for snap in self.snapshots:
            t, m = snap["t"], snap["keys"].shape[1]
            if t + n > len(self.step_mass) or m == 0:
                continue
            steps = self.step_mass[t: t + n]
            width = max(len(layers[0]) for layers in steps)
            mass = torch.zeros(n, self.num_layers, width)
            for s, layers in enumerate(steps):
                for layer, row in enumerate(layers):
                    mass[s, layer, : len(row)] = row
            counts = torch.tensor([len(layers[0]) for layers in steps])
            labels, votes = golden_labels(mass, counts, m, self.trace.top_p, self.trace.min_votes)
            recent = torch.zeros(self.num_layers, m)
            for layers in self.step_mass[max(0, t - self.trace.window): t]:  # rows may be shorter than m if W > B
                for layer, row in enumerate(layers):
                    recent[layer, : len(row)] += row[:m] / min(t, self.trace.window)
            out.append({"queries": snap["queries"], "keys": snap["keys"], "labels": labels, "votes": votes,
                        "mass": mass[:, :, :m].mean(0), "recent_mass": recent, "t": torch.tensor(t)})
        return out


def trace_sequence(model, ids: list[int], prompt_len: int, trace: TraceConfig,
                   prefill_chunk: int = 1024) -> list[dict[str, torch.Tensor]]:
    """Prefill ``ids[:prompt_len]``, teacher-force the rest through decode, return the samples."""
    from engine.hooks import score_continuation
    from engine.llm import LLMEngine

    if not 0 < prompt_len < len(ids):
        raise InvalidRequestError(f"prompt_len {prompt_len} must be inside the {len(ids)} tokens")
    device = str(next(model.parameters()).device)
    config = EngineConfig(device=device, cache=CacheConfig(block_size=trace.block_size),
                          scheduler=SchedulerConfig(max_num_seqs=1, max_model_len=len(ids) + 1,
                                                    prefill_chunk=prefill_chunk),
                          policy=PolicyConfig(name="full"))
    policy = TracePolicy(config.policy, model.config.num_layers, trace.block_size, trace)
    engine = LLMEngine(model, config, policy=policy)
    # the first continuation token is scored from the prefill; the others are decode steps
    score_continuation(engine, ids[:prompt_len], ids[prompt_len:])
    return policy.samples()


# ---------------------------------------------------------------- files


def write_shard(path: Path, samples: list[dict[str, torch.Tensor]], meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"{i}.{k}": v.contiguous() for i, s in enumerate(samples) for k, v in s.items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})


def read_shard(path: Path) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    flat = load_file(str(path))
    n = len({k.split(".")[0] for k in flat})
    return [{k: flat[f"{i}.{k}"] for k in (*FIELDS, *OPTIONAL_FIELDS, "t") if f"{i}.{k}" in flat} for i in range(n)]


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise InvalidRequestError(f"{directory} has no manifest.json: is it a `lsa dump-traces --out` directory?")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise InvalidRequestError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_traces(directory: str | Path, split: str | None = None) -> list[dict[str, torch.Tensor]]:
    """Every sample of the shards of ``split`` (``train``, ``eval`` or None for all)."""
    manifest = read_manifest(directory)
    out = []
    for shard in manifest["shards"]:
        if split is None or shard["split"] == split:
            out += read_shard(Path(directory) / shard["file"])
    return out


# ---------------------------------------------------------------- calibration text


def calibration_documents(haystack: str | None, eval_docs: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, eval) lists of (name, text): the haystack essays, the last ``eval_docs`` held out;
    deterministic synthetic filler when there is no haystack directory."""
    from lab.haystack import haystack_dir, synthetic_filler

    path = Path(haystack) if haystack else haystack_dir()
    if path is None:
        docs = [(f"synthetic-{i}", synthetic_filler(60_000, seed=i)) for i in range(16)]
    else:
        if not path.is_dir():
            raise InvalidRequestError(f"haystack directory {path} does not exist")
        docs = [(p.name, p.read_text(errors="replace").strip()) for p in sorted(path.glob("*.txt"))]
        docs = [d for d in docs if d[1]]
    if len(docs) <= eval_docs:
        raise InvalidRequestError(f"{len(docs)} documents cannot hold out {eval_docs} and train on the rest")
    return docs[: len(docs) - eval_docs], docs[len(docs) - eval_docs:]


def context_ids(tokenizer, docs: list[tuple[str, str]], start: int, num_tokens: int) -> tuple[list[int], str]:
    """``num_tokens`` ids from documents ``start``, ``start + 1``, ... (wrapping), and their names."""
    ids, names = [], []
    for k in range(len(docs)):
        name, text = docs[(start + k) % len(docs)]
        ids += tokenizer.encode(text + "\n\n", add_special_tokens=False)
        names.append(name)
        if len(ids) >= num_tokens:
            break
    if len(ids) < num_tokens:
        raise InvalidRequestError(f"the calibration text has {len(ids)} tokens, {num_tokens} are needed")
    return ids[:num_tokens], "+".join(names)


# ---------------------------------------------------------------- CLI


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {exc}") from exc


def add_dump_traces_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("dump-traces", help="run the model over calibration text and write golden-block "
                              "traces for `lsa train-indexer`")
    p.add_argument("--model", default="smollm2-135m", help="model to trace (as lsa generate --model)")
    p.add_argument("--out", required=True, help="directory for the shards and manifest.json")
    p.add_argument("--haystack", default=None, help="directory of .txt files (default: shared essays, else "
                   "synthetic filler)")
    p.add_argument("--contexts", type=_csv_ints, default=(2048,), help="prompt lengths in tokens, e.g. 2048,4096")
    p.add_argument("--samples", type=int, default=8, help="training sequences per context length")
    p.add_argument("--eval-samples", type=int, default=2, help="held-out sequences per context length")
    p.add_argument("--eval-docs", type=int, default=6, help="documents held out for the eval sequences")
    p.add_argument("--steps", type=int, default=256, help="decode steps teacher-forced per sequence")
    p.add_argument("--cycle", type=int, default=64, help="N: label window in decode steps")
    p.add_argument("--stride", type=int, default=None, help="decode steps between samples (default: the cycle)")
    p.add_argument("--window", type=int, default=8, help="W: recent queries per sample")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block, the unit of the labels")
    p.add_argument("--target-layers", type=_csv_ints, default=None, help="default: PolicyConfig's (3 mid layers)")
    p.add_argument("--top-p", type=float, default=0.6, help="per step and layer: mass the picked blocks hold")
    p.add_argument("--min-votes", type=int, default=3, help="layers that must pick a block at one step")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is kind to a shared machine)")
    p.add_argument("--resume", action="store_true", help="keep shards an interrupted run already wrote")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@dataclass(frozen=True)
class TraceJob:
    """One sequence to trace: prefill ``ids[:prompt_len]``, teacher-force the rest."""

    split: str  # "train" or "eval"
    ids: list[int]
    prompt_len: int
    source: str = ""


def dump_traces(model, jobs: list[TraceJob], trace: TraceConfig, out: str | Path, model_name: str,
                progress: bool = False, extra: dict | None = None, resume: bool = False) -> dict:
    """Trace every job into ``out`` (one shard each) and write manifest.json; returns the manifest.
    ``resume`` keeps shards already there (same jobs, same settings) instead of tracing them again."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mc = model.config
    shards, seen = [], {}
    bar = tqdm(jobs, unit="seq", disable=not progress, file=sys.stderr)
    for job in bar:
        k = seen[job.split, job.prompt_len] = seen.get((job.split, job.prompt_len), -1) + 1
        name = f"{job.split}-{job.prompt_len}-{k:03d}.safetensors"
        bar.set_description(f"{job.split} {job.prompt_len} {job.source[:30]}")
        if resume and (out / name).is_file():  # traced by an interrupted run with the same settings
            samples = read_shard(out / name)
        else:
            samples = trace_sequence(model, job.ids, job.prompt_len, trace)
            write_shard(out / name, samples, {"source": job.source, "context_tokens": job.prompt_len})
        shards.append({"file": name, "split": job.split, "source": job.source, "context_tokens": job.prompt_len,
                       "num_samples": len(samples), "num_blocks": sum(s["labels"].numel() for s in samples),
                       "num_golden": sum(int(s["labels"].sum()) for s in samples)})
    counts = {split: {key: sum(s[f"num_{key}"] for s in shards if s["split"] == split)
                      for key in ("samples", "blocks", "golden")} for split in ("train", "eval")}
    manifest = {
        "format": FORMAT, "model": model_name,
        "model_shape": {"num_layers": mc.num_layers, "num_heads": mc.num_heads, "num_kv_heads": mc.num_kv_heads,
                        "head_dim": mc.head_dim},
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **asdict(trace), "stride": trace.every, **(extra or {}), "counts": counts,
        "seconds": round(time.perf_counter() - t0, 1), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "shards": shards,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def run_dump_traces(args) -> int:
    from lab.evaluation import load

    if args.samples < 1 or args.eval_samples < 0 or args.steps < args.cycle:
        raise InvalidRequestError("--samples must be >= 1, --eval-samples >= 0 and --steps >= --cycle")
    train_docs, eval_docs = calibration_documents(args.haystack, args.eval_docs)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, args.device, args.dtype)
    targets = tuple(args.target_layers or PolicyConfig().layers(model.config.num_layers))
    PolicyConfig(target_layers=targets).layers(model.config.num_layers)  # validates the layer ids
    trace = TraceConfig(block_size=args.block_size, cycle=args.cycle, window=args.window, target_layers=targets,
                        top_p=args.top_p, min_votes=args.min_votes, stride=args.stride)
    jobs = []
    for c, ctx in enumerate(args.contexts):
        for split, docs, n in (("train", train_docs, args.samples), ("eval", eval_docs, args.eval_samples)):
            for i in range(n):
                start = (i * max(1, len(docs) // n) + c) % len(docs)  # spread the starts over the documents
                ids, source = context_ids(tokenizer, docs, start, ctx + args.steps + 1)
                jobs.append(TraceJob(split, ids, ctx, source))
    manifest = dump_traces(model, jobs, trace, args.out, args.model, progress=not args.quiet,
                           extra={"steps": args.steps, "contexts": list(args.contexts),
                                  "haystack": args.haystack or "default (shared essays or filler)",
                                  "eval_documents": [name for name, _ in eval_docs]}, resume=args.resume)
    c = manifest["counts"]
    blocks = c["train"]["blocks"] + c["eval"]["blocks"]
    print(f"wrote {c['train']['samples']} train and {c['eval']['samples']} eval samples to {args.out} "
          f"({100 * (c['train']['golden'] + c['eval']['golden']) / max(1, blocks):.1f}% of blocks golden) "
          f"in {manifest['seconds']} s", file=sys.stderr)
    return 0


__all__ = ["TraceConfig", "TracePolicy", "TraceJob", "golden_labels", "picked_blocks", "trace_sequence",
           "dump_traces", "load_traces", "read_manifest", "add_dump_traces_parser", "run_dump_traces"]
