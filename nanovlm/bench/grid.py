"""Benchmark grids: every combination of a few config axes, measured through Ray Tune (one
trial per point, `max_concurrent` at a time), logged to MLflow, cached by config hash, tabulated and plotted
(`nanovlm bench grid FILE`). Not a sweep: a sweep (`nanovlm sweep`) searches config fields
for the best trial; a grid measures every combination.

A grid file (see `benchmarks/grids/shuffle.yaml`):

    name: bench_shuffle               # MLflow experiment and output folder (default: file stem)
    preset: tiny                      # base (VLMConfig, TrainConfig)
    overrides: {vit_img_size: 128}    # fixed for every point
    grid:                             # axes; the points are their cartesian product
      mp_pixel_shuffle_factor: [1, 2, 4]        # a config field and its values
      lm_size:                                  # a named axis: label -> overrides
        small: {lm_hidden_dim: 128, lm_n_blocks: 3}
        mid: {lm_hidden_dim: 256, lm_n_blocks: 6}
    measure:
      inference: {batch_size: 1, prompt_tokens: 32, new_tokens: 32}   # or null to skip
      training: {text_tokens: 32}     # batch size, dtype, compile, device: TrainConfig fields
      warmup: 1
      repeats: 3
      threads: 2                      # torch threads per trial (default: the trial's CPUs)
    resources: {cpu: 2, gpu: 0}       # per trial (point)
    max_concurrent: 1                 # points measured at once (default 1: no contention in the timings)
    plots:
      - {x: mp_pixel_shuffle_factor, y: infer_decode_tokens_per_s, series: lm_size}

Training batch size, dtype (`auto` = bf16 on CUDA, fp32 on CPU), `compile` and `device`
are the TrainConfig fields of the same names, so they can be axes too. A point is cached
under a hash of its full config, the measurement settings and the torch version; a re-run
measures only points without a cached result. The name, not the file's path, keys the output
folder and the MLflow experiment (`bench-<name>`): the shipped grids in benchmarks/grids/ set
`name: bench_<stem>`, and moving or renaming a file keeps its cache.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from nanovlm.config import (
    PRESETS, ConfigError, TrainConfig, VLMConfig, apply_overrides, configs_from_dict, configs_to_dict, owner_of,
    preset,
)

logger = logging.getLogger(__name__)

BENCH_VERSION = 1   # bump when a measurement's definition changes: old cache entries stop matching
TOP_LEVEL_KEYS = {"name", "preset", "overrides", "grid", "measure", "resources", "max_concurrent", "plots",
                  "output_dir"}
MEASURE_KEYS = {"inference", "training", "warmup", "repeats", "threads", "largest_batch"}
INFERENCE_KEYS = {"batch_size", "prompt_tokens", "new_tokens", "n_images", "image_size"}  # image_size: [h, w]
TRAINING_KEYS = {"text_tokens", "n_images", "image_size"}
DEFAULT_MEASURE: dict[str, Any] = {
    "inference": {"batch_size": 1, "prompt_tokens": 32, "new_tokens": 32, "n_images": 1},
    "training": {"text_tokens": 32, "n_images": 1},
    "warmup": 1, "repeats": 3, "threads": None, "largest_batch": False,
}


# ==================================================================== the grid file

@dataclass
class BenchGrid:
    name: str
    preset: str
    overrides: dict[str, Any]
    axes: list[tuple[str, list[tuple[str, dict[str, Any]]]]]  # axis -> [(label, overrides)]
    measure: dict[str, Any]
    resources: dict[str, float]
    plots: list[dict[str, str]] = field(default_factory=list)
    output_dir: str | None = None
    source: str = ""
    max_concurrent: int = 1


def _check_fields(where: str, overrides: dict[str, Any]) -> None:
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where} must be a mapping of config fields to values, got {overrides!r}.")
    for name in overrides:
        try:
            owner_of(name)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _unknown(where: str, keys: set, allowed: set) -> None:
    extra = set(keys) - allowed
    if extra:
        raise ConfigError(f"{where} has unknown keys {sorted(extra)}; allowed: {sorted(allowed)}.")


def parse_grid(data: dict[str, Any], name: str = "bench") -> BenchGrid:
    """Check a grid (as loaded from YAML) against the config dataclasses before anything runs."""
    if not isinstance(data, dict):
        raise ConfigError(f"A benchmark grid must be a YAML mapping, got {type(data).__name__}.")
    _unknown("The grid file", set(data), TOP_LEVEL_KEYS)
    base = data.get("preset", "tiny")
    if base not in PRESETS:
        raise ConfigError(f"preset={base!r} is not one of {sorted(PRESETS)}.")
    overrides = data.get("overrides") or {}
    _check_fields("overrides", overrides)
    axes = []
    for axis, values in (data.get("grid") or {}).items():
        if isinstance(values, list):
            _check_fields(f"grid axis {axis!r}", {axis: None})
            choices = [(str(v), {axis: v}) for v in values]
        elif isinstance(values, dict):
            choices = []
            for label, group in values.items():
                _check_fields(f"grid axis {axis!r} value {label!r}", group)
                choices.append((str(label), dict(group)))
        else:
            raise ConfigError(f"grid axis {axis!r} must be a list of values of that field, or a mapping "
                              f"label -> overrides; got {values!r}.")
        if not choices:
            raise ConfigError(f"grid axis {axis!r} has no values.")
        axes.append((axis, choices))
    measure = {**DEFAULT_MEASURE, **(data.get("measure") or {})}
    _unknown("measure", set(measure), MEASURE_KEYS)
    for part, allowed in (("inference", INFERENCE_KEYS), ("training", TRAINING_KEYS)):
        if measure[part] is not None:
            _unknown(f"measure.{part}", set(measure[part]), allowed)
            measure[part] = {**DEFAULT_MEASURE[part], **measure[part]}
    resources = {"cpu": float(min(2, os.cpu_count() or 1)), "gpu": 0.0, **(data.get("resources") or {})}
    _unknown("resources", set(resources), {"cpu", "gpu"})
    axis_names = {a for a, _ in axes}
    plots = list(data.get("plots") or [])
    for plot in plots:
        _unknown("a plot", set(plot), {"x", "y", "series"})
        for key in ("x", "series"):
            if plot.get(key) is not None and plot[key] not in axis_names:
                raise ConfigError(f"plot {key}={plot[key]!r} is not a grid axis; axes: {sorted(axis_names)}.")
        if "y" not in plot:
            raise ConfigError(f"plot {plot!r} needs a metric as y (e.g. infer_decode_tokens_per_s).")
    max_concurrent = data.get("max_concurrent", 1)
    if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
        raise ConfigError(f"max_concurrent={max_concurrent!r} must be a positive integer (points measured at once).")
    return BenchGrid(data.get("name", name), base, dict(overrides), axes, measure, resources, plots,
                     data.get("output_dir"), yaml.safe_dump(data, sort_keys=False), max_concurrent)


def load_grid(path: str | Path, overrides: list[str] | None = None) -> BenchGrid:
    """Read and check a grid file; `overrides` (`field=value`, e.g. from `--set`) win over
    the file's `overrides` and apply to every point."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Benchmark grid {path} does not exist (see benchmarks/grids/*.yaml).")
    try:
        with path.open() as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if overrides:
        from nanovlm.config import parse_overrides
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must be a YAML mapping.")
        data["overrides"] = {**(data.get("overrides") or {}), **parse_overrides(overrides)}
    return parse_grid(data, name=path.stem)


# ==================================================================== points

@dataclass
class Point:
    labels: dict[str, str]            # axis -> label
    config: dict[str, dict] | None    # configs_to_dict form; None if invalid
    error: str | None = None
    key: str = ""

    @property
    def title(self) -> str:
        return ",".join(f"{a}={v}" for a, v in self.labels.items()) or "base"


def point_key(config: dict[str, dict], measure: dict[str, Any]) -> str:
    """Hash of everything that determines a measurement: config, settings, torch version."""
    import torch

    payload = json.dumps({"config": config, "measure": measure, "torch": torch.__version__,
                          "version": BENCH_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def grid_points(grid: BenchGrid) -> list[Point]:
    points = []
    for combo in itertools.product(*[choices for _, choices in grid.axes]):
        labels = {axis: label for (axis, _), (label, _) in zip(grid.axes, combo)}
        changes = dict(grid.overrides)
        for _, group in combo:
            changes.update(group)
        try:
            vlm, train = preset(grid.preset)
            vlm, train = apply_overrides(vlm, train, changes)
            config = configs_to_dict(vlm.validate(), train.validate())
            points.append(Point(labels, config, key=point_key(config, grid.measure)))
        except ConfigError as exc:
            points.append(Point(labels, None, error=str(exc)))
    return points


# ==================================================================== one measurement

def resolve_device_dtype(train: TrainConfig) -> tuple[str, str]:
    import torch

    device = train.device if train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = train.dtype if train.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return device, dtype


def measure_point(config: dict[str, dict], measure: dict[str, Any]) -> dict[str, float]:
    """Build the point's model and measure it; plain-float metrics (static sizes included)."""
    import torch

    from nanovlm.models.flops import model_sizes
    from nanovlm.bench.harness import InferenceSpec, TrainSpec, benchmark

    vlm, train = configs_from_dict(config)
    if measure.get("threads"):
        torch.set_num_threads(int(measure["threads"]))
    device, dtype = resolve_device_dtype(train)
    infer = InferenceSpec(**measure["inference"]) if measure.get("inference") else None
    train_spec = (TrainSpec(batch_size=train.batch_size, **measure["training"])
                  if measure.get("training") else None)
    result = benchmark(vlm, device=device, dtype=dtype, compile=train.compile, infer=infer, train=train_spec,
                       warmup=measure["warmup"], repeats=measure["repeats"], peak_flops=train.peak_flops,
                       find_largest_batch=bool(measure.get("largest_batch")), seed=train.seed)
    text = (measure["training"] or {}).get("text_tokens") or (measure["inference"] or {}).get("prompt_tokens", 32)
    seq_len = text + vlm.mp_image_token_length
    sizes = model_sizes(vlm, seq_len=seq_len)
    static = {f"params_{k}": float(v) for k, v in sizes.params.items()}
    static.update(image_tokens_per_image=float(sizes.image_tokens_per_image),
                  flops_per_image=sizes.vision_flops_per_image + sizes.projector_flops_per_image,
                  decoder_flops_per_token=sizes.decoder_flops_per_token)
    return {**static, **result.metrics(), "torch_threads": float(torch.get_num_threads())}


def _tune_trainable(trial_config: dict[str, Any]) -> None:
    """A Ray Tune function trainable: measure one point, report its metrics once."""
    from ray import tune

    point = trial_config["point"]
    start = time.time()
    metrics = {**measure_point(point["config"], point["measure"]), "measure_wall_s": time.time() - start}
    context = tune.get_context()
    trial = {"trial_id": context.get_trial_id(), "started": start, "finished": time.time(),
             "resources": context.get_trial_resources().required_resources}
    # Written here as well as by the driver (if this node cannot reach the driver's directory), so an
    # interrupted grid keeps its finished points; with the trial that measured it.
    try:
        _write_cache(Path(point["out"]), point["key"], point["labels"], point["config"], point["measure"], metrics,
                     trial=trial)
    except OSError:
        pass
    tune.report({**metrics, "key": point["key"]})


# ==================================================================== the run

@dataclass
class GridRun:
    rows: list[dict[str, Any]]        # one per point: labels, status, metrics
    measured: list[str]               # keys measured in this call
    cached: list[str]                 # keys served from the cache
    output_dir: Path
    parent_run_id: str | None = None


def default_output_dir(name: str) -> Path:
    from nanovlm.tracking import nanovlm_home
    return nanovlm_home() / "bench" / name


def _cache_path(out: Path, key: str) -> Path:
    return out / "cache" / f"{key}.json"


def _write_cache(out: Path, key: str, labels: dict, config: dict, measure: dict, metrics: dict,
                 trial: dict[str, Any] | None = None) -> None:
    """trial: the Tune trial that measured the point, where known: trial_id, resources, and the
    measurement's start and end (Unix seconds)."""
    entry = {"labels": labels, "config": config, "measure": measure, "metrics": metrics,
             "host": platform.node(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if trial is not None:
        entry["trial"] = trial
    path = _cache_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry, indent=1, default=str))
    tmp.replace(path)   # atomic: a half-written file never counts as cached


def _measure_with_ray(grid: BenchGrid, todo: list[Point], out: Path) -> dict[str, dict[str, float]]:
    import ray
    from ray import tune

    from nanovlm.distributed.cluster import ensure_ray

    started = not ray.is_initialized()
    # A submitted job's cluster (RAY_ADDRESS), the latest `ray start`, or a private one on 127.0.0.1
    # (no dashboard: every trial runs to its end, nothing for the placement-group cleaner to free).
    ensure_ray(num_cpus=max(int(grid.resources["cpu"]), os.cpu_count() or 1), include_dashboard=False)
    try:
        resources = {"cpu": grid.resources["cpu"], "gpu": grid.resources.get("gpu", 0)}
        space = [{"config": p.config, "measure": grid.measure, "key": p.key, "labels": p.labels,
                  "out": str(out.resolve())} for p in todo]
        tuner = tune.Tuner(
            tune.with_resources(_tune_trainable, resources),
            param_space={"point": tune.grid_search(space)},
            # One trial at a time by default: concurrent trials contend for cores and memory bandwidth
            # and skew timings; parallel points suit sizes, memory and separate GPUs.
            tune_config=tune.TuneConfig(max_concurrent_trials=grid.max_concurrent,
                                        trial_dirname_creator=lambda trial: f"point_{trial.trial_id}"),
            run_config=tune.RunConfig(name=f"{grid.name}-{int(time.time())}",
                                      storage_path=str((out / "ray_results").resolve()), verbose=0),
        )
        results = tuner.fit()
        measured: dict[str, dict[str, float]] = {}
        for result in results:
            if result.error is not None:
                logger.error("Benchmark trial failed: %s", result.error)
                continue
            m = dict(result.metrics or {})
            key = m.pop("key", None)
            if key:
                measured[key] = {k: float(v) for k, v in m.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and k in _metric_names(m)}
        return measured
    finally:
        if started:
            ray.shutdown()


def _metric_names(metrics: dict[str, Any]) -> set[str]:
    # Tune adds bookkeeping (timestamps, iteration counters); keep what measure_point reported.
    skip = {"timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid", "time_since_restore",
            "iterations_since_restore", "done", "trial_id", "date", "hostname", "node_ip", "checkpoint_dir_name",
            "config"}
    return {k for k in metrics if k not in skip}


def _measure_locally(grid: BenchGrid, todo: list[Point], out: Path) -> dict[str, dict[str, float]]:
    measured = {}
    for p in todo:
        start = time.time()
        logger.info("Measuring %s", p.title)
        try:
            measured[p.key] = {**measure_point(p.config, grid.measure), "measure_wall_s": time.time() - start}
        except Exception as exc:  # noqa: BLE001 - one failing point must not lose the others
            logger.error("Benchmark point %s failed: %s: %s", p.title, type(exc).__name__, exc)
    return measured


def run_grid(grid: BenchGrid, output_dir: str | Path | None = None, executor: str = "ray",
             tracking: bool = True, tracking_uri: str | None = None,
             measure_fn: Callable[[BenchGrid, list[Point], Path], dict[str, dict[str, float]]] | None = None,
             ) -> GridRun:
    """Measure every point of `grid` not already cached, then write results.csv/.md and plots
    into `output_dir` (default `$NANOVLM_HOME/bench/<name>`, ~/.nanovlm/bench/<name>: the cache
    outlives a submitted job's working dir), logging new points and the tables to MLflow."""
    out = Path(output_dir or grid.output_dir or default_output_dir(grid.name)).expanduser()
    (out / "cache").mkdir(parents=True, exist_ok=True)
    points = grid_points(grid)
    for p in points:
        if p.error:
            logger.warning("Skipping invalid point %s: %s", p.title, p.error)
    valid = [p for p in points if p.config is not None]
    todo = [p for p in valid if not _cache_path(out, p.key).exists()]
    # Identical configs reached through different labels are measured once.
    unique_todo = list({p.key: p for p in todo}.values())
    logger.info("%d points: %d cached, %d to measure, %d invalid", len(points), len(valid) - len(todo),
                len(unique_todo), len(points) - len(valid))
    if measure_fn is None:
        measure_fn = {"ray": _measure_with_ray, "local": _measure_locally}.get(executor)
        if measure_fn is None:
            raise ValueError(f"executor={executor!r} must be 'ray' or 'local'.")
    measured = measure_fn(grid, unique_todo, out) if unique_todo else {}

    for p in unique_todo:
        if p.key in measured and not _cache_path(out, p.key).exists():  # kept: the trial's own entry
            _write_cache(out, p.key, p.labels, p.config, grid.measure, measured[p.key])

    rows = []
    for p in points:
        row: dict[str, Any] = dict(p.labels)
        if p.error:
            row.update(status="invalid", error=p.error.splitlines()[-1].strip())
        elif _cache_path(out, p.key).exists():
            row.update(status="ok", key=p.key, **json.loads(_cache_path(out, p.key).read_text())["metrics"])
        else:
            row.update(status="failed", key=p.key)
        rows.append(row)
    files = write_tables(rows, [a for a, _ in grid.axes], out)
    files += write_plots(rows, grid.plots, out)
    run = GridRun(rows, [k for k in measured], [p.key for p in valid if p not in todo], out)
    if tracking:
        run.parent_run_id = _log_to_mlflow(grid, points, measured, files, out, tracking_uri)
    return run


# ==================================================================== tables and plots

HEADLINE = ["params_total", "image_tokens_per_image", "infer_vision_encode_s", "infer_time_to_first_token_s",
            "infer_prefill_tokens_per_s", "infer_decode_tokens_per_s", "infer_end_to_end_s", "infer_peak_memory_mb",
            "train_step_time_s", "train_tokens_per_s", "train_samples_per_s", "train_flops_per_s", "train_mfu",
            "train_peak_memory_mb", "train_largest_batch"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


def write_tables(rows: list[dict[str, Any]], axes: list[str], out: Path) -> list[Path]:
    """results.csv (every column) and results.md (axes, status and the headline metrics)."""
    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = axes + ["status"] + [c for c in HEADLINE if c in columns]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in shown) + " |")
    md_path = out / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def write_plots(rows: list[dict[str, Any]], plots: list[dict[str, str]], out: Path) -> list[Path]:
    """One PNG per plot spec: metric `y` against axis `x`, one line per value of `series`."""
    if not plots:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    ok = [r for r in rows if r.get("status") == "ok"]
    for spec in plots:
        x, y, series = spec["x"], spec["y"], spec.get("series")
        fig, ax = plt.subplots(figsize=(6, 4))
        groups: dict[str, list[dict]] = {}
        for r in ok:
            if y in r:
                groups.setdefault(r[series] if series else y, []).append(r)
        for label, group in groups.items():
            xs = [g[x] for g in group]
            try:
                order = sorted(range(len(xs)), key=lambda i: float(xs[i]))
            except ValueError:
                order = list(range(len(xs)))
            ax.plot([xs[i] for i in order], [group[i][y] for i in order], marker="o", label=str(label))
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if series:
            ax.legend(title=series)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{y}_vs_{x}{'_by_' + series if series else ''}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    return files


# ==================================================================== MLflow

def _log_to_mlflow(grid: BenchGrid, points: list[Point], measured: dict[str, dict[str, float]],
                   files: list[Path], out: Path, uri: str | None) -> str | None:
    """A parent run per invocation (grid file, tables, plots) and a child run per newly
    measured point (params = config fields + axis labels, metrics = measurements). Fail-soft."""
    try:
        from nanovlm import tracking
    except ImportError:  # pragma: no cover - tracking lands with the Ray Train work
        logger.warning("nanovlm.tracking is not available; results are only in %s", out)
        return None
    try:
        uri = tracking.check_tracking_store(uri)
        base = configs_to_dict(*preset(grid.preset))
        tags = {"kind": "benchmark", "grid": grid.name, "git_commit": tracking.git_commit()}
        parent = tracking.create_run(base, uri=uri, experiment_name=f"bench-{grid.name}",
                                     run_name=f"{grid.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    except Exception as exc:  # noqa: BLE001 - results are on disk either way
        logger.warning("MLflow logging skipped (%s: %s); results are in %s", type(exc).__name__, exc, out)
        return None
    parent_run = tracking.TrackingRun(parent, uri)
    seen = set()
    for p in points:
        if p.config is None or p.key not in measured or p.key in seen:
            continue
        seen.add(p.key)
        try:
            child = tracking.create_run(p.config, uri=uri, experiment_name=f"bench-{grid.name}", run_name=p.title,
                                        tags={**tags, "point_key": p.key, **{f"axis.{a}": v for a, v in p.labels.items()}},
                                        parent_run_id=parent)
        except Exception as exc:  # noqa: BLE001
            logger.warning("MLflow child run for %s failed: %s", p.title, exc)
            continue
        run = tracking.TrackingRun(child, uri)
        run.log_metrics(measured[p.key], step=0)
        run.end()
    spec_path = out / "grid.yaml"
    spec_path.write_text(grid.source)
    for f in [spec_path, *files]:
        parent_run.log_artifact(f)
    parent_run.end()
    return parent
