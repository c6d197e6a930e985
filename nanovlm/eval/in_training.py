"""Benchmarks at each evaluation of a training run: `TrainConfig.eval_tasks`.

    eval_tasks: "mmstar:300,textvqa"        # task[:questions]; docs/eval.md lists the tasks
    eval_tasks_limit: 200                   # questions of a task without its own :N (None: all)
    eval_tasks_datasets: {mmstar: shapes}   # where a task's questions are (default: its Hub dataset)

The loop calls `TrainingBenchmarks` at every `eval_interval` and at the end, after the
validation loss and accuracy. Each rank answers a strided share of the first questions and
the predictions are gathered, so every rank (rank 0 logs and reports) gets the same scores:
`eval_<task>_<metric>`, `eval_<task>_<metric>_<category>` and `eval_<task>_n`, merged into the step's eval
metrics (MLflow, Ray reports, Tune's `metric`, summary.json).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch

from nanovlm.eval.answering import BatchAnswerer
from nanovlm.eval.benchmark_data import load_questions, shapes_settings
from nanovlm.eval.runner import as_metrics, run_task
from nanovlm.eval.tasks import parse_task_list

logger = logging.getLogger(__name__)


class TrainingBenchmarks:
    """The configured tasks with their questions, loaded once (before the first step, so a
    missing dataset fails before training does)."""

    def __init__(self, vlm_cfg, train_cfg):
        self.tasks = parse_task_list(train_cfg.eval_tasks, train_cfg.eval_tasks_limit, what="eval_tasks")
        settings = shapes_settings(train_cfg.to_dict(), vlm_cfg.vit_img_size)
        self.questions = {task.name: load_questions(task, train_cfg.eval_tasks_datasets.get(task.name),
                                                    shapes_settings=settings, limit=limit)
                          for task, limit in self.tasks}

    def __call__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int, device: torch.device,
                 autocast: Callable[[], Any] = contextlib.nullcontext, rank: int = 0, world_size: int = 1
                 ) -> dict[str, float]:
        """The scores of `model` (unwrapped: generate is not DDP's) on every task, as metrics.
        The global RNG is left as it was (greedy decoding draws nothing, but a task might)."""
        answerer = BatchAnswerer(model, tokenizer, device=device, autocast=autocast)
        results = {}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for task, limit in self.tasks:
                results[task.name], _ = run_task(answerer, task, self.questions[task.name], limit=limit,
                                                 batch_size=batch_size, rank=rank, world_size=world_size)
        return as_metrics(results)
