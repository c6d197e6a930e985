"""Answer a prompt about an image with a checkpoint: the entry point for `ray job submit`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/generate.py --checkpoint DIR --image PATH --prompt "..." [--max-new-tokens N] [--greedy] [--compile]

Same arguments as `nanovlm generate`; runs on the node the job lands on (no Ray API needed).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root (the job's working dir)

from nanovlm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
