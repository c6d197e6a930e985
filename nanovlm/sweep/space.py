"""Search spaces as YAML files: parse, check against the config dataclasses, turn into Tune domains.

A space file (see `tune/demo.yaml`, documented in `docs/sweeps.md`):

    name: demo                      # experiment name (default: the file's stem)
    preset: tiny                    # base (VLMConfig, TrainConfig)
    overrides: {max_training_steps: 300}      # fixed for every trial
    space:                          # the fields Tune varies
      mp_pixel_shuffle_factor: {grid: [1, 2, 4]}
      lr_mp: {loguniform: [1.0e-4, 1.0e-2]}
    metric: val_loss
    mode: min
    search: random                  # or optuna (TPE); strategies.py
    scheduler: {type: asha, time_attr: step, max_t: 300, grace_period: 100, reduction_factor: 2}   # or pbt, none
    num_samples: 1
    max_concurrent_trials: 2
    resources: {workers_per_trial: 1, cpus_per_worker: 0.4, driver_cpus: 0.2}
    time_budget_s: 540

Every field named under `overrides`, `space` and `resources` is checked here, before Ray
starts, with the same rules as `--set` (`nanovlm.config.owner_of`): an unknown name is a
`ConfigError` with a suggestion. A sampled combination that cannot be built (e.g. a shuffle
factor that does not divide the patch grid) is only known per trial; `trial_configs` raises
`ConfigError` for it and the runner records the trial as invalid.
"""

from __future__ import annotations

import itertools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nanovlm.config import (
    PRESETS, ConfigError, TrainConfig, VLMConfig, apply_overrides, owner_of, parse_override, parse_value, preset,
)
from nanovlm.sweep.strategies import Scheduler, Search, check_strategies, parse_scheduler, parse_search

# name -> (number of arguments, field types it applies to). `randint` follows Ray and numpy:
# [low, high) with high excluded; `qrandint` [low, high] with step q, high included.
DISTRIBUTIONS: dict[str, tuple[int | None, tuple[type, ...]]] = {
    "choice": (None, (int, float, bool, str)),
    "grid": (None, (int, float, bool, str)),
    "uniform": (2, (float,)),
    "loguniform": (2, (float,)),
    "randint": (2, (int,)),
    "qrandint": (3, (int,)),
}
# The `resources` section is shorthand for these TrainConfig fields; driver_cpus is the CPU
# share of the Tune trial that launches the TorchTrainer (Ray refuses 0).
RESOURCE_FIELDS = {"workers_per_trial": "num_workers", "cpus_per_worker": "cpus_per_worker",
                   "use_gpu": "use_gpu"}
TOP_LEVEL_KEYS = {"name", "preset", "overrides", "space", "metric", "mode", "search", "scheduler", "num_samples",
                  "max_concurrent_trials", "resources", "time_budget_s", "seed", "storage_path"}


@dataclass
class Distribution:
    kind: str                 # one of DISTRIBUTIONS
    args: list[Any]           # choice/grid: the values; others: bounds (and q)

    def to_tune(self) -> Any:
        from ray import tune  # imported here so that checking a file does not import Ray

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def describe(self) -> str:
        return f"{self.kind}({', '.join(repr(a) for a in self.args)})"


@dataclass
class SweepSpec:
    """A parsed, checked space file."""
    name: str
    preset: str
    overrides: dict[str, Any]
    space: dict[str, Distribution]
    metric: str = "val_loss"
    mode: str = "min"
    scheduler: Scheduler = field(default_factory=Scheduler)
    search: Search = field(default_factory=Search)
    num_samples: int = 1
    max_concurrent_trials: int = 2
    driver_cpus: float = 0.2
    time_budget_s: float | None = None
    seed: int | None = 0
    storage_path: str | None = None
    extra_overrides: list[str] = field(default_factory=list)  # --set items, kept for --resume
    source_path: str | None = None
    source_text: str | None = None

    def base_configs(self) -> tuple[VLMConfig, TrainConfig]:
        """The preset with the fixed overrides applied (not yet the sampled fields)."""
        vlm, train = preset(self.preset)
        return apply_overrides(vlm, train, self.overrides)

    def param_space(self) -> dict[str, Any]:
        """The Tune `param_space`: one domain per varied field, keyed by the field name."""
        return {name: dist.to_tune() for name, dist in self.space.items()}

    @property
    def varied_fields(self) -> list[str]:
        return list(self.space)


def trial_configs(spec: SweepSpec, sampled: dict[str, Any]) -> tuple[VLMConfig, TrainConfig]:
    """The validated configs of one trial; `ConfigError` (with the reason) if they cannot be built."""
    unknown = set(sampled) - set(spec.space)
    if unknown:
        raise ConfigError(f"Sampled values {sorted(unknown)} are not in the space {sorted(spec.space)}.")
    vlm, train = spec.base_configs()
    vlm, train = apply_overrides(vlm, train, dict(sampled))
    return vlm.validate(), train.validate()


def check_some_trial_is_valid(spec: SweepSpec, limit: int = 1000) -> None:
    """`ConfigError` when the space is finite (choice and grid only, at most `limit` combinations)
    and no combination of its values can be built: every trial would be invalid. Spaces with a
    continuous distribution are only known per trial (the sweep's outcome tells)."""
    if any(d.kind not in ("choice", "grid") for d in spec.space.values()):
        return
    names = list(spec.space)
    combinations = list(itertools.islice(itertools.product(*(spec.space[n].args for n in names)), limit + 1))
    if len(combinations) > limit:
        return
    examples: dict[str, list[dict[str, Any]]] = {}  # reason -> the combinations it rules out
    for values in combinations:
        sampled = dict(zip(names, values))
        try:
            trial_configs(spec, sampled)
            return
        except ConfigError as exc:
            examples.setdefault(" ".join(str(exc).split()).rstrip("."), []).append(sampled)
    shown = [f"{reason} ({len(found)} combination(s), e.g. {', '.join(f'{k}={v!r}' for k, v in found[0].items())})"
             for reason, found in list(examples.items())[:3]]
    more = f"; and {len(examples) - 3} other reason(s)" if len(examples) > 3 else ""
    raise ConfigError(f"{spec.source_path or spec.name}: none of the {len(combinations)} combinations of the space "
                      f"can be built, so every trial would be invalid: {'; '.join(shown)}{more}. Change the space "
                      "or the fixed overrides.")


def load_space(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read and check a space file; `overrides` (`field=value` strings, e.g. from `--set`) are
    added to the file's fixed overrides and win over them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Search space file {path} does not exist (see tune/*.yaml).")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    spec = parse_space(data, default_name=path.stem, where=str(path), extra_overrides=overrides)
    spec.source_path = str(path.resolve())
    spec.source_text = text
    return spec


def parse_space(data: Any, *, default_name: str = "sweep", where: str = "space",
                extra_overrides: list[str] | None = None) -> SweepSpec:
    """Build and check a `SweepSpec` from the plain dict of a space file."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a space file must be a mapping with at least a 'space' section.")
    unknown = set(data) - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown top-level keys {sorted(unknown)}; valid keys: {sorted(TOP_LEVEL_KEYS)}.")

    preset_name = data.get("preset", "tiny")
    if preset_name not in PRESETS:
        raise ConfigError(f"{where}: unknown preset {preset_name!r}; valid presets: {sorted(PRESETS)}.")

    overrides = dict(_mapping(data.get("overrides"), "overrides", where))
    for name in overrides:
        _check_field(name, f"{where}: overrides")
    resources = dict(_mapping(data.get("resources"), "resources", where))
    driver_cpus = float(resources.pop("driver_cpus", 0.2))
    for key, value in resources.items():
        if key not in RESOURCE_FIELDS:
            raise ConfigError(f"{where}: unknown resources key {key!r}; valid keys: "
                              f"{sorted(RESOURCE_FIELDS) + ['driver_cpus']}.")
        target = RESOURCE_FIELDS[key]
        if target in overrides:
            raise ConfigError(f"{where}: {target} is set both in overrides and as resources.{key}; keep one.")
        overrides[target] = value
    for item in extra_overrides or []:  # --set on the command line wins over the file
        name, value = parse_override(item)
        overrides[name] = value
    if driver_cpus <= 0:
        raise ConfigError(f"{where}: resources.driver_cpus={driver_cpus} must be positive (Ray refuses 0).")

    raw_space = _mapping(data.get("space"), "space", where)
    if not raw_space:
        raise ConfigError(f"{where}: 'space' is empty; name at least one config field to vary.")
    space = {name: _parse_distribution(name, spec, where) for name, spec in raw_space.items()}
    clash = set(space) & set(overrides)
    if clash:
        raise ConfigError(f"{where}: {sorted(clash)} are both fixed (overrides/resources/--set) and varied "
                          "(space); remove one.")

    mode = data.get("mode", "min")
    if mode not in ("min", "max"):
        raise ConfigError(f"{where}: mode={mode!r} must be 'min' or 'max'.")
    metric = data.get("metric", "val_loss")
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"{where}: metric must be a metric name such as val_loss, val_accuracy, "
                          "tokens_per_second.")

    scheduler = parse_scheduler(data.get("scheduler", {"type": "none"}), where)
    spec = SweepSpec(
        name=str(data.get("name", default_name)),
        preset=preset_name,
        overrides=overrides,
        space=space,
        metric=metric,
        mode=mode,
        scheduler=scheduler,
        search=parse_search(data.get("search"), where),
        num_samples=_positive_int(data.get("num_samples", 1), "num_samples", where),
        max_concurrent_trials=_positive_int(data.get("max_concurrent_trials", 2), "max_concurrent_trials", where),
        driver_cpus=driver_cpus,
        time_budget_s=_optional_positive(data.get("time_budget_s"), "time_budget_s", where),
        seed=data.get("seed", 0),
        storage_path=data.get("storage_path"),
        extra_overrides=list(extra_overrides or []),
    )
    # The fixed part must be buildable on its own: a broken base would make every trial invalid.
    try:
        vlm, train = spec.base_configs()
        train.validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: preset {preset_name!r} with the fixed overrides is invalid:\n{exc}") from None
    check_strategies(spec, train, where)
    return spec


# ------------------------------------------------------------------------- helpers

def _check_field(name: str, where: str) -> type:
    try:
        return owner_of(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _field_type(name: str) -> type:
    """The field's value type, `Optional[...]` unwrapped."""
    tp = typing.get_type_hints(owner_of(name))[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and args:
        tp = args[0]
    return typing.get_origin(tp) or tp


def _parse_distribution(name: str, spec: Any, where: str) -> Distribution:
    cls = _check_field(name, f"{where}: space")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: space.{name} must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}, "
                          f"e.g. {{choice: [1, 2]}}; got {spec!r}.")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: space.{name} uses unknown distribution {kind!r}; "
                          f"valid: {', '.join(DISTRIBUTIONS)}.")
    n_args, types_ok = DISTRIBUTIONS[kind]
    tp = _field_type(name)
    if tp not in types_ok:
        raise ConfigError(f"{where}: space.{name} holds {tp.__name__} values; {kind} applies to "
                          f"{'/'.join(t.__name__ for t in types_ok)} fields (use choice or grid).")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: space.{name}.{kind} needs a non-empty list, got {args!r}.")
    if n_args is not None and len(args) != n_args:
        shape = {"uniform": "[low, high]", "loguniform": "[low, high]", "randint": "[low, high)",
                 "qrandint": "[low, high, q]"}[kind]
        raise ConfigError(f"{where}: space.{name}.{kind} takes {shape}, got {args!r}.")
    # YAML 1.1 reads 1e-4 as a string: parse every value with the field's own parser.
    values = [parse_value(cls, name, v) if isinstance(v, str) and tp is not str else v for v in args]
    if kind in ("choice", "grid"):
        for value in values:  # type-check each value exactly as an override would be
            try:
                apply_overrides(VLMConfig(), TrainConfig(), {name: value})
            except ConfigError as exc:
                raise ConfigError(f"{where}: space.{name}.{kind}: {exc}") from None
        return Distribution(kind, values)
    if kind == "qrandint":
        low, high, q = (_as_int(v, name, kind, where) for v in values)
        if q <= 0:
            raise ConfigError(f"{where}: space.{name}.qrandint step q={q} must be positive.")
        values = [low, high, q]
    elif kind == "randint":
        values = [_as_int(v, name, kind, where) for v in values]
    else:
        values = [float(v) for v in values]
    low, high = values[0], values[1]
    if not low < high:
        raise ConfigError(f"{where}: space.{name}.{kind} needs low < high, got {values[:2]}.")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: space.{name}.loguniform needs low > 0, got {low}.")
    return Distribution(kind, values)


def _mapping(value: Any, key: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a mapping of field: value, got {type(value).__name__}.")
    return value


def _as_int(value: Any, name: str, kind: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ConfigError(f"{where}: space.{name}.{kind} bounds must be integers, got {value!r}.")
    return int(value)


def _positive_int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: {key}={value!r} must be a positive integer.")
    return value


def _optional_positive(value: Any, key: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: {key}={value!r} must be a positive number of seconds (or omitted).")
    return float(value)
