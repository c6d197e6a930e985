"""`nanovlm bench`: measure every point of a benchmark grid (see nanovlm/bench/grid.py).

    nanovlm bench tune/bench_shuffle.yaml                 # Ray Tune, one trial at a time, MLflow
    nanovlm bench tune/bench_batch.yaml --set lm_n_blocks=2 --executor local --no-mlflow

Points already measured (same config, settings and torch version) come from the cache in the
output directory; the table, CSV and plots are rewritten each time.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", help="a benchmark grid YAML file, e.g. tune/bench_shuffle.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="fix a VLMConfig/TrainConfig field for every point (wins over the file)")
    parser.add_argument("--output", default=None,
                        help="results and cache directory (default: $NANOVLM_HOME/bench/<name>)")
    parser.add_argument("--executor", choices=("ray", "local"), default="ray",
                        help="ray: one Ray Tune trial per point (default); local: in this process")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def run(args: argparse.Namespace) -> int:
    from nanovlm.bench.grid import load_grid, run_grid

    grid = load_grid(args.grid, args.overrides)
    result = run_grid(grid, output_dir=args.output, executor=args.executor, tracking=not args.no_mlflow)
    print((result.output_dir / "results.md").read_text())
    print(f"{len(result.measured)} point(s) measured, {len(result.cached)} from the cache; "
          f"results in {result.output_dir}")
    if result.parent_run_id:
        print(f"MLflow run {result.parent_run_id} (experiment bench-{grid.name}); open it with `nanovlm dashboard`")
    failed = [r for r in result.rows if r.get("status") == "failed"]
    return 1 if failed else 0
