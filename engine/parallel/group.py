"""This process's place in a tensor-parallel group, and the three collectives TP needs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.errors import UnsupportedModelError


class TensorParallelError(UnsupportedModelError):
    """The model's shapes cannot be split over the requested number of ranks."""


@dataclass(frozen=True)
class TensorParallel:
    """Rank ``rank`` of ``size`` in ``group`` (None: the default process group).

    ``size == 1`` needs no process group: every collective is then the identity."""

    rank: int
    size: int
    group: object | None = None

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is not in 0..{self.size - 1}")

    @classmethod
    def from_default_group(cls) -> TensorParallel:
        """The rank and size of the initialised default process group."""
        return cls(dist.get_rank(), dist.get_world_size())

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """In place: the sum of ``x`` over the ranks."""
        if self.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """In place: the elementwise maximum of ``x`` over the ranks."""
        if self.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., size * n], rank 0's part first."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
