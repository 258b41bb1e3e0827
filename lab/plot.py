"""The budget sweep of ``lsa eval`` as curves: the metric against the budget, a line per policy.

One panel per (task, text, context); full attention is a dashed horizontal line with its
interval shaded; every point carries its 95% interval as an error bar. Perplexity is drawn as
the change against full attention on the same windows (%), so that lower and closer to 0 is
better and texts of different difficulty read alike."""
from __future__ import annotations

from pathlib import Path

from lab.report import METRICS


def _panels(rows: list[dict]) -> list[tuple]:
    keys = {(r["task"], r["text"] or "", r["context"]) for r in rows if r["depth"] is None and r["context"] != "all"}
    order = list(METRICS)
    return sorted(keys, key=lambda k: (order.index(k[0]), k[1], k[2]))


def _value(task: str, row: dict) -> tuple[float, tuple[float, float]] | None:
    """(y, (low, high)) of a row as drawn."""
    if task == "ppl":
        if "vs_full" not in row:
            return None
        return 100 * row["vs_full"], tuple(100 * v for v in row["vs_full_ci"])
    metric = METRICS[task][0]
    return 100 * row[metric], tuple(100 * v for v in row["ci"])


def plot(rows: list[dict], path: Path) -> bool:
    """Write the curves to ``path`` (PNG). Returns False (and writes nothing) without
    matplotlib or without anything to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = _panels(rows)
    if not panels:
        return False
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.7 * nrows), squeeze=False)
    policies = list(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full"))
    colours = {p: f"C{i}" for i, p in enumerate(policies)}
    for ax, (task, text, context) in zip(axes.flat, panels):
        cell = [r for r in rows if (r["task"], r["text"] or "", r["context"]) == (task, text, context)
                and r["depth"] is None]
        for r in cell:
            if r["policy"] == "full" and task != "ppl":
                y, (lo, hi) = _value(task, r)
                ax.axhline(y, color="black", linestyle="--", linewidth=1, label="full")
                ax.axhspan(lo, hi, color="black", alpha=0.08)
        if task == "ppl":
            ax.axhline(0, color="black", linestyle="--", linewidth=1, label="full")
        for policy in policies:
            pts = sorted((r["budget"], _value(task, r)) for r in cell if r["policy"] == policy
                         and _value(task, r) is not None)
            if not pts:
                continue
            xs = [b for b, _ in pts]
            ys = [v[0] for _, v in pts]
            err = [[v[0] - v[1][0] for _, v in pts], [v[1][1] - v[0] for _, v in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", markersize=4, capsize=3, color=colours[policy], label=policy)
        budgets = sorted({r["budget"] for r in cell if r["budget"] is not None})
        if budgets:
            ax.set_xticks(budgets)
            ax.set_xticklabels([f"{b:g}" for b in budgets], fontsize=7)
        ax.set_xlabel("budget (resident fraction)")
        ax.set_ylabel("ppl vs full % (lower is better)" if task == "ppl" else METRICS[task][0] + " %")
        ax.set_title(f"{task}{f' ({text})' if text else ''}, {context} tokens", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
