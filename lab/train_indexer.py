"""Training the learned Level-1 indexer (engine/policies/indexer.py) from ``lsa dump-traces`` files alone
(the model is not loaded), and the golden-block recall report: ``lsa train-indexer``."""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from engine.errors import InvalidRequestError
from engine.policies.indexer import IndexerConfig, LearnedIndexer, RecencyIndexer, indexer_input_scales


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 16
    loss: str = "bce"  # "bce" or "focal"
    focal_gamma: float = 2.0
    neg_ratio: int = 3  # negatives sampled per positive (the paper's 3); 0: every negative, class-balanced
    hard_negatives: bool = False  # half of the sampled negatives are the ones the model scores highest
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        if self.loss not in ("bce", "focal"):
            raise InvalidRequestError(f"loss must be bce or focal, got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.neg_ratio < 0 or self.lr <= 0:
            raise InvalidRequestError("epochs and batch_size must be >= 1, neg_ratio >= 0, lr > 0")


def training_examples(samples: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, ...]]:
    """One (queries [W, Hq, D], keys [M, Hkv, 3, D], labels [M]) per sample and target layer: every
    target layer learns the same golden set (the paper's per-layer heads, here with shared weights)."""
    return [(s["queries"][li], s["keys"][li], s["labels"]) for s in samples for li in range(s["queries"].shape[0])]


def _batch(examples: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Pad to the longest row: (queries [B, W, Hq, D], keys [B, M, Hkv, 3, D], labels [B, M], lengths [B])."""
    lengths = torch.tensor([e[1].shape[0] for e in examples])
    m = int(lengths.max())
    keys = torch.zeros(len(examples), m, *examples[0][1].shape[1:])
    labels = torch.zeros(len(examples), m, dtype=torch.bool)
    for i, (_, k, y) in enumerate(examples):
        keys[i, : k.shape[0]] = k
        labels[i, : y.shape[0]] = y
    return torch.stack([e[0] for e in examples]).float(), keys, labels, lengths


def _top_n(key: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """bool [B, M]: the n[b] largest finite entries of each row of key [B, M]."""
    rank = torch.empty_like(key, dtype=torch.long)
    order = key.argsort(1, descending=True)
    rank.scatter_(1, order, torch.arange(key.shape[1]).expand_as(order).contiguous())
    return (rank < n[:, None]) & torch.isfinite(key)


def indexer_loss(logits: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor, cfg: TrainConfig,
                 gen: torch.Generator) -> torch.Tensor:
    """BCE (or focal) over the positives and sampled negatives of each row (see TrainConfig)."""
    valid = torch.arange(logits.shape[1])[None, :] < lengths[:, None]
    pos, neg = labels & valid, ~labels & valid
    if cfg.neg_ratio:
        n_neg = (pos.sum(1) * cfg.neg_ratio).clamp(min=cfg.neg_ratio)
        n_hard = n_neg // 2 if cfg.hard_negatives else torch.zeros_like(n_neg)
        chosen = _top_n(logits.detach().masked_fill(~neg, float("-inf")), n_hard)
        noise = torch.rand(neg.shape, generator=gen).masked_fill(~neg | chosen, float("-inf"))
        weight = (pos | chosen | _top_n(noise, n_neg - n_hard)).float()
    else:  # every block, positives up-weighted to balance the classes per row
        balance = neg.sum(1, keepdim=True) / pos.sum(1, keepdim=True).clamp(min=1)
        weight = torch.where(pos, balance, neg.float())
    loss = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    if cfg.loss == "focal":
        loss = (1 - torch.exp(-loss)) ** cfg.focal_gamma * loss
    return (loss * weight).sum() / weight.sum().clamp(min=1)


def train_indexer(model: LearnedIndexer, samples: list[dict[str, torch.Tensor]], cfg: TrainConfig,
                  progress: bool = True) -> list[float]:
    """Train in place on trace samples; returns the mean loss of each epoch."""
    from tqdm import tqdm

    examples = training_examples(samples)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    model.train().requires_grad_(True)
    losses = []
    bar = tqdm(range(cfg.epochs), unit="epoch", disable=not progress, file=sys.stderr)
    for epoch in bar:
        order = torch.randperm(len(examples), generator=gen).tolist()
        total, count = 0.0, 0
        for i in range(0, len(order), cfg.batch_size):
            queries, keys, labels, lengths = _batch([examples[j] for j in order[i: i + cfg.batch_size]])
            loss = indexer_loss(model(queries, keys, lengths), labels, lengths, cfg, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(lengths), count + len(lengths)
        sched.step()
        losses.append(total / count)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if progress:
            bar.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {losses[-1]:.4f}")
    model.eval().requires_grad_(False)
    return losses


# ---------------------------------------------------------------- evaluation


def cross_layer_scores(indexer, sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """[M]: what LSAPolicy.rank computes at a boundary, the max over target layers of ``score``."""
    queries, keys = sample["queries"], sample["keys"]  # [Lt, W, Hq, D], [Lt, M, Hkv, 3, D]
    ids = torch.arange(keys.shape[1])
    return torch.stack([indexer.score(queries[li], keys[li, :, :, 0], keys[li, :, :, 1], keys[li, :, :, 2], ids)
                        for li in range(keys.shape[0])]).amax(0)


def recent_attention_scores(sample: dict[str, torch.Tensor], layers: list[int]) -> torch.Tensor:
    """[M]: ``index_score="attention"`` at the boundary, the max over ``layers`` of the exact
    attention mass of the last W decode queries (head mean); at t = 0, where the window is the
    prompt's (not traced), the mean-key score."""
    if int(sample["t"]) == 0:
        from engine.policies.lsa import QuestIndexer
        return cross_layer_scores(QuestIndexer("mean"), sample).softmax(0)
    return sample["recent_mass"][layers].float().amax(0)


def budget_set(scores: torch.Tensor, budget: float, sink_blocks: int, tail_blocks: int) -> torch.Tensor:
    """bool [M]: the sinks and tail, then the best-scoring others, floor(budget * M) blocks in all
    (the resident set OffloadPolicy.target_set builds)."""
    m = scores.numel()
    forced = torch.zeros(m, dtype=torch.bool)
    forced[: min(sink_blocks, m)] = True
    forced[max(0, m - tail_blocks):] = True
    k = max(int(forced.sum()), math.floor(budget * m + 1e-9))
    rest = torch.argsort(scores.float().masked_fill(forced, float("-inf")), descending=True)
    chosen = forced.clone()
    chosen[rest[: max(0, k - int(forced.sum()))]] = True
    return chosen


def recall_report(scorers: dict, samples: list[dict[str, torch.Tensor]], budgets: tuple[float, ...],
                  sink_blocks: int = 1, tail_blocks: int = 1) -> dict:
    """Per scorer (sample -> scores [M]) and budget: mean over samples of golden-block recall,
    recall of the golden blocks outside sinks and tail ("free"), and attention-mass recall."""
    out = {}
    for name, scorer in scorers.items():
        scores = [scorer(s) for s in samples]
        out[name] = {}
        for budget in budgets:
            recall, free, mass = [], [], []
            for s, sc in zip(samples, scores):
                chosen, gold = budget_set(sc, budget, sink_blocks, tail_blocks), s["labels"].bool()
                forced = budget_set(torch.zeros_like(sc), 0.0, sink_blocks, tail_blocks)
                weights = s["mass"].float().mean(0)  # [M], mean over layers
                if gold.any():
                    recall.append(float((chosen & gold).sum() / gold.sum()))
                if (gold & ~forced).any():
                    free.append(float((chosen & gold & ~forced).sum() / (gold & ~forced).sum()))
                mass.append(float(weights[chosen].sum() / weights.sum().clamp(min=1e-12)))
            out[name][f"{budget:g}"] = {"recall": _mean(recall), "recall_free": _mean(free), "mass_recall": _mean(mass)}
    return out


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def markdown_table(report: dict, budgets: tuple[float, ...]) -> str:
    head = "| indexer | " + " | ".join(f"recall@{b:g} | free@{b:g} | mass@{b:g}" for b in budgets) + " |"
    rule = "|---|" + "---|---|---|" * len(budgets)
    rows = []
    for name, by_budget in report.items():
        cells = []
        for b in budgets:
            r = by_budget[f"{b:g}"]
            cells += ["-" if r[k] is None else f"{r[k]:.3f}" for k in ("recall", "recall_free", "mass_recall")]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


# ---------------------------------------------------------------- CLI


def add_train_indexer_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train-indexer", help="train the learned Level-1 indexer from `lsa dump-traces` "
                              "files (the model is not loaded) and report held-out golden-block recall")
    p.add_argument("--traces", required=True, help="directory written by `lsa dump-traces`")
    p.add_argument("--out", required=True, help="directory for indexer.safetensors, indexer.json, report.json")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=30, help="passes over the train split")
    t.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    t.add_argument("--batch-size", type=int, default=16, help="examples (sample x target layer) per step")
    t.add_argument("--loss", choices=("bce", "focal"), default="bce", help="binary cross-entropy or focal loss")
    t.add_argument("--neg-ratio", type=int, default=3, help="negatives sampled per positive; 0: all, balanced")
    t.add_argument("--hard-negatives", action="store_true", help="half the negatives: the highest-scoring ones")
    t.add_argument("--embed-dim", type=int, default=64, help="width of the query and key embeddings")
    t.add_argument("--hidden-dim", type=int, default=64, help="width of the encoders' hidden layer")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights, the batches and the negatives")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e = p.add_argument_group("evaluation (held-out split of the traces)")
    e.add_argument("--budgets", default="0.05,0.1,0.2", help="resident fractions, comma-separated")
    e.add_argument("--attention-layers", type=lambda text: tuple(int(x) for x in text.split(",")), default=(3, 6, 9),
                   help="layers of the exact-attention row (traces with recent_mass; SmolLM2's early layers; "
                   "those the model lacks are left out)")
    e.add_argument("--sink-blocks", type=int, default=1, help="always resident, as in PolicyConfig")
    e.add_argument("--tail-blocks", type=int, default=1, help="always resident, as in PolicyConfig")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_train_indexer(args) -> int:
    import copy
    import time

    from engine.policies.lsa import QuestIndexer
    from lab.traces import load_traces, read_manifest

    try:
        budgets = tuple(float(x) for x in args.budgets.split(",") if x.strip())
    except ValueError as exc:
        raise InvalidRequestError(f"--budgets: expected comma-separated numbers: {exc}") from exc
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, loss=args.loss,
                      neg_ratio=args.neg_ratio, hard_negatives=args.hard_negatives, seed=args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = read_manifest(args.traces)
    train, held_out = load_traces(args.traces, "train"), load_traces(args.traces, "eval")
    if not train or not held_out:
        raise InvalidRequestError(f"{args.traces} has {len(train)} train and {len(held_out)} eval samples; "
                                  f"both are needed (dump with --samples >= 1 and --eval-samples >= 1)")
    shape = manifest["model_shape"]
    q_scale, k_scale = indexer_input_scales(train)
    torch.manual_seed(args.seed)
    model = LearnedIndexer(IndexerConfig(
        num_heads=shape["num_heads"], num_kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"],
        embed_dim=args.embed_dim, hidden_dim=args.hidden_dim, q_scale=q_scale, k_scale=k_scale,
        block_size=manifest["block_size"], target_layers=tuple(manifest["target_layers"]), model=manifest["model"]))
    untrained = copy.deepcopy(model).eval().requires_grad_(False)
    t0 = time.perf_counter()
    losses = train_indexer(model, train, cfg, progress=not args.quiet)
    train_s = time.perf_counter() - t0
    scorers = {"learned": lambda s: cross_layer_scores(model, s),
               "quest (zero-training)": lambda s: cross_layer_scores(QuestIndexer("quest"), s),
               "mean-key (zero-training)": lambda s: cross_layer_scores(QuestIndexer("mean"), s),
               "mean-key mass (zero-training)": lambda s: cross_layer_scores(QuestIndexer("mass"), s),
               "recency": lambda s: cross_layer_scores(RecencyIndexer(), s),
               "learned, untrained": lambda s: cross_layer_scores(untrained, s),
               "oracle (future mass)": lambda s: s["mass"].float().mean(0)}
    layers = [layer for layer in args.attention_layers if layer < shape["num_layers"]]
    if layers and all("recent_mass" in s for s in held_out):
        label = f"exact attention, layers {','.join(map(str, layers))} (zero-training, `index_score=attention`)"
        scorers[label] = lambda s: recent_attention_scores(s, layers)
    report = recall_report(scorers, held_out, budgets, args.sink_blocks, args.tail_blocks)
    golden = [float(s["labels"].float().mean()) for s in held_out]
    summary = {
        "traces": str(args.traces), "model": manifest["model"], "block_size": manifest["block_size"],
        "target_layers": manifest["target_layers"], "train": {**asdict(cfg), "seconds": round(train_s, 1),
                                                              "epoch_losses": [round(x, 5) for x in losses]},
        "parameters": model.num_parameters(), "train_samples": len(train), "eval_samples": len(held_out),
        "eval_golden_fraction": round(sum(golden) / len(golden), 4), "budgets": list(budgets),
        "sink_blocks": args.sink_blocks, "tail_blocks": args.tail_blocks, "recall": report,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = model.save(args.out, extra={"trained_on": str(args.traces), "train": summary["train"]})
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    print(markdown_table(report, budgets))
    print(f"{model.num_parameters()} parameters, {len(train)} train / {len(held_out)} held-out samples "
          f"({100 * summary['eval_golden_fraction']:.1f}% of held-out blocks golden); wrote {out}", file=sys.stderr)
    return 0


__all__ = ["TrainConfig", "train_indexer", "cross_layer_scores", "recent_attention_scores", "budget_set",
           "recall_report",
           "add_train_indexer_parser", "run_train_indexer"]
