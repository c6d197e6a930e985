"""`nanovlm train`: train a model in this process (or on Ray Train with --num-workers > 1).

    nanovlm train --preset tiny --dataset shapes --max-steps 500 --output runs/demo
    nanovlm train --resume runs/demo --max-steps 1000          # continue that run
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from nanovlm.commands.common import add_config_arguments, configs_from_args
from nanovlm.config import TrainConfig, VLMConfig, apply_overrides

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--dataset", default=None, help="train_dataset_path: 'shapes', a local dir or a Hub id")
    parser.add_argument("--max-steps", type=int, default=None, help="max_training_steps")
    parser.add_argument("--output", default=None, help="output_dir (checkpoints, summary.json)")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue from a training checkpoint (a run's output dir or its "
                             "checkpoints/step_XXXXXX); its saved configs are the base unless --config is given, "
                             "and output_dir stays the run's own unless --output is given")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="data-parallel workers (TrainConfig.num_workers); more than 1 runs on Ray Train")
    parser.add_argument("--gpu", action="store_true", help="use_gpu=True (one GPU per Ray worker)")


def _configs(args: argparse.Namespace) -> tuple[VLMConfig, TrainConfig]:
    if args.resume and not args.config:
        from nanovlm.training.checkpointing import TRAIN_CONFIG_FILE, resolve_checkpoint
        checkpoint = resolve_checkpoint(args.resume)
        vlm = VLMConfig.from_json(checkpoint / "config.json", strict=False)
        train = TrainConfig.from_json(checkpoint / TRAIN_CONFIG_FILE)
        vlm, train = apply_overrides(vlm, train, args.overrides)
        vlm, train = vlm.validate(), train.validate()
    else:
        vlm, train = configs_from_args(args)
    flags = {"train_dataset_path": args.dataset, "max_training_steps": args.max_steps,
             "output_dir": args.output, "num_workers": args.num_workers}
    if args.gpu:
        flags["use_gpu"] = True
    changes = {k: v for k, v in flags.items() if v is not None}
    return vlm, train.replace(**changes).validate()


def run(args: argparse.Namespace) -> int:
    vlm_cfg, train_cfg = _configs(args)

    if train_cfg.num_workers > 1:
        # ---- Ray Train route (owned by the distributed package) ----
        import sys

        from nanovlm.distributed.launcher import ClusterResourceError, run_training
        from nanovlm.tracking import TrackingError
        try:
            result = run_training(vlm_cfg, train_cfg,
                                  preset_name=None if (args.config or args.resume) else args.preset)
        except (TrackingError, ClusterResourceError) as exc:
            print(f"nanovlm train: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(result, indent=2, default=str) if not isinstance(result, (int, type(None))) else "")
        return 0
    # ---- single process ----

    from nanovlm.training import train
    summary = train(vlm_cfg, train_cfg, resume_from=args.resume)
    shown = {k: v for k, v in summary.items() if k != "config"}
    print(json.dumps(shown, indent=2))
    print(f"summary written to {Path(train_cfg.output_dir) / 'summary.json'}")
    return 0
