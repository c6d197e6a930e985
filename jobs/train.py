"""Train a model: `nanovlm train` as the entry point for `ray job submit`, or run directly.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train.py --preset tiny --num-workers 2 [--gpu] [--set field=value ...]

Same arguments and path as `nanovlm train` (`python jobs/train.py --help`): Ray Train with
--num-workers above 1 or --gpu, else one process on the node that runs the job. Inside a
submitted job it connects to that cluster (RAY_ADDRESS); run directly it connects to the latest
local cluster or starts one on 127.0.0.1. The MLflow store is MLFLOW_TRACKING_URI if the job's
runtime env sets it, else the SQLite file under $NANOVLM_HOME or ~/.nanovlm on the node that
runs the job. Prints the run's summary as JSON; exits 2 with a message on bad input, 3 when the
MLflow store did not take everything (the job then shows FAILED; `nanovlm tracking sync` sends the rest).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root (the job's working dir)

from nanovlm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
