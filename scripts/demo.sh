#!/usr/bin/env bash
# The main demo, from a fresh clone: set up, then sweep the `tiny` preset on the offline
# `shapes` dataset with Ray Tune (4 trials, ASHA, 2 at a time), tracked in MLflow.
#
#   bash scripts/demo.sh                     # set-up (first time) + the sweep in tune/demo.yaml
#   bash scripts/demo.sh --set max_training_steps=100    # extra arguments go to `nanovlm sweep`
#
# Everything stays on this machine: a private Ray cluster on 127.0.0.1 that ends with the sweep,
# the MLflow store in ~/.nanovlm/mlflow.db (NANOVLM_HOME moves it), results under
# ~/.nanovlm/sweeps/demo-<time>/. It ends by printing the results table, the best trial's
# per-question accuracy, where the files are, and the command that opens the dashboard.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "== set-up: creating .venv and installing nanovlm-ray (pip install -c constraints.txt -e .)"
    "$PYTHON" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import nanovlm.sweep.runner, ray.tune, mlflow" 2>/dev/null; then
    .venv/bin/pip install -q -c constraints.txt -e .
fi

# Train's controller polls its workers every 2 s by default and a worker waits for that poll at
# each report: poll faster so that reports do not stall these short runs.
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.5}"
export RAY_DISABLE_USAGE_STATS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # the demo needs no network

echo "== sweep: nanovlm sweep tune/demo.yaml --address local $*"
start=$(date +%s)
status=0
.venv/bin/nanovlm sweep tune/demo.yaml --address local "$@" || status=$?
echo "== demo finished in $(( $(date +%s) - start )) s"
echo "== dashboard: .venv/bin/nanovlm dashboard   (MLflow UI on http://127.0.0.1:5000; Ctrl-C stops it)"
exit $status
