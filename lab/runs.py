"""One run of the ``lsa eval`` grid: a policy (possibly a variant with settings of its own) at a budget."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Run:
    label: str  # how the tables name it: the policy, or the variant's label
    name: str  # the registered policy
    budget: float | None  # None for full attention
    overrides: dict = field(default_factory=dict)  # config fields of the variant, flat names -> text
