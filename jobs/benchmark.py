"""Run a benchmark on a Ray cluster: the entry point for `ray job submit`, or run directly.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/benchmark.py grid benchmarks/grids/shuffle.yaml [--set field=value ...]
    ray job submit ... -- python jobs/benchmark.py compare --configs tiny
    ray job submit ... --entrypoint-num-gpus 1 -- python jobs/benchmark.py gpu-check

Same arguments as `nanovlm bench` (compare, gpu-check or grid, then that benchmark's flags).
A grid, inside a submitted job, connects to that cluster (RAY_ADDRESS) and runs one trial per
point, one at a time; the cache and tables go to $NANOVLM_HOME/bench/<name> on the node that
runs the job (or --output). compare and gpu-check run in the job's own process (give it a GPU
with --entrypoint-num-gpus) and print their tables to the job's log; a --json path is on that
node, relative to the job's temporary working directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root (the job's working dir)

from nanovlm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
