"""Run a task: ask every question (this rank's share), score the answers, gather the
predictions of all ranks, and aggregate them the way lmms-eval does.

A prediction (one JSONL line of `nanovlm eval`): `id`, `prompt` (the text after the image
string), `output` (the raw answer, stripped), `parsed` (what the task's parser read), `score`,
`correct` (score == 1), `categories`, and `group` for a macro-averaged task (MMStar's
l2_category).

A task's result: `{"metric": "accuracy", "accuracy": 0.62, "n": 1500, "by_category": {...},
"n_by_category": {...}}`, the score under the metric's name. MMStar's score is lmms-eval's
"average": the mean over l2 categories of their accuracies, and each category's the mean over
its l2 categories; other tasks average over questions.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from typing import Any, Sequence

import torch.distributed as dist

from nanovlm.eval.answering import BatchAnswerer
from nanovlm.eval.tasks import Task, category_key

logger = logging.getLogger(__name__)


def predict(answerer: BatchAnswerer, task: Task, rows: Sequence[dict], positions: Sequence[int], batch_size: int,
            max_new_tokens: int | None = None) -> list[dict[str, Any]]:
    """Predictions for the rows at `positions`, asked `batch_size` at a time."""
    predictions = []
    for start in range(0, len(positions), batch_size):
        chunk = [(position, rows[position]) for position in positions[start:start + batch_size]]
        prompts = [task.prompt(row) for _, row in chunk]
        outputs = answerer.answer([(prompt, task.images(row)) for prompt, (_, row) in zip(prompts, chunk)],
                                  max_new_tokens or task.max_new_tokens, task.until)
        for (position, row), prompt, output in zip(chunk, prompts, outputs):
            parsed, score = task.score(row, output)
            prediction = {"id": _plain(task.question_id(row, position)), "position": position, "prompt": prompt,
                          "output": output, "parsed": parsed, "score": score, "correct": score == 1.0,
                          "categories": [str(c) for c in task.categories(row)]}
            if task.group is not None:
                prediction["group"] = str(task.group(row))
            predictions.append(prediction)
    return predictions


def _plain(value: Any) -> Any:
    """A question id as JSON keeps it (numpy ints from parquet become ints)."""
    return value.item() if hasattr(value, "item") else value


def run_task(answerer: BatchAnswerer, task: Task, rows: Sequence[dict], *, limit: int | None = None, batch_size: int = 16,
             max_new_tokens: int | None = None, rank: int = 0, world_size: int = 1
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(result, predictions) over the first `limit` rows (all by default). With several ranks each
    asks a strided share and every rank gets everything back (the same result on each)."""
    n = len(rows) if limit is None else min(limit, len(rows))
    start = time.perf_counter()
    predictions = predict(answerer, task, rows, list(range(rank, n, world_size)), batch_size, max_new_tokens)
    predictions = sorted(gather(predictions), key=lambda p: p["position"])
    result = aggregate(task, predictions)
    result["seconds"] = time.perf_counter() - start
    logger.info("%s: %s %.4f over %d questions (%.1f s).", task.name, task.metric, result[task.metric], n,
                result["seconds"])
    return result, predictions


def gather(items: list[Any]) -> list[Any]:
    """Every rank's items, on every rank (all_gather_object), or `items` in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def aggregate(task: Task, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The task's score overall and by category (see the module docstring)."""
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for prediction in predictions:
        for category in prediction["categories"]:
            by_category[category].append(prediction)
    return {"metric": task.metric, task.metric: _score(task, predictions), "n": len(predictions),
            "by_category": {c: _score(task, members) for c, members in sorted(by_category.items())},
            "n_by_category": {c: len(members) for c, members in sorted(by_category.items())}}


def _score(task: Task, predictions: Sequence[dict[str, Any]]) -> float:
    if not predictions:
        return 0.0
    if task.group is None:
        return statistics.mean(p["score"] for p in predictions)
    groups: dict[str, list[float]] = defaultdict(list)
    for prediction in predictions:
        groups[prediction["group"]].append(prediction["score"])
    return statistics.mean(statistics.mean(scores) for scores in groups.values())


def as_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Results as flat metrics: eval_<task>_<metric>, eval_<task>_<metric>_<category>, and
    eval_<task>_n, the number of questions scored."""
    metrics: dict[str, float] = {}
    for name, result in results.items():
        key = f"eval_{name}_{result['metric']}"
        metrics[key] = float(result[result["metric"]])
        metrics[f"eval_{name}_n"] = float(result["n"])
        for category, score in result["by_category"].items():
            metrics[f"{key}_{category_key(category)}"] = float(score)
    return metrics
