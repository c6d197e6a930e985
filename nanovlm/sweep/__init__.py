"""Ray Tune sweeps over VLMConfig/TrainConfig fields: YAML search spaces (`space`), the Tune
run with one Ray Train run per trial and MLflow child runs (`runner`), and the results
table, best config and plots (`results`)."""

from nanovlm.sweep.space import SweepSpec, load_space, parse_space, trial_configs

__all__ = ["SweepSpec", "load_space", "parse_space", "trial_configs"]
