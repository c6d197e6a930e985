#!/usr/bin/env bash
# GPU benchmark of nanovlm-222m with random weights (no network): `nanovlm bench gpu-check` with
# the given flags, without needing the package installed; see nanovlm/bench/gpu_check.py.
cd "$(dirname "$0")/.." && exec "${PYTHON:-python}" -m nanovlm.cli bench gpu-check "$@"
