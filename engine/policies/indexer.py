"""The learned Level-1 indexer: a small dual encoder, trained backbone-free on golden-block traces.

    query tower  q [W, Hq, D] -> [relu(q), relu(-q)] / q_scale -> Linear + MLP residual -> [W, Hq, E]
    key tower    [kmin, kmax, kmean] [M, Hkv, 3, D] / k_scale  -> Linear + MLP residual -> [M, Hkv, E]
    logit[j]     = max over KV heads h of max over (window w, query head g in h's group) <qe[w, g], ke[j, h]>
                   + prior[log2 bucket of j's distance from the newest block] + sink * (j == 0) + bias
    score[j]     = log sigmoid(logit[j])

The split features [relu(q), relu(-q)] let the linear part of the two towers express both
zero-training scores exactly (the Quest bound relu(q).kmax - relu(-q).kmin and the mean-key dot);
the MLPs add what a bilinear form cannot. ``exp(score)`` is the predicted probability that block j
is golden, so LSA's ``threshold`` reads it as the paper's sigmoid threshold. One set of weights
serves every target layer (``score`` is not told the layer); LSA maxes the layers' scores.

Files: ``DIR/indexer.safetensors`` (weights) and ``DIR/indexer.json`` (:class:`IndexerConfig`).
``lsa train-indexer`` (lab/train_indexer.py) trains it from ``lsa dump-traces`` files alone
and reports golden-block recall at the budget against the zero-training and recency baselines.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import LSAError

FORMAT = "lsa-indexer/1"
WEIGHTS, CONFIG = "indexer.safetensors", "indexer.json"


class IndexerNotFoundError(LSAError, FileNotFoundError):
    """The indexer path is not a directory holding indexer.safetensors and indexer.json."""


class IndexerFormatError(LSAError, ValueError):
    """The indexer files exist but cannot be used: corrupt, another format, or another model's shape."""


@dataclass(frozen=True)
class IndexerConfig:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    embed_dim: int = 64
    hidden_dim: int = 64
    distance_buckets: int = 12
    q_scale: float = 1.0  # RMS of the training queries
    k_scale: float = 1.0  # RMS of the training key summaries
    block_size: int | None = None  # of the traces it was trained on
    target_layers: tuple[int, ...] = ()
    model: str | None = None
    format: str = FORMAT

    @classmethod
    def from_dict(cls, raw: dict) -> IndexerConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if "target_layers" in values:
            values["target_layers"] = tuple(values["target_layers"])
        return cls(**values)


class Tower(nn.Module):
    """x [..., F] -> [..., E]: a linear map plus a one-hidden-layer MLP residual."""

    def __init__(self, features: int, hidden: int, embed: int):
        super().__init__()
        self.linear = nn.Linear(features, embed)
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, embed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x)


class LearnedIndexer(nn.Module):
    """A drop-in for engine.policies.lsa.QuestIndexer: ``score(queries, kmin, kmax, kmean, host_ids) -> [M]``."""

    def __init__(self, config: IndexerConfig):
        super().__init__()
        self.config = config
        d, e = config.head_dim, config.embed_dim
        self.query_tower = Tower(2 * d, config.hidden_dim, e)
        self.key_tower = Tower(3 * d, config.hidden_dim, e)
        self.prior = nn.Parameter(torch.zeros(config.distance_buckets))
        self.sink = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(()))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------ scoring

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> torch.Tensor:
        """queries [B, W, Hq, D], keys [B, M, Hkv, 3, D] in logical block order -> logits [B, M].
        ``lengths`` [B]: real blocks of each row (left-aligned, padding after; default M). A block's
        logit depends only on the queries, its own keys and its distance from the row's newest block."""
        b, w, hq, d = queries.shape
        m, hkv = keys.shape[1], keys.shape[2]
        q = queries.float() / self.config.q_scale
        qe = self.query_tower(torch.cat([q.clamp(min=0), (-q).clamp(min=0)], -1))  # [B, W, Hq, E]
        ke = self.key_tower(keys.float().flatten(-2) / self.config.k_scale)  # [B, M, Hkv, E]
        qe = qe.view(b, w, hkv, hq // hkv, -1)
        dots = torch.einsum("bwhge,bmhe->bhmwg", qe, ke) * qe.shape[-1] ** -0.5  # [B, Hkv, M, W, G]
        logit = dots.flatten(3).amax(3).amax(1)  # max over window and group, then over KV heads: [B, M]
        lengths = torch.full((b,), m, device=keys.device) if lengths is None else lengths.to(keys.device)
        j = torch.arange(m, device=keys.device)[None, :]
        distance = (lengths[:, None] - 1 - j).clamp(min=0)  # 0 = the newest complete block
        bucket = torch.log2(distance.float() + 1).floor().long().clamp(max=self.config.distance_buckets - 1)
        return logit + self.prior[bucket] + self.sink * (j == 0).float() + self.bias

    @torch.no_grad()
    def score(self, queries: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, kmean: torch.Tensor,
              host_ids: torch.Tensor) -> torch.Tensor:
        """queries [W, Hq, D]; summaries [R, Hkv, D]; host_ids [M], ``host_ids[j]`` the row of the
        sequence's logical block j -> scores [M] (log-probabilities, higher = needed)."""
        self._check(queries, kmin)
        if self.bias.device != queries.device:
            self.to(queries.device)
        ids = host_ids.long()
        keys = torch.stack([kmin[ids], kmax[ids], kmean[ids]], 2)  # [M, Hkv, 3, D]
        return F.logsigmoid(self.forward(queries[None], keys[None])[0])

    def _check(self, queries: torch.Tensor, kmin: torch.Tensor) -> None:
        c = self.config
        got = (queries.shape[1], kmin.shape[1], queries.shape[2])
        if queries.dim() != 3 or kmin.dim() != 3 or got != (c.num_heads, c.num_kv_heads, c.head_dim):
            raise IndexerFormatError(
                f"this indexer was trained for {c.model or 'a model'} with {c.num_heads} query heads, "
                f"{c.num_kv_heads} KV heads, head_dim {c.head_dim}; it was given queries {tuple(queries.shape)} "
                f"and key summaries {tuple(kmin.shape)}: train one on traces of this model")

    # ------------------------------------------------------------ files

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(out / WEIGHTS))
        (out / CONFIG).write_text(json.dumps({**asdict(self.config), **(extra or {})}, indent=1))
        return out

    @classmethod
    def load(cls, path: str | Path) -> LearnedIndexer:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        root = Path(path)
        if not root.is_dir():
            raise IndexerNotFoundError(f"indexer path {path} is not a directory; give the --out directory of "
                                       f"`lsa train-indexer` (it holds {WEIGHTS} and {CONFIG})")
        missing = [name for name in (WEIGHTS, CONFIG) if not (root / name).is_file()]
        if missing:
            raise IndexerNotFoundError(f"indexer directory {path} lacks {', '.join(missing)}; train one with "
                                       f"`lsa train-indexer --out {path}`")
        try:
            raw = json.loads((root / CONFIG).read_text())
            config = IndexerConfig.from_dict(raw)
        except (ValueError, TypeError) as exc:
            raise IndexerFormatError(f"{root / CONFIG} is not a valid indexer config: {exc}") from exc
        if config.format != FORMAT:
            raise IndexerFormatError(f"{root / CONFIG} has format {config.format!r}, expected {FORMAT!r}")
        model = cls(config)
        try:
            state = load_file(str(root / WEIGHTS))
        except (SafetensorError, OSError) as exc:
            raise IndexerFormatError(f"cannot read {root / WEIGHTS}: {exc}") from exc
        want = model.state_dict()
        bad = sorted(set(want) ^ set(state)) + [k for k in want if k in state and state[k].shape != want[k].shape]
        if bad:
            raise IndexerFormatError(f"{root / WEIGHTS} does not match its config ({len(bad)} tensors differ, "
                                     f"e.g. {bad[:3]})")
        model.load_state_dict(state)
        return model.eval().requires_grad_(False)


class RecencyIndexer:
    """The trivial baseline: newer blocks score higher."""

    def score(self, queries, kmin, kmax, kmean, host_ids):
        return torch.arange(host_ids.numel(), device=host_ids.device, dtype=torch.float32)


def indexer_input_scales(samples: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """(q_scale, k_scale): RMS of the training queries and key summaries."""
    q = torch.cat([s["queries"].flatten() for s in samples]).float()
    k = torch.cat([s["keys"].flatten() for s in samples]).float()
    return float(q.pow(2).mean().sqrt().clamp(min=1e-6)), float(k.pow(2).mean().sqrt().clamp(min=1e-6))


__all__ = ["LearnedIndexer", "IndexerConfig", "RecencyIndexer", "IndexerNotFoundError", "IndexerFormatError",
           "indexer_input_scales"]
