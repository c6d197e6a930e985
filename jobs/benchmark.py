"""Run a benchmark grid on a Ray cluster: the entry point for `ray job submit`, or run directly.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/benchmark.py tune/bench_shuffle.yaml [--set field=value ...]

Same arguments as `nanovlm bench`. Inside a submitted job it connects to that cluster
(RAY_ADDRESS) and runs one trial per point, one at a time; the cache and tables go to
$NANOVLM_HOME/bench/<name> on the node that runs the job (or --output).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root (the job's working dir)

from nanovlm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
