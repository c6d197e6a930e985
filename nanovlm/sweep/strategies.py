"""How a sweep picks and schedules its trials: the `search` and `scheduler` sections of a space
file, checked before Ray starts and turned into Tune's objects.

    search:    random (default)  every `grid` value, the other fields sampled (Tune's variant generator)
               optuna            TPE (optuna's sampler) over every field; `choice`, not `grid`
    scheduler: none              every trial runs to its end
               asha              stops the weaker trials at rungs of `time_attr`
               pbt               population based training: every `perturbation_interval` steps the
                                 weaker trials continue from a stronger trial's checkpoint with
                                 mutated learning rates (`mutate`)

How PBT moves a checkpoint between two TorchTrainer runs: `nanovlm.sweep.pbt`.
"""

from __future__ import annotations

import importlib.util
import math
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nanovlm.config import ConfigError, TrainConfig, owner_of

if TYPE_CHECKING:  # space.py imports this module
    from nanovlm.sweep.space import SweepSpec

SEARCHES = ("random", "optuna")
SCHEDULERS = ("asha", "pbt", "none")
TIME_ATTRS = ("step", "training_iteration", "time_total_s")
# The keys each scheduler type takes (besides `type`).
SCHEDULER_KEYS = {
    "none": set(),
    "asha": {"time_attr", "max_t", "grace_period", "reduction_factor"},
    "pbt": {"time_attr", "perturbation_interval", "mutate", "quantile_fraction", "resample_probability"},
}
SEARCH_KEYS = {"random": set(), "optuna": {"startup_trials"}}
LR_PREFIX = "lr_"


@dataclass
class Scheduler:
    type: str = "asha"
    time_attr: str = "step"
    # asha
    max_t: int = 100
    grace_period: int = 10
    reduction_factor: float = 2.0
    # pbt
    perturbation_interval: int = 0             # steps (time_attr units) between exploit/explore decisions
    mutate: list[str] = field(default_factory=list)  # fields PBT mutates; default the space's lr_* fields
    quantile_fraction: float = 0.25            # the bottom fraction copies the top fraction
    resample_probability: float = 0.25         # a mutation resamples from the space (else x0.8 or x1.2)

    def to_dict(self) -> dict[str, Any]:
        """The keys of this type, as a space file writes them."""
        return {"type": self.type, **{k: getattr(self, k) for k in sorted(SCHEDULER_KEYS[self.type])}}


@dataclass
class Search:
    type: str = "random"
    startup_trials: int = 10                   # optuna: random trials before TPE models the results

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **{k: getattr(self, k) for k in sorted(SEARCH_KEYS[self.type])}}


# ==================================================================== parsing

def parse_search(data: Any, where: str) -> Search:
    if data is None:
        return Search()
    if isinstance(data, str):
        data = {"type": data}
    if not isinstance(data, dict) or data.get("type") not in SEARCHES:
        raise ConfigError(f"{where}: search must be one of {SEARCHES} (or a mapping with such a type), got {data!r}.")
    _check_keys(data, SEARCH_KEYS[data["type"]], f"{where}: search ({data['type']})")
    search = Search(**data)
    if search.type == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise ConfigError(f"{where}: search: optuna needs the optuna package: pip install 'nanovlm-ray[optuna]'.")
        if isinstance(search.startup_trials, bool) or not isinstance(search.startup_trials, int) \
                or search.startup_trials < 1:
            raise ConfigError(f"{where}: search.startup_trials={search.startup_trials!r} must be a positive integer.")
    return search


def parse_scheduler(data: Any, where: str) -> Scheduler:
    if data is None or data == "none":
        return Scheduler(type="none")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: scheduler must be a mapping such as {{type: asha, max_t: 300}} or 'none'.")
    kind = data.get("type", "asha")
    if kind not in SCHEDULERS:
        raise ConfigError(f"{where}: scheduler.type={kind!r} must be one of {SCHEDULERS}.")
    _check_keys(data, SCHEDULER_KEYS[kind], f"{where}: scheduler ({kind})")
    sched = Scheduler(**data)
    if sched.time_attr not in TIME_ATTRS:
        raise ConfigError(f"{where}: scheduler.time_attr={sched.time_attr!r} must be one of {TIME_ATTRS}.")
    if sched.type == "asha":
        if not 0 < sched.grace_period <= sched.max_t:
            raise ConfigError(f"{where}: scheduler needs 0 < grace_period <= max_t, got grace_period="
                              f"{sched.grace_period}, max_t={sched.max_t}.")
        if sched.reduction_factor <= 1:
            raise ConfigError(f"{where}: scheduler.reduction_factor={sched.reduction_factor} must be > 1.")
    if sched.type == "pbt":
        if isinstance(sched.perturbation_interval, bool) or not isinstance(sched.perturbation_interval, int) \
                or sched.perturbation_interval <= 0:
            raise ConfigError(f"{where}: scheduler.perturbation_interval={sched.perturbation_interval!r} must be a "
                              f"positive number of {sched.time_attr} units (PBT needs it).")
        if not isinstance(sched.mutate, list) or not all(isinstance(m, str) for m in sched.mutate):
            raise ConfigError(f"{where}: scheduler.mutate must be a list of field names, got {sched.mutate!r}.")
        if not 0 < sched.quantile_fraction <= 0.5:
            raise ConfigError(f"{where}: scheduler.quantile_fraction={sched.quantile_fraction} must be in (0, 0.5].")
        if not 0 <= sched.resample_probability <= 1:
            raise ConfigError(f"{where}: scheduler.resample_probability={sched.resample_probability} must be in [0, 1].")
    return sched


def check_strategies(spec: "SweepSpec", train: TrainConfig, where: str) -> None:
    """Checks that need the whole spec and the base TrainConfig; fills PBT's default `mutate`."""
    sched, search = spec.scheduler, spec.search
    if sched.type == "asha" and sched.time_attr == "step" and sched.max_t > train.max_training_steps:
        raise ConfigError(f"{where}: scheduler.max_t={sched.max_t} steps exceeds max_training_steps="
                          f"{train.max_training_steps}; lower max_t or raise max_training_steps.")
    if search.type == "optuna":
        grids = [name for name, d in spec.space.items() if d.kind == "grid"]
        if grids:
            raise ConfigError(f"{where}: search: optuna samples every field itself; write {grids} as "
                              "{choice: [...]} instead of {grid: [...]}.")
        if sched.type == "pbt":
            raise ConfigError(f"{where}: scheduler pbt mutates the configs itself; use it with search: random.")
    if sched.type == "pbt":
        _check_pbt(spec, train, where)


def _check_pbt(spec: "SweepSpec", train: TrainConfig, where: str) -> None:
    sched = spec.scheduler
    if not sched.mutate:
        sched.mutate = [name for name in spec.space if name.startswith(LR_PREFIX)]
        if not sched.mutate:
            raise ConfigError(f"{where}: scheduler pbt mutates learning rates, and the space varies none; add "
                              "lr_mp, lr_vision_backbone or lr_language_backbone to it (or list fields in mutate).")
    for name in sched.mutate:
        if name not in spec.space:
            raise ConfigError(f"{where}: scheduler.mutate names {name!r}, which the space does not vary; "
                              f"varied: {sorted(spec.space)}.")
        if owner_of(name) is not TrainConfig:
            raise ConfigError(f"{where}: scheduler.mutate names {name!r}, a model field: a checkpoint cannot "
                              "continue as another model. Mutate TrainConfig fields (learning rates).")
        if typing.get_type_hints(TrainConfig)[name] is not float:
            raise ConfigError(f"{where}: scheduler.mutate names {name!r}, which is not a float field; PBT scales "
                              "the values it mutates (learning rates, weight_decay, ...).")
        dist = spec.space[name]
        values = dist.args if dist.kind in ("choice", "grid") else dist.args[:1]
        if name.startswith(LR_PREFIX) and any(v <= 0 for v in values):
            raise ConfigError(f"{where}: space.{name} reaches 0 or below; PBT needs positive learning rates "
                              "(0 freezes a part, and a checkpoint with it frozen cannot continue with it trained).")
    if sched.time_attr == "step":
        if sched.perturbation_interval >= train.max_training_steps:
            raise ConfigError(f"{where}: scheduler.perturbation_interval={sched.perturbation_interval} steps is not "
                              f"below max_training_steps={train.max_training_steps}: PBT would never act.")
        if train.checkpoint_interval > sched.perturbation_interval:
            raise ConfigError(f"{where}: checkpoint_interval={train.checkpoint_interval} exceeds scheduler."
                              f"perturbation_interval={sched.perturbation_interval}: PBT copies checkpoints, so a "
                              "trial needs one every interval. Lower checkpoint_interval (a divisor of it is best).")
    if population(spec) < 2:
        raise ConfigError(f"{where}: scheduler pbt needs a population of at least 2 trials (num_samples x grid "
                          f"values), got {population(spec)}.")


def _check_keys(data: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(data) - allowed - {"type"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(allowed | {'type'})}.")


# ==================================================================== Tune objects

def build_search(spec: "SweepSpec"):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.search.type == "optuna":
        import optuna

        from nanovlm.sweep.optuna_search import EvaluatedOptunaSearch

        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.search.startup_trials)
        searcher = EvaluatedOptunaSearch(metric=spec.metric, mode=spec.mode, sampler=sampler)
        return ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent_trials)
    # Tune ignores TuneConfig.max_concurrent_trials for a generator passed in: limit it here.
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent_trials)


def population(spec: "SweepSpec") -> int:
    """Trials a random-search sweep runs: `num_samples` x the product of the grid fields' sizes."""
    return spec.num_samples * math.prod(len(d.args) for d in spec.space.values() if d.kind == "grid")


def build_scheduler(spec: "SweepSpec"):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sched = spec.scheduler
    if sched.type == "asha":
        return ASHAScheduler(time_attr=sched.time_attr, metric=spec.metric, mode=spec.mode, max_t=sched.max_t,
                             grace_period=sched.grace_period, reduction_factor=sched.reduction_factor)
    if sched.type == "pbt":
        from nanovlm.sweep.pbt import ExploitOnlyPBT

        # Domains, grid and choice values too: PBT scales a value by 0.8 or 1.2, or resamples it
        # (a plain list would only step between the listed values).
        mutations = {name: (tune.choice(list(spec.space[name].args)) if spec.space[name].kind in ("choice", "grid")
                            else spec.space[name].to_tune()) for name in sched.mutate}
        # require_attrs=False: most reports carry the step's metrics only; PBT acts on those with the metric.
        return ExploitOnlyPBT(
            time_share=population(spec) > spec.max_concurrent_trials,
            time_attr=sched.time_attr, metric=spec.metric, mode=spec.mode,
            perturbation_interval=sched.perturbation_interval, hyperparam_mutations=mutations,
            quantile_fraction=sched.quantile_fraction, resample_probability=sched.resample_probability,
            require_attrs=False)
    return FIFOScheduler()
