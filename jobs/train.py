"""Train on Ray Train: the entry point for `ray job submit`, or run directly.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train.py --preset tiny --num-workers 2 [--gpu] [--set field=value ...]

Inside a submitted job it connects to that cluster; run directly (`python jobs/train.py ...`)
it connects to the latest local cluster or starts one on 127.0.0.1. Same path as
`nanovlm train --num-workers N`: nanovlm.distributed.run_training. Prints the run's summary
as JSON on stdout; exits with status 2 and a one-paragraph message on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root (the job's working dir)

from nanovlm.commands.common import add_config_arguments, configs_from_args  # noqa: E402
from nanovlm.config import ConfigError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (data-parallel ranks)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl, bf16 autocast)")
    parser.add_argument("--run-name", default=None,
                        help="name of the run under the storage path; an existing name resumes that run")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from nanovlm.distributed import ClusterResourceError, run_training
    from nanovlm.tracking import TrackingError

    try:
        vlm_cfg, train_cfg = configs_from_args(args)
        if args.num_workers is not None:
            train_cfg = train_cfg.replace(num_workers=args.num_workers)
        if args.gpu:
            train_cfg = train_cfg.replace(use_gpu=True)
        summary = run_training(vlm_cfg, train_cfg, preset_name=None if args.config else args.preset,
                               run_name=args.run_name, track=not args.no_tracking)
    except (ConfigError, TrackingError, ClusterResourceError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
