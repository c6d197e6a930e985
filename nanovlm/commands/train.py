"""`nanovlm train`: train a model, tracked in MLflow, in this process or on Ray Train.

    nanovlm train --preset tiny --dataset shapes --max-steps 500 --output runs/demo
    nanovlm train --resume runs/demo --max-steps 1000          # continue that run (and its MLflow run)
    nanovlm train --preset tiny --num-workers 2                # Ray Train, 2 data-parallel workers

One process unless --num-workers is above 1 or --gpu is given: then Ray Train
(`nanovlm.distributed.run_training`); `jobs/train.py` is this command for `ray job submit`.
Both routes log the same MLflow run (`nanovlm.training.tracked.train_tracked` is the other).

Exit status: 0 trained and tracked; 2 bad input or an unusable store/cluster, before training;
3 trained, but the MLflow store did not take everything before the deadline (the rest is in
the run's journal; `nanovlm tracking sync OUTPUT_DIR` sends it). SIGTERM (`ray job stop`) stops
training like Ctrl-C, and the MLflow run ends KILLED.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from nanovlm.commands.common import add_config_arguments, base_configs
from nanovlm.config import TrainConfig, VLMConfig, apply_overrides, parse_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--dataset", default=None, help="train_dataset_path: 'shapes', local files or dirs, Hub ids "
                        "or URIs; several, comma separated, are mixed (docs/data.md)")
    parser.add_argument("--max-steps", type=int, default=None, help="max_training_steps")
    parser.add_argument("--output", default=None, help="output_dir (checkpoints, summary.json)")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue from a training checkpoint (a run's output dir or its "
                             "checkpoints/step_XXXXXX) and in its MLflow run; its saved configs are the base "
                             "unless --config is given, and output_dir stays the run's own unless --output is given")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="data-parallel workers (TrainConfig.num_workers); more than 1 runs on Ray Train")
    parser.add_argument("--gpu", action="store_true",
                        help="use_gpu=True: run on Ray Train with one GPU per worker (nccl, bf16 autocast)")
    parser.add_argument("--experiment", default=None, metavar="NAME",
                        help=f"MLflow experiment (TrainConfig.experiment_name, default {TrainConfig.experiment_name!r})")
    parser.add_argument("--run-name", default=None, metavar="NAME",
                        help="MLflow run name (default <preset>-<date>-<time>); on Ray Train also the run's "
                             "directory under the storage path, where an existing name resumes that run")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--register", default=None, metavar="NAME",
                        help="register the final model (an MLflow pyfunc model) in the MLflow model registry under NAME "
                             "(TrainConfig.register_model)")


def _configs(args: argparse.Namespace) -> tuple[VLMConfig, TrainConfig]:
    """The --resume checkpoint's configs (or --config's, or the --preset's), then --set, then the
    flags. Validated by the route that trains them, where they enter the process."""
    if args.resume and not args.config:
        from nanovlm.training.checkpointing import TRAIN_CONFIG_FILE, resolve_checkpoint

        checkpoint = resolve_checkpoint(args.resume)
        vlm = VLMConfig.from_json(checkpoint / "config.json", strict=False)
        train = TrainConfig.from_json(checkpoint / TRAIN_CONFIG_FILE)
    else:
        vlm, train = base_configs(args)
    flags = {"train_dataset_path": args.dataset, "max_training_steps": args.max_steps,
             "output_dir": args.output, "num_workers": args.num_workers, "experiment_name": args.experiment,
             "use_gpu": True if args.gpu else None, "register_model": args.register}
    changes = {**parse_overrides(args.overrides), **{k: v for k, v in flags.items() if v is not None}}
    return apply_overrides(vlm, train, changes)


def run(args: argparse.Namespace) -> int:
    vlm_cfg, train_cfg = _configs(args)
    options: dict[str, Any] = dict(preset_name=None if (args.config or args.resume) else args.preset,
                                   run_name=args.run_name, track=not args.no_tracking, resume_from=args.resume)
    with sigterm_as_interrupt():
        if train_cfg.num_workers > 1 or train_cfg.use_gpu:
            from nanovlm.distributed.launcher import run_training
            summary = run_training(vlm_cfg, train_cfg, **options)
        else:
            from nanovlm.training.tracked import train_tracked
            summary = train_tracked(vlm_cfg, train_cfg, **options)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))
    output_dir = summary.get("config", {}).get("train", {}).get("output_dir", train_cfg.output_dir)
    print(f"summary written to {Path(output_dir) / 'summary.json'}")
    if summary.get("tracking_pending"):
        print(f"nanovlm train: training finished, but the MLflow store {summary.get('tracking_uri')} did not take "
              f"everything; the rest is in {summary['tracking_pending']}. When the store answers, send it with: "
              f"nanovlm tracking sync {output_dir}", file=sys.stderr)
        return 3
    return 0


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while training (main thread only), so a stopped run
    (`ray job stop`, a scheduler) ends its MLflow run KILLED instead of leaving it RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
