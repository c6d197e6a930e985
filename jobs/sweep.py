"""Run a sweep on a Ray cluster: the entry point for `ray job submit`, or run directly.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/sweep.py tune/demo.yaml [--set field=value ...] [--num-samples N]

Same arguments and path as `nanovlm sweep` (nanovlm.sweep.runner.run_sweep). Inside a
submitted job it connects to that cluster (RAY_ADDRESS); the MLflow store is
MLFLOW_TRACKING_URI if the job's runtime env sets it, else the SQLite file under
$NANOVLM_HOME or ~/.nanovlm on the node that runs the job. Exits 2 with a message on bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root (the job's working dir)

from nanovlm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
