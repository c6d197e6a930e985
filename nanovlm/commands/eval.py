"""`nanovlm eval`: score a checkpoint on benchmarks, as lmms-eval scores them (docs/eval.md).

    nanovlm eval --checkpoint runs/demo --task mmstar --dataset shapes
    nanovlm eval --checkpoint lusxvr/nanoVLM-222M --task mmstar,textvqa --limit 500 --json scores.json
    nanovlm eval --checkpoint CK --task mmstar --dataset /data/MMStar      # a local copy (no Hub access)

Prints the table (each task overall and per category) and writes, under --output,
results.json, results.md and predictions/<task>.jsonl; --json FILE writes the results there too.
The evaluation is an MLflow run (nested in the checkpoint's training run when its run record
names one), with the scores as metrics and those files as artifacts; --no-tracking skips it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="model directory, training checkpoint, a training run's output directory (its latest "
                             "checkpoint), or a Hub repo id")
    parser.add_argument("--task", required=True, metavar="TASK[,TASK...]",
                        help="benchmarks, comma separated, each optionally TASK:LIMIT: mmstar, scienceqa, ai2d, "
                             "textvqa, chartqa, docvqa")
    parser.add_argument("--dataset", action="append", default=[], metavar="[TASK=]PATH_OR_HUB_ID",
                        help="where a task's questions are, in its published schema: a local copy (parquet, "
                             "save_to_disk, imagefolder) or a Hub id; 'shapes' for mmstar: the offline shapes "
                             "multiple-choice questions. Default: the task's Hub dataset. With several tasks, "
                             "prefix TASK= (repeatable)")
    parser.add_argument("--split", default=None, help="the split to read (default: the task's, lmms-eval's)")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions of each task")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length cap (default: the task's, as lmms-eval sets it, else 50)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help='write {"<task>": {"<metric>": ..., "n": ..., "by_category": {...}}} to FILE')
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="results and predictions (default: runs/eval/<checkpoint>-<date>-<time>)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or directory (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--experiment", default=None, metavar="NAME",
                        help="MLflow experiment when the evaluation is not nested (default: the checkpoint's, "
                             "else 'nanovlm')")
    parser.add_argument("--run-name", default=None, metavar="NAME", help="MLflow run name (default eval-<tasks>)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def run(args: argparse.Namespace) -> int:
    from nanovlm import tracking
    from nanovlm.config import ConfigError
    from nanovlm.eval.answering import BatchAnswerer
    from nanovlm.eval.benchmark_data import load_questions, shapes_settings
    from nanovlm.eval.report import format_table, log_eval_run, write_outputs
    from nanovlm.eval.runner import as_metrics, run_task
    from nanovlm.eval.tasks import parse_task_list

    if args.batch_size <= 0 or (args.limit is not None and args.limit <= 0):
        raise ConfigError(f"--batch-size={args.batch_size} and --limit={args.limit} must be positive.")
    tasks = parse_task_list(args.task, args.limit)
    sources = dataset_sources(args.dataset, [task.name for task, _ in tasks])
    checkpoint_dir = local_checkpoint(args.checkpoint)
    train_config = _read_train_config(checkpoint_dir)
    uri = None
    if not args.no_tracking:   # before anything slow: an unusable store fails now
        uri = tracking.check_tracking_store(tracking.absolute_uri(tracking.default_tracking_uri()))
    img_size = _img_size(checkpoint_dir)
    questions = {task.name: load_questions(task, sources.get(task.name), args.split,
                                           shapes_settings(train_config, img_size), limit)
                 for task, limit in tasks}

    answerer = BatchAnswerer.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer, device=args.device)
    results, predictions = {}, {}
    for task, limit in tasks:
        results[task.name], predictions[task.name] = run_task(
            answerer, task, questions[task.name], limit=limit, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens)

    print(format_table(results), end="")
    output = Path(args.output or default_output(args.checkpoint))
    files = write_outputs(output, results, predictions, args.json)
    print(f"results and predictions written to {output}" + (f"; results also in {args.json}" if args.json else ""))
    if uri is not None:
        params = {"checkpoint": args.checkpoint, "tasks": args.task, "split": args.split, "limit": args.limit,
                  "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                  **{f"dataset.{task.name}": sources.get(task.name, task.hub_id) for task, _ in tasks}}
        metrics = as_metrics(results)
        experiment = args.experiment or (train_config or {}).get("experiment_name") or "nanovlm"
        run_id = log_eval_run(metrics, params, files, checkpoint_dir=checkpoint_dir, uri=uri,
                              experiment_name=experiment,
                              run_name=args.run_name or f"eval-{'-'.join(results)}-{time.strftime('%Y%m%d-%H%M%S')}")
        print(f"MLflow run {run_id} in {tracking.masked_uri(uri)}")
    return 0


def dataset_sources(values: list[str], task_names: list[str]) -> dict[str, str]:
    """--dataset values -> {task: source}: 'TASK=SOURCE', or a bare SOURCE when one task is asked for."""
    from nanovlm.config import ConfigError

    sources: dict[str, str] = {}
    for value in values:
        name, sep, source = value.partition("=")
        if sep and name in task_names:
            sources[name] = source
        elif len(task_names) == 1:
            sources[task_names[0]] = value
        else:
            raise ConfigError(f"--dataset {value!r}: with several tasks ({', '.join(task_names)}) write "
                              "--dataset TASK=PATH_OR_HUB_ID for each.")
    return sources


def local_checkpoint(checkpoint: str) -> Path | None:
    """The local directory the model is read from (a run's latest checkpoint), or None (a Hub id)."""
    from nanovlm.export.checkpoint_files import model_directory

    directory = Path(model_directory(checkpoint))
    return directory if directory.is_dir() else None


def _read_train_config(checkpoint_dir: Path | None) -> dict[str, Any] | None:
    """The training config saved next to a training checkpoint (train_config.json), if any."""
    path = checkpoint_dir / "train_config.json" if checkpoint_dir is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _img_size(checkpoint_dir: Path | None) -> int:
    """The shapes image size training used: the model's vit_img_size (as `build_datasets` draws them)."""
    from nanovlm.config import VLMConfig

    path = checkpoint_dir / "config.json" if checkpoint_dir is not None else None
    if path is None or not path.is_file():
        return 64
    return VLMConfig.from_json(path, strict=False).vit_img_size


def default_output(checkpoint: str) -> Path:
    name = Path(checkpoint.rstrip("/")).name or "checkpoint"
    return Path("runs") / "eval" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
