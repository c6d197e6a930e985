"""What `nanovlm eval` writes and shows: the results table (overall and per category), the
results JSON, the predictions JSONL, and the MLflow run that holds them.

Output directory:

    results.json                 {"<task>": {"metric": ..., "<metric>": ..., "n": ..., "by_category": {...}, ...}}
    results.md                   the table
    predictions/<task>.jsonl     one line per question (nanovlm.eval.runner)

MLflow: a run of its own, nested under the checkpoint's training run when the checkpoint's run
record (`mlflow_run.json`) names one in the same store; params say what was evaluated, metrics
are `runner.as_metrics`, the three files are artifacts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from nanovlm import tracking

logger = logging.getLogger(__name__)

KIND_TAG = "nanovlm.kind"
CHECKPOINT_TAG = "nanovlm.checkpoint"


def format_table(results: dict[str, dict[str, Any]], chance: Optional[dict[str, float]] = None) -> str:
    """A markdown table: each task's score, then one row per category (indented)."""
    lines = ["| task | category | metric | score | n |", "|---|---|---|---:|---:|"]
    for name, result in results.items():
        metric = result["metric"]
        extra = f" (chance {chance[name]:.1%})" if chance and name in chance else ""
        lines.append(f"| {name} | all | {metric} | {result[metric]:.2%}{extra} | {result['n']} |")
        for category, score in result["by_category"].items():
            lines.append(f"| | {category} | {metric} | {score:.2%} | {result['n_by_category'][category]} |")
    return "\n".join(lines) + "\n"


def write_outputs(output_dir: str | Path, results: dict[str, dict[str, Any]],
                  predictions: dict[str, list[dict[str, Any]]], json_path: Optional[str | Path] = None
                  ) -> dict[str, Path]:
    """Write results.json, results.md and predictions/<task>.jsonl (and `json_path`, if given)."""
    out = Path(output_dir)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    files = {"results.json": out / "results.json", "results.md": out / "results.md"}
    text = json.dumps(results, indent=2) + "\n"
    files["results.json"].write_text(text)
    files["results.md"].write_text(format_table(results))
    for task, rows in predictions.items():
        path = out / "predictions" / f"{task}.jsonl"
        with path.open("w") as f:
            for row in rows:
                f.write(json.dumps({k: v for k, v in row.items() if k != "position"}, default=str) + "\n")
        files[f"predictions/{task}.jsonl"] = path
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text)
    return files


def log_eval_run(metrics: dict[str, float], params: dict[str, Any], files: dict[str, Path], *,
                 checkpoint_dir: Optional[Path], uri: str, experiment_name: str,
                 run_name: Optional[str] = None) -> str:
    """Create the MLflow run of an evaluation (a child of the checkpoint's training run, if its run
    record names one in `uri`), log everything, end it; return its id. The store was checked."""
    client = tracking._client(uri)
    parent = tracking.recorded_run_id(checkpoint_dir, uri) if checkpoint_dir is not None else None
    experiment_id = None
    if parent is not None:
        try:
            experiment_id = client.get_run(parent).info.experiment_id
        except Exception as exc:  # noqa: BLE001 - e.g. deleted from the store: a top-level run instead
            logger.warning("The checkpoint's MLflow run %s is not in %s (%s); the evaluation is not nested.",
                           parent, tracking.masked_uri(uri), exc)
            parent = None
    if experiment_id is None:
        experiment_id = tracking.get_or_create_experiment(uri, experiment_name)
    tags = {**tracking.context_tags(), KIND_TAG: "eval", CHECKPOINT_TAG: str(params.get("checkpoint", ""))}
    if parent is not None:
        tags[tracking.PARENT_RUN_TAG] = parent
    run_id = client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id
    run = tracking.TrackingRun(run_id, uri)
    run._guard("log_params", lambda c: c.log_batch(run_id, params=_params(params)))
    run.log_metrics(metrics, step=0)
    for name, path in files.items():
        run.log_artifact(path, str(Path(name).parent) if "/" in name else None)
    run.end("FINISHED")
    logger.info("MLflow run %s%s in %s", run_id, f" (nested in {parent})" if parent else "", tracking.masked_uri(uri))
    return run_id


def _params(params: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in params.items() if v is not None]
