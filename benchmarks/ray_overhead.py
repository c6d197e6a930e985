"""Ray Train overhead: tokens/s of a 1-worker Ray Train run divided by the bare loop, same config, one process.

    python benchmarks/ray_overhead.py [--preset tiny] [--steps 60] [--warmup 10] [--threads N] [--gpu] [--set f=v ...]

Both runs train the same config for `--steps` steps. Throughput is measured on the wall clock
between the end of step `warmup` and the end of the last step, so it includes everything the
Ray path adds per step (report barriers, the MLflow logging of rank 0, the DDP wrapper, the
reduction of the loss) and excludes start-up (cluster, worker group, dataset, first steps).
The bare loop gets the same CPU budget as the Ray worker (`cpus_per_worker` = torch's threads =
`--threads`, by default all cores but one: Ray's own ~10 processes wake often and, with every core
training, preempt the training threads; on 2 cores that cost ~12% of the compute rate).

Bare-loop step ends come from a hook; Ray step ends come from the timestamps MLflow stores with
each step's metrics (logged in `on_step`, before the report). The bare loop runs before and after
the Ray run and the two rates are averaged, so a change in machine load biases neither side.
`*_compute_tokens_per_second` count only the loop's own step time (forward, backward, optimizer):
the gap between them and the wall rates is what the hooks and reports cost. Prints one JSON line.

Ray Train's controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s) and takes a
worker's next report only after reading the previous one. The worker reports on a thread of its
own (skipping metric-only reports while one waits), so the poll interval no longer stalls the
loop; `ray_wall_over_compute` near 1 shows it. The clusters that `nanovlm train` starts poll
every 0.5 s, and so does this benchmark unless RAY_TRAIN_HEALTH_CHECK_INTERVAL_S is set.
Rates drift with machine load: on a shared machine run it more than once and compare the two
`bare_runs_tokens_per_second` (far apart: the load changed during the run; discard it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanovlm import tracking  # noqa: E402
from nanovlm.config import apply_overrides, preset  # noqa: E402
from nanovlm.training import TrainHooks, train  # noqa: E402


class StepClock(TrainHooks):
    def __init__(self):
        self.ends: dict[int, float] = {}
        self.tokens: dict[int, float] = {}
        self.step_time: dict[int, float] = {}

    def on_step(self, step, metrics):
        self.ends[step] = time.time()
        self.tokens[step] = metrics["tokens_per_second"] * metrics["step_time"]
        self.step_time[step] = metrics["step_time"]


def rate(ends: dict[int, float], tokens: dict[int, float], warmup: int) -> float:
    """Tokens of steps warmup+1..last over the wall time from the end of step warmup to the end of the last."""
    last = max(ends)
    if warmup >= last:
        raise SystemExit(f"--warmup {warmup} must be smaller than --steps {last}.")
    counted = sum(tokens[s] for s in range(warmup + 1, last + 1))
    return counted / (ends[last] - ends[warmup])


def compute_rate(step_time: dict[int, float], tokens: dict[int, float], warmup: int) -> float:
    steps = [s for s in step_time if s > warmup]
    return sum(tokens[s] for s in steps) / sum(step_time[s] for s in steps)


def bare_run(vlm, train_cfg, output_dir: Path, warmup: int) -> tuple[float, float]:
    clock = StepClock()
    train(vlm, train_cfg.replace(output_dir=str(output_dir)), hooks=clock)
    return rate(clock.ends, clock.tokens, warmup), compute_rate(clock.step_time, clock.tokens, warmup)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the measurement")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch threads of both runs = the worker's cpus_per_worker (default: all cores "
                             "but one, which Ray's own processes need; with every core training they preempt "
                             "it: 0.83-0.86 instead of 0.96-0.97 on 2 cores)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    vlm, train_cfg = preset(args.preset)
    vlm, train_cfg = apply_overrides(vlm, train_cfg, [
        f"max_training_steps={args.steps}", f"eval_interval={10 * args.steps}", "eval_samples=8",
        f"checkpoint_interval={10 * args.steps}", "shapes_eval_size=8", "shapes_train_size=4096", "num_workers=1",
        f"cpus_per_worker={threads}", f"use_gpu={args.gpu}", "experiment_name=ray-overhead",
        *args.overrides])

    # --- bare loop, in this process (again after the Ray run)
    bare_before = bare_run(vlm, train_cfg, work / "bare1", args.warmup)

    # --- one Ray Train worker, tracked like a real run
    import ray

    from nanovlm.distributed import ensure_ray, run_training

    uri = f"sqlite:///{work / 'mlflow.db'}"
    # A private cluster as `nanovlm train` starts one (same controller poll interval), without the dashboard.
    ensure_ray("local", num_cpus=max(threads, 1), num_gpus=1 if args.gpu else 0, include_dashboard=False,
               temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    start = time.time()
    summary = run_training(vlm, train_cfg.replace(output_dir=str(work / "ray"), storage_path=str(work / "results")),
                           preset_name=args.preset, run_name="overhead", tracking_uri=uri)
    ray_wall = time.time() - start
    ray.shutdown()
    client = tracking._client(uri)
    run_id = summary["mlflow_run_id"]
    ends = {m.step: m.timestamp / 1000 for m in client.get_metric_history(run_id, "step_time")}
    steps = {m.step: m.value for m in client.get_metric_history(run_id, "step_time")}
    tps = {m.step: m.value for m in client.get_metric_history(run_id, "tokens_per_second")}
    tokens = {s: tps[s] * steps[s] for s in ends}
    ray_rate = rate(ends, tokens, args.warmup)
    ray_compute = compute_rate(steps, tokens, args.warmup)
    bare_after = bare_run(vlm, train_cfg, work / "bare2", args.warmup)
    bare = (bare_before[0] + bare_after[0]) / 2
    bare_compute = (bare_before[1] + bare_after[1]) / 2

    print(json.dumps({
        "preset": args.preset, "steps": args.steps, "warmup_steps": args.warmup, "threads": threads,
        "device": "cuda" if args.gpu else "cpu",
        "bare_tokens_per_second": round(bare, 1), "ray_tokens_per_second": round(ray_rate, 1),
        "ratio_ray_over_bare": round(ray_rate / bare, 3),
        "bare_runs_tokens_per_second": [round(bare_before[0], 1), round(bare_after[0], 1)],
        "bare_compute_tokens_per_second": round(bare_compute, 1),
        "ray_compute_tokens_per_second": round(ray_compute, 1),
        # within the one Ray run, so immune to load drift: what hooks, reports and logging cost per step
        "ray_wall_over_compute": round(ray_rate / ray_compute, 3),
        "ray_wall_time_s_including_start_up": round(ray_wall, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
