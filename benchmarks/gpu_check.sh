#!/usr/bin/env bash
# GPU benchmark of nanovlm-222m with random weights (no network); see nanovlm/bench/gpu_check.py.
cd "$(dirname "$0")/.." && exec "${PYTHON:-python}" -m nanovlm.bench.gpu_check "$@"
