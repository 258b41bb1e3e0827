"""Aggregates, the markdown table and the plot of ``lsa eval`` (records in, files out)."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

# task -> (metric name, how it is shown, higher is better)
METRICS = {
    "niah": ("accuracy", "pct", True),
    "multikey": ("accuracy", "pct", True),
    "ppl": ("ppl", "float", False),
    "agreement": ("agreement", "pct", True),
}


def run_label(policy: str, budget: float | None) -> str:
    return policy if budget is None else f"{policy}@{budget:g}"


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (policy, budget, task, context), one per (policy, budget, task) over all
    contexts (``context: "all"``), and for niah and multikey one per context and depth (``depth``
    set; None in the others): the task's metric, sample count, mean wall time, and the mean
    of every numeric key of the policies' ``kv`` dicts (device_kv_fraction, misses, ...)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if "error" in r:
            continue
        groups[(r["policy"], r["budget"], r["task"], r["context"], None)].append(r)
        groups[(r["policy"], r["budget"], r["task"], "all", None)].append(r)
        if r["depth"] is not None:
            groups[(r["policy"], r["budget"], r["task"], r["context"], r["depth"])].append(r)
    rows = []
    for (policy, budget, task, context, depth), rs in groups.items():
        row = {"policy": policy, "budget": budget, "task": task, "context": context, "depth": depth, "n": len(rs),
               "mean_wall_s": round(sum(r["wall_s"] for r in rs) / len(rs), 4)}
        if task in ("niah", "multikey"):
            row["accuracy"] = sum(r["correct"] for r in rs) / len(rs)
            if task == "multikey":
                row["distractor_rate"] = sum(r.get("distractor_hit", False) for r in rs) / len(rs)
        elif task == "ppl":
            tokens = sum(r["scored_tokens"] for r in rs)
            row["ppl"] = math.exp(sum(r["nll"] for r in rs) / tokens)
            row["scored_tokens"] = tokens
        elif task == "agreement":
            row["agreement"] = sum(r["agreement"] for r in rs) / len(rs)
            row["agreement_forced"] = sum(r["agreement_forced"] for r in rs) / len(rs)
            firsts = [r["first_divergence"] for r in rs]
            row["identical"] = sum(f is None for f in firsts) / len(rs)
            diverged = [f for f in firsts if f is not None]
            row["mean_first_divergence"] = sum(diverged) / len(diverged) if diverged else None
        kv_keys = sorted({k for r in rs for k, v in r["kv"].items() if _is_number(v)})
        row["kv"] = {k: sum(r["kv"][k] for r in rs if k in r["kv"]) / sum(k in r["kv"] for r in rs) for k in kv_keys}
        rows.append(row)
    rows.sort(key=lambda r: (r["task"], r["policy"] != "full", r["policy"], r["budget"] or 0,
                             math.inf if r["context"] == "all" else r["context"],
                             -1.0 if r["depth"] is None else r["depth"]))
    return rows


# kv keys left out of the markdown (still in the JSON): shown elsewhere, or sizes, not counters
_NOT_COLUMNS = {"device_kv_fraction", "budget", "device_kv_bytes", "device_kv_capacity_bytes", "host_kv_bytes",
                "full_kv_bytes", "index_kv_bytes", "num_tokens"}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if kind == "pct" else f"{value:.3f}"


def markdown(rows: list[dict], errors: list[dict]) -> str:
    """One table per task: a row per policy x budget, a column per context and over all, the
    mean device-KV fraction, and the other kv counters the policies report (means per sample)."""
    out = []
    for task in METRICS:
        task_rows = [r for r in rows if r["task"] == task and r["depth"] is None]
        if not task_rows:
            continue
        metric, kind, higher = METRICS[task]
        contexts = sorted({r["context"] for r in task_rows if r["context"] != "all"})
        extra = sorted({k for r in task_rows for k in r["kv"]} - _NOT_COLUMNS)
        unit = " %" if kind == "pct" else ""
        out.append(f"### {task}: {metric}{unit} ({'higher' if higher else 'lower'} is better)\n")
        if task == "agreement":
            out.append("Free-running: the policy's own greedy tokens against full's, position by position "
                       "(first div.: mean first differing position of the samples that differ). Teacher-forced: "
                       "full's tokens fed to the policy; % of positions where its greedy choice is full's token.\n")
        header = ["policy", "budget"] + [str(c) for c in contexts] + ["all", "n", "device KV %"] + extra
        if task == "agreement":  # free-running (the metric) and teacher-forced on full's tokens
            header[header.index("all")] = "all (free-running)"
            header[header.index("n"):header.index("n")] = ["first div.", "teacher-forced %"]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        by_run: dict[tuple, dict] = defaultdict(dict)
        for r in task_rows:
            by_run[(r["policy"], r["budget"])][r["context"]] = r
        for (policy, budget), cells in by_run.items():
            total = cells["all"]
            line = [policy, "-" if budget is None else f"{budget:g}"]
            line += [_fmt(cells[c][metric], kind) if c in cells else "-" for c in contexts]
            line.append(_fmt(total[metric], kind))
            if task == "agreement":
                first = total["mean_first_divergence"]
                line.append("none" if first is None else f"{first:.1f}")
                line.append(_fmt(total["agreement_forced"], kind))
            line.append(str(total["n"]))
            frac = total["kv"].get("device_kv_fraction")
            line.append("-" if frac is None else f"{100 * frac:.1f}")
            line += [f"{total['kv'][k]:.4g}" if k in total["kv"] else "-" for k in extra]
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    if errors:
        out.append("### runs that failed\n")
        out += [f"- {run_label(e['policy'], e['budget'])}: {e['error']}" for e in errors]
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> bool:
    """Metric against budget, one line per policy, one panel per task; full attention is a
    dashed horizontal line. Returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    totals = [r for r in rows if r["context"] == "all" and r["depth"] is None]
    tasks = [t for t in METRICS if any(r["task"] == t for r in totals)]
    if not tasks:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric, kind, higher = METRICS[task]
        scale = 100 if kind == "pct" else 1
        task_rows = [r for r in totals if r["task"] == task]
        budgets = sorted({r["budget"] for r in task_rows if r["budget"] is not None})
        for policy in dict.fromkeys(r["policy"] for r in task_rows):
            pts = sorted((r["budget"], r[metric]) for r in task_rows if r["policy"] == policy)
            if policy == "full" or pts[0][0] is None:
                ax.axhline(scale * pts[0][1], color="black", linestyle="--", label=policy)
            else:
                ax.plot([b for b, _ in pts], [scale * v for _, v in pts], marker="o", label=policy)
        if budgets:
            ax.set_xticks(budgets)
        if kind == "pct":
            ax.set_ylim(-3, 103)
        ax.set_xlabel("budget (resident fraction of the context)")
        ax.set_ylabel(metric + (" %" if kind == "pct" else "") + ("" if higher else " (lower is better)"))
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(out_dir: Path, result: dict) -> dict[str, str]:
    """``results.json``, ``results.md`` and ``accuracy.png`` (if matplotlib is present) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "plot": out_dir / "accuracy.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str))
    header = (f"# lsa eval: {result['config']['model']}, tasks {', '.join(result['config']['tasks'])}\n\n"
              f"Command: `{result['config']['command']}`\n\n")
    paths["markdown"].write_text(header + markdown(result["aggregates"], result["errors"]))
    if not plot(result["aggregates"], paths["plot"]):
        paths.pop("plot")
    return {k: str(v) for k, v in paths.items()}
