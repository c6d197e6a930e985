"""A finished sweep as a table, a best config and plots. Pure functions of plain data (no Ray),
so that they can be tested and re-run on a sweep directory.

Each trial is a `TrialRecord`: its sampled fields, its status (`completed`, `early-stopped`,
`failed`, `invalid`, `stopped`), a reason for the last three, and its history of reported
metrics in order. Final metrics are the last reported value of each key, so an eval metric
reported every 100 steps and a loss reported every 10 both have a final value; throughput is
the median over the reports.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from nanovlm.config import configs_to_dict
from nanovlm.sweep.space import SweepSpec, trial_configs

# Statuses whose metrics come from real training, ranked by the metric.
RANKED_STATUSES = ("completed", "early-stopped", "stopped")
EXTRA_METRICS = ("val_loss", "val_accuracy", "loss", "tokens_per_second")
MEDIAN_METRICS = ("tokens_per_second",)  # per-step rates: the table shows the median over reports
CHECKPOINT_KEY = "checkpoint_path"        # in the reports that carry a Train checkpoint (TuneReportCallback)
BEST_CHECKPOINT_DIR = "best_checkpoint"


@dataclass
class TrialRecord:
    trial_id: str
    config: dict[str, Any]                      # the sampled (varied) fields only
    status: str                                 # completed / early-stopped / failed / invalid / stopped
    reason: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float | None = None
    run_id: str | None = None                   # the trial's MLflow child run

    def final(self, key: str) -> float | None:
        """Last reported finite value of `key`, None if never reported."""
        for result in reversed(self.history):
            value = result.get(key)
            if _is_number(value):
                return float(value)
        return None

    def median(self, key: str) -> float | None:
        """Median of the reported values of `key` (throughput: steady state, not the last step's noise)."""
        values = sorted(float(r[key]) for r in self.history if _is_number(r.get(key)))
        if not values:
            return None
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    @property
    def last_step(self) -> int | None:
        value = self.final("step")
        return None if value is None else int(value)

    def best_checkpoint(self, metric: str, mode: str) -> dict[str, Any] | None:
        """The trial's best reported checkpoint by `metric` that still exists: {"path", "step",
        metric}. Train keeps the best ones (the sweep scores checkpoints by its metric) and the
        latest; a report without the metric (a checkpoint between evaluations) ranks last."""
        candidates = [r for r in self.history if isinstance(r.get(CHECKPOINT_KEY), str)
                      and ("://" in r[CHECKPOINT_KEY] or Path(r[CHECKPOINT_KEY]).exists())]
        if not candidates:
            return None
        sign = 1.0 if mode == "min" else -1.0
        # the best value, the later step among equals; then the latest unscored one
        best = min(candidates, key=lambda r: (0, sign * r[metric], -r.get("step", 0)) if _is_number(r.get(metric))
                   else (1, 0.0, -r.get("step", 0)))
        return {"path": best[CHECKPOINT_KEY], "step": best.get("step"), metric: best.get(metric)}


def rank_trials(records: Iterable[TrialRecord], metric: str, mode: str) -> list[TrialRecord]:
    """Trials with a value of `metric` first, best first; then the rest (invalid, failed) by id."""
    records = list(records)
    scored = [r for r in records if r.status in RANKED_STATUSES and r.final(metric) is not None]
    sign = 1.0 if mode == "min" else -1.0
    scored.sort(key=lambda r: sign * r.final(metric))
    rest = sorted((r for r in records if r not in scored), key=lambda r: r.trial_id)
    return scored + rest


def best_trial(records: Iterable[TrialRecord], metric: str, mode: str) -> TrialRecord | None:
    """The best completed trial; if none completed, the best trial with any value of `metric`."""
    ranked = [r for r in rank_trials(records, metric, mode) if r.final(metric) is not None
              and r.status in RANKED_STATUSES]
    completed = [r for r in ranked if r.status == "completed"]
    return (completed or ranked or [None])[0]


def why_no_trial_trained(records: Iterable[TrialRecord]) -> str | None:
    """None when some trial trained (a ranked status); else one line: each distinct reason with
    its status and trials (the first three, then how many more)."""
    records = list(records)
    if any(r.status in RANKED_STATUSES for r in records):
        return None
    if not records:
        return "the sweep ran no trial"
    trials_by_reason: dict[str, list[str]] = {}
    for record in sorted(records, key=lambda r: r.trial_id):
        reason = f"{record.status}: {' '.join(record.reason.split()) or 'no reason recorded'}"
        trials_by_reason.setdefault(reason, []).append(record.trial_id)
    shown = [f"{', '.join(ids)} {reason}" for reason, ids in list(trials_by_reason.items())[:3]]
    more = len(trials_by_reason) - len(shown)
    return (f"none of the {len(records)} trials trained: " + "; ".join(shown)
            + (f"; and {more} other reason(s) in results.md" if more else ""))


def best_config(spec: SweepSpec, record: TrialRecord) -> dict[str, dict[str, Any]]:
    """The full `configs_to_dict` form of a trial: what `nanovlm train --config` reads."""
    vlm, train = trial_configs(spec, record.config)
    return configs_to_dict(vlm, train)


def table_rows(records: Iterable[TrialRecord], spec: SweepSpec) -> list[dict[str, Any]]:
    """One dict per trial, ranked, with the columns of the results table."""
    metrics = [spec.metric] + [m for m in EXTRA_METRICS if m != spec.metric]
    rows = []
    for rank, record in enumerate(rank_trials(records, spec.metric, spec.mode), start=1):
        row: dict[str, Any] = {"rank": rank, "trial": record.trial_id, "status": record.status}
        for name in spec.varied_fields:
            row[name] = record.config.get(name)
        for name in metrics:
            row[name] = record.median(name) if name in MEDIAN_METRICS else record.final(name)
        row["steps"] = record.last_step
        row["wall_time_s"] = None if record.wall_time_s is None else round(record.wall_time_s, 1)
        row["reason"] = record.reason
        rows.append(row)
    never_reported = [m for m in metrics[1:] if all(row[m] is None for row in rows)]
    return [{k: v for k, v in row.items() if k not in never_reported} for row in rows]


def format_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)\n"
    columns = list(rows[0])
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def write_results(records: list[TrialRecord], spec: SweepSpec, out_dir: str | Path) -> dict[str, Path]:
    """Write results.csv, results.md, best_config.json (if any trial ranks) and the plots into
    `out_dir`; return {name: path} of what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(records, spec)
    written = {"results.csv": out / "results.csv", "results.md": out / "results.md"}
    write_csv(rows, written["results.csv"])
    written["results.md"].write_text(format_markdown(rows))
    best = best_trial(records, spec.metric, spec.mode)
    if best is not None:
        written["config.json"] = out / "config.json"
        written["config.json"].write_text(json.dumps(best_config(spec, best), indent=2) + "\n")
    written["best_checkpoint.json"] = write_best_checkpoint(records, best, spec, out)
    written["metric_vs_fields.png"] = out / "metric_vs_fields.png"
    plot_metric_vs_fields(records, spec, written["metric_vs_fields.png"])
    written["learning_curves.png"] = out / "learning_curves.png"
    plot_learning_curves(records, spec.metric, written["learning_curves.png"])
    return written


def write_best_checkpoint(records: list[TrialRecord], best: TrialRecord | None, spec: SweepSpec,
                          out: Path) -> Path:
    """`best_checkpoint.json`: each trial's best checkpoint by the sweep's metric, and the best
    trial's one, copied to `out/best_checkpoint/` (a training checkpoint: `nanovlm train
    --resume`, `nanovlm generate --checkpoint`) when it is on this machine's filesystem."""
    trials = {r.trial_id: r.best_checkpoint(spec.metric, spec.mode) for r in records}
    data: dict[str, Any] = {"metric": spec.metric, "mode": spec.mode, "best": None,
                            "trials": {k: v for k, v in trials.items() if v is not None}}
    chosen = trials.get(best.trial_id) if best is not None else None
    target = out / BEST_CHECKPOINT_DIR
    shutil.rmtree(target, ignore_errors=True)  # a resumed sweep may have a new best
    if chosen is not None:
        data["best"] = {"trial_id": best.trial_id, "run_id": best.run_id, **chosen, "copy": None}
        if "://" not in chosen["path"]:
            shutil.copytree(chosen["path"], target)
            data["best"]["copy"] = str(target)
    path = out / "best_checkpoint.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------- plots

def plot_metric_vs_fields(records: list[TrialRecord], spec: SweepSpec, path: str | Path) -> None:
    """Final metric against each varied field, one panel per field; categorical values (and
    choice/grid) are placed at evenly spaced positions, loguniform fields on a log axis."""
    plt = _pyplot()
    fields = spec.varied_fields
    fig, axes = plt.subplots(1, len(fields), figsize=(4.2 * len(fields), 3.6), squeeze=False)
    scored = [r for r in records if r.status in RANKED_STATUSES and r.final(spec.metric) is not None]
    for ax, name in zip(axes[0], fields):
        dist = spec.space[name]
        values = [r.config.get(name) for r in scored]
        ys = [r.final(spec.metric) for r in scored]
        colours = ["tab:blue" if r.status == "completed" else "tab:orange" for r in scored]
        if dist.kind in ("choice", "grid"):
            categories = [str(v) for v in dist.args]
            xs = [categories.index(str(v)) if str(v) in categories else -1 for v in values]
            ax.set_xticks(range(len(categories)), categories)
        else:
            xs = values
            if dist.kind == "loguniform":
                ax.set_xscale("log")
        ax.scatter(xs, ys, c=colours, s=40)
        ax.set_xlabel(name)
        ax.set_ylabel(spec.metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{spec.name}: final {spec.metric} per trial (blue: completed, orange: stopped early)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_learning_curves(records: list[TrialRecord], metric: str, path: str | Path) -> None:
    """`metric` and the training `loss` against step, one line per trial."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for record in sorted(records, key=lambda r: r.trial_id):
        for ax, key in zip(axes, (metric, "loss")):
            points = [(h["step"], h[key]) for h in record.history
                      if _is_number(h.get("step")) and _is_number(h.get(key))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="." if len(points) < 30 else None, label=_label(record))
    for ax, key in zip(axes, (metric, "loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if any(ax.get_legend_handles_labels()[0] for ax in axes):
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _label(record: TrialRecord) -> str:
    values = " ".join(f"{k}={_fmt(v)}" for k, v in record.config.items())
    return f"{record.trial_id} {values}".strip()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt
    return plt


# ------------------------------------------------------------------------- formatting

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4g}"
    text = " ".join(str(value).split())  # one line: reasons can span several
    return text if len(text) <= 100 else text[:97] + "..."
