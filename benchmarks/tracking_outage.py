"""Step time while the MLflow store is down, against the same run's steps while it is up.

    python benchmarks/tracking_outage.py [--preset tiny] [--steps 150] [--warmup 20] [--threads 1] [--set f=v ...]

One process, one training run tracked the way `nanovlm train` tracks it (`MlflowHooks` over a
`JournaledRun`) into a local `mlflow server` (127.0.0.1, a free port, a fresh SQLite store):
`--warmup` steps, then three phases of `--steps` steps each:

    up      the server answers; rank 0's thread sends every log_interval steps
    down    the server is stopped (the thread's sends fail and are retried in the background)
    up      the server is started again (training waits at the boundary until it answers,
            so the start-up's CPU use lands in no phase) and gets the backlog

A step's time is the wall time between the ends of two consecutive steps, so it holds everything
the hooks and the logging thread cost the training thread; the steps at the two boundaries are
left out. Prints one JSON line: the median step time of each phase and
`outage_over_undisturbed` = median(down) / mean of the two medians(up) (goal: within 1.10).
The two `up` medians bracket the outage: far apart means the machine's load changed, rerun it.
`cpu_s_per_step_*` is this process's CPU time (all its threads) per step in each phase: a wall
time that grows while it does not is another process's load, not this one's.

Torch gets `--threads` threads (default 1, leaving a core to the server, which runs on the same
machine here, and to the rest of the machine): with every core training, one busy process next
to it makes torch's threads wait for each other and a step 10-20x slower, in any phase.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanovlm import tracking  # noqa: E402
from nanovlm.commands.dashboard import MlflowServer  # noqa: E402
from nanovlm.config import apply_overrides, configs_to_dict, preset  # noqa: E402
from nanovlm.tracking_journal import JournaledRun  # noqa: E402
from nanovlm.training import train  # noqa: E402
from nanovlm.training.tracked import MlflowHooks  # noqa: E402


class OutageHooks(MlflowHooks):
    """MlflowHooks that time each step and stop/start the server at the phase boundaries."""

    def __init__(self, run, output_dir, server: MlflowServer, down_after: int, up_after: int):
        super().__init__(run, output_dir, owns_run=True)
        self.server, self.down_after, self.up_after = server, down_after, up_after
        self.ends: dict[int, float] = {}
        self.cpu: dict[int, float] = {}

    def on_step(self, step, metrics):
        super().on_step(step, metrics)
        self.ends[step] = time.perf_counter()
        self.cpu[step] = time.process_time()
        if step == self.down_after:
            self.server.stop()
            self.ends[step], self.cpu[step] = time.perf_counter(), time.process_time()
        elif step == self.up_after:
            self.server.start()
            self.ends[step], self.cpu[step] = time.perf_counter(), time.process_time()


def median_step(ends: dict[int, float], first: int, last: int) -> float:
    """Median wall time of steps first..last (each from the end of the step before)."""
    return statistics.median(ends[s] - ends[s - 1] for s in range(first, last + 1))


def cpu_per_step(cpu: dict[int, float], first: int, last: int) -> float:
    return (cpu[last] - cpu[first - 1]) / (last - first + 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=150, help="steps per phase")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    torch.set_num_threads(args.threads)
    w, n = args.warmup, args.steps
    total = w + 3 * n
    with tempfile.TemporaryDirectory(prefix="tracking-outage-") as tmp:
        vlm, train_cfg = apply_overrides(*preset(args.preset), args.overrides)
        train_cfg = train_cfg.replace(max_training_steps=total, output_dir=str(Path(tmp) / "out"),
                                      checkpoint_interval=10 * total, eval_interval=10 * total)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = MlflowServer(f"sqlite:///{tmp}/server.db", port)
        server.start(timeout_s=300)
        try:
            run_id = tracking.create_run(configs_to_dict(vlm, train_cfg), uri=server.address,
                                         experiment_name="tracking-outage")
            run = JournaledRun(run_id, server.address, train_cfg.output_dir, flush_every=train_cfg.log_interval)
            hooks = OutageHooks(run, train_cfg.output_dir, server, down_after=w + n, up_after=w + 2 * n)
            train(vlm, train_cfg, hooks=hooks)
            steps = len(tracking._client(server.address).get_metric_history(run_id, "loss"))
        finally:
            server.stop()
    phases = {"up_before": (w + 2, w + n), "down": (w + n + 2, w + 2 * n), "up_after": (w + 2 * n + 2, total)}
    medians = {name: median_step(hooks.ends, *steps) for name, steps in phases.items()}
    up_before, down, up_after = medians["up_before"], medians["down"], medians["up_after"]
    print(json.dumps({
        "preset": args.preset, "overrides": args.overrides, "steps_per_phase": n, "threads": args.threads,
        "log_interval": train_cfg.log_interval,
        **{f"median_step_s_{name}": round(value, 5) for name, value in medians.items()},
        **{f"cpu_s_per_step_{name}": round(cpu_per_step(hooks.cpu, *steps), 5) for name, steps in phases.items()},
        "outage_over_undisturbed": round(down / ((up_before + up_after) / 2), 3),
        "steps_in_mlflow": steps, "steps_trained": total, "tracking_pending": str(hooks.pending or ""),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
