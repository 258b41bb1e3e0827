"""Aggregates, the markdown tables and the plot of ``lsa eval`` (records in, files out).

Every number comes with its 95% interval (lab/stats.py): Wilson for accuracies, the bootstrap
over text windows for perplexity and agreement, the paired bootstrap for a policy's
perplexity against full attention's on the same windows."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from lab.stats import bootstrap, mean, pooled_ppl, ppl_ratio, wilson

# task -> (metric name, how it is shown, higher is better)
METRICS = {
    "niah": ("accuracy", "pct", True),
    "multikey": ("accuracy", "pct", True),
    "session": ("accuracy", "pct", True),
    "ppl": ("ppl", "float", False),
    "agreement": ("agreement", "pct", True),
}


def run_label(policy: str, budget: float | None) -> str:
    return policy if budget is None else f"{policy}@{budget:g}"


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (policy, budget, task, text, context), one per (policy, budget, task, text)
    over all contexts (``context: "all"``), and for the needle tasks one per context and depth:
    the task's metric and its 95% interval (``ci``), sample count, mean wall time, the mean of
    every numeric key of the ``kv`` dicts, and the attended device KV fraction (resident blocks,
    without index keys and staged copies)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        text = r.get("text")
        groups[(r["policy"], r["budget"], r["task"], text, r["context"], None)].append(r)
        groups[(r["policy"], r["budget"], r["task"], text, "all", None)].append(r)
        if r["depth"] is not None:
            groups[(r["policy"], r["budget"], r["task"], text, r["context"], r["depth"])].append(r)
    full = {(r["task"], r["key"]): r for r in records if r["policy"] == "full"}
    rows = []
    for (policy, budget, task, text, context, depth), rs in groups.items():
        row = {"policy": policy, "budget": budget, "task": task, "text": text, "context": context, "depth": depth,
               "n": len(rs), "mean_wall_s": round(mean([r["wall_s"] for r in rs]), 4)}
        row.update(_metric(task, rs, full))
        kv_keys = sorted({k for r in rs for k, v in r["kv"].items() if _is_number(v)})
        row["kv"] = {k: mean([r["kv"][k] for r in rs if k in r["kv"]]) for k in kv_keys}
        attended = [_attended(r["kv"]) for r in rs if "full_kv_bytes" in r["kv"]]
        if attended:
            row["kv"]["attended_kv_fraction"] = mean(attended)
        rows.append(row)
    rows.sort(key=lambda r: (r["task"], r["text"] or "", r["policy"] != "full", r["policy"], r["budget"] or 0,
                             math.inf if r["context"] == "all" else r["context"],
                             -1.0 if r["depth"] is None else r["depth"]))
    return rows


def _metric(task: str, rs: list[dict], full: dict) -> dict:
    if task in ("niah", "multikey", "session"):
        k = sum(bool(r["correct"]) for r in rs)
        row = {"accuracy": k / len(rs), "ci": wilson(k, len(rs))}
        if task == "multikey":
            row["distractor_rate"] = sum(r.get("distractor_hit", False) for r in rs) / len(rs)
        return row
    if task == "ppl":
        windows = [(r["nll"], r["scored_tokens"]) for r in rs]
        row = {"ppl": pooled_ppl(windows), "ci": bootstrap(pooled_ppl, windows), "scored_tokens": sum(t for _, t in
                                                                                                     windows)}
        pairs = [((r["nll"], r["scored_tokens"]), (full[("ppl", r["key"])]["nll"], full[("ppl", r["key"])]
                                                   ["scored_tokens"])) for r in rs if ("ppl", r["key"]) in full]
        if len(pairs) == len(rs):  # every window also ran under full attention
            row["vs_full"] = ppl_ratio(pairs) - 1
            row["vs_full_ci"] = tuple(v - 1 for v in bootstrap(ppl_ratio, pairs))
        return row
    free = [r["agreement"] for r in rs]
    forced = [r["agreement_forced"] for r in rs]
    firsts = [r["first_divergence"] for r in rs]
    diverged = [f for f in firsts if f is not None]
    return {"agreement": mean(free), "ci": bootstrap(mean, free), "agreement_forced": mean(forced),
            "forced_ci": bootstrap(mean, forced), "identical": sum(f is None for f in firsts) / len(rs),
            "mean_first_divergence": mean(diverged) if diverged else None}


def _attended(kv: dict) -> float:
    attended = kv["device_kv_bytes"] - kv.get("index_kv_bytes", 0) - kv.get("staged_kv_bytes", 0)
    return attended / kv["full_kv_bytes"] if kv["full_kv_bytes"] else 0.0


# kv keys left out of the markdown (still in the JSON): shown elsewhere, or sizes, not counters
_NOT_COLUMNS = {"device_kv_fraction", "attended_kv_fraction", "budget", "device_kv_bytes", "device_kv_capacity_bytes",
                "host_kv_bytes", "full_kv_bytes", "index_kv_bytes", "staged_kv_bytes", "num_tokens"}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "signed":
        return f"{100 * value:+.1f}"
    return f"{value:.3f}"


def _with_ci(value, ci, kind: str) -> str:
    return f"{_fmt(value, kind)} [{_fmt(ci[0], kind)}, {_fmt(ci[1], kind)}]" if ci else _fmt(value, kind)


def markdown(rows: list[dict], errors: list[dict]) -> str:
    """One table per task and text: a row per policy x budget x context with the metric and
    its 95% interval, the device KV and the counters the policies report (means per sample)."""
    out = []
    for task in METRICS:
        for text in sorted({r["text"] or "" for r in rows if r["task"] == task}):
            task_rows = [r for r in rows if r["task"] == task and (r["text"] or "") == text and r["depth"] is None
                         and r["context"] != "all"]
            if task_rows:
                out += _table(task, text, task_rows)
    if errors:
        out.append("### runs that failed\n")
        out += [f"- {run_label(e['policy'], e['budget'])}: {e['error']}" for e in errors]
        out.append("")
    return "\n".join(out)


def _table(task: str, text: str, rows: list[dict]) -> list[str]:
    metric, kind, higher = METRICS[task]
    extra = sorted({k for r in rows for k in r["kv"]} - _NOT_COLUMNS)
    unit = " %" if kind == "pct" else ""
    title = f"### {task}{f' ({text})' if text else ''}: {metric}{unit} [95% interval] " \
            f"({'higher' if higher else 'lower'} is better)\n"
    out = [title]
    header = ["policy", "budget", "context", metric + unit]
    if task == "ppl":
        header.append("vs full %")
        out.append("Interval: bootstrap over windows; vs full: the paired bootstrap of the perplexity ratio on the "
                   "same windows.\n")
    if task == "agreement":
        header += ["teacher-forced %", "first div."]
        out.append("Free-running: the policy's own greedy tokens against full's, position by position (first div.: "
                   "mean first differing position of the samples that differ). Teacher-forced: full's tokens fed to "
                   "the policy; % of positions where its greedy choice is full's token. Intervals: bootstrap over "
                   "windows.\n")
    if task in ("niah", "multikey", "session"):
        out.append("Interval: Wilson.\n")
    header += ["n", "device KV %", "attended KV %"] + extra
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for r in rows:
        line = [r["policy"], "-" if r["budget"] is None else f"{r['budget']:g}", str(r["context"]),
                _with_ci(r[metric], r["ci"], kind)]
        if task == "ppl":
            line.append(_with_ci(r["vs_full"], r["vs_full_ci"], "signed") if "vs_full" in r else "-")
        if task == "agreement":
            first = r["mean_first_divergence"]
            line += [_with_ci(r["agreement_forced"], r["forced_ci"], "pct"), "none" if first is None else f"{first:.1f}"]
        line.append(str(r["n"]))
        for key in ("device_kv_fraction", "attended_kv_fraction"):
            frac = r["kv"].get(key)
            line.append("-" if frac is None else f"{100 * frac:.1f}")
        line += [f"{r['kv'][k]:.4g}" if k in r["kv"] else "-" for k in extra]
        out.append("| " + " | ".join(line) + " |")
    out.append("")
    return out


def write_outputs(out_dir: Path, result: dict, plot: bool = True) -> dict[str, str]:
    """``results.json``, ``results.md`` and ``accuracy.png`` (if matplotlib is present and
    ``plot``) in ``out_dir``."""
    from lab.plot import plot as draw

    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**result, "aggregates": aggregate(result["records"])}
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "plot": out_dir / "accuracy.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str))
    header = (f"# lsa eval: {result['config']['model']}, tasks {', '.join(result['config']['tasks'])}"
              f"{' (partial: runs still to come)' if result.get('partial') else ''}\n\n"
              f"Command: `{result['config']['command']}`\n\n")
    paths["markdown"].write_text(header + markdown(result["aggregates"], result["errors"]))
    if not plot or not draw(result["aggregates"], paths["plot"]):
        paths.pop("plot")
    return {k: str(v) for k, v in paths.items()}
