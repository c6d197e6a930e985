"""Does the default demo really learn? Train the `tiny` preset on `shapes` from scratch, exactly
as `nanovlm train --preset tiny --dataset shapes --output DIR` does, then print held-out
accuracy per question type next to chance, and the wall time.

    .venv/bin/python benchmarks/learn_shapes.py [--output runs/learn_shapes] [--set field=value ...]

Target (issue 3): >= 90% on colour and >= 80% on shape questions within 10 minutes on 2 CPU
cores. Exit status 0 when both targets are met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanovlm.config import apply_overrides, preset  # noqa: E402
from nanovlm.training import train  # noqa: E402

TARGETS = {"colour": 0.90, "shape": 0.80}
TIME_BUDGET_S = 600.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/learn_shapes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    vlm_cfg, train_cfg = preset("tiny")
    vlm_cfg, train_cfg = apply_overrides(vlm_cfg, train_cfg, [f"output_dir={args.output}", *args.overrides])
    start = time.perf_counter()
    summary = train(vlm_cfg, train_cfg)
    wall = time.perf_counter() - start

    chance = summary.get("chance", {})
    types = sorted(k.removeprefix("val_accuracy_") for k in summary if k.startswith("val_accuracy_"))
    print(f"\nshapes, tiny preset: {summary['steps']} steps, batch {train_cfg.batch_size}, "
          f"{os.cpu_count()} CPU cores visible, torch threads {__import__('torch').get_num_threads()}")
    print(f"{'question type':<14}{'accuracy':>10}{'chance':>10}{'target':>10}")
    for qtype in types:
        target = TARGETS.get(qtype)
        print(f"{qtype:<14}{summary[f'val_accuracy_{qtype}']:>10.1%}"
              f"{chance.get(qtype, float('nan')):>10.1%}{(f'{target:.0%}' if target else '-'):>10}")
    print(f"{'overall':<14}{summary['val_accuracy']:>10.1%}")
    print(f"val_loss {summary['val_loss']:.4f}   train tokens/s {summary['tokens_per_second']:.0f}   "
          f"wall time {wall:.0f} s (train {summary['train_time_s']:.0f} s; budget {TIME_BUDGET_S:.0f} s)")

    met = all(summary.get(f"val_accuracy_{q}", 0.0) >= t for q, t in TARGETS.items()) and wall <= TIME_BUDGET_S
    print("targets met" if met else "targets NOT met")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
