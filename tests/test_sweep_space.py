"""Search-space files: parsing, checks before any trial, per-trial validation, results tables.
No Ray cluster is started here (see test_sweep.py for that)."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from nanovlm.config import ConfigError, configs_from_dict, preset
from nanovlm.sweep.results import TrialRecord, best_trial, format_markdown, rank_trials, write_results
from nanovlm.sweep.space import load_space, parse_space, trial_configs

REPO = Path(__file__).resolve().parents[1]


# The tests below rely on an 8x8 patch grid (64 px images, 8 px patches), pinned here so that
# they do not depend on the `tiny` preset's image size.
GRID_8X8 = {"vit_img_size": 64, "vit_patch_size": 8}


def _space(**extra):
    data = {"preset": "tiny", "overrides": dict(GRID_8X8), "space": {"lr_mp": {"loguniform": ["1e-4", "1e-2"]}}}
    extra_overrides = extra.pop("overrides", {})
    data.update(extra)
    data["overrides"].update(extra_overrides)
    return data


def test_every_shipped_space_file_parses():
    spaces = sorted((REPO / "tune").glob("*.yaml"))   # benchmark grids live in benchmarks/grids
    assert any(f.name == "demo.yaml" for f in spaces)
    for path in spaces:
        spec = load_space(path)
        assert spec.varied_fields, path


def test_unknown_field_in_space_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"mp_pixel_shufle_factor.*did you mean 'mp_pixel_shuffle_factor'"):
        parse_space(_space(space={"mp_pixel_shufle_factor": {"choice": [1, 2]}}))


def test_unknown_field_in_overrides_is_an_error():
    with pytest.raises(ConfigError, match="lm_n_block.*did you mean 'lm_n_blocks'"):
        parse_space(_space(overrides={"lm_n_block": 2}))


def test_unknown_field_in_set_is_an_error():
    with pytest.raises(ConfigError, match="batchsize"):
        parse_space(_space(), extra_overrides=["batchsize=4"])


def test_distribution_must_fit_the_field_type():
    with pytest.raises(ConfigError, match="lm_n_blocks holds int values; uniform applies to float"):
        parse_space(_space(space={"lm_n_blocks": {"uniform": [1, 4]}}))
    with pytest.raises(ConfigError, match="TrainConfig.batch_size='many' is not a valid int"):
        parse_space(_space(space={"batch_size": {"choice": [8, "many"]}}))


def test_unknown_distribution_and_bad_bounds_are_errors():
    with pytest.raises(ConfigError, match="unknown distribution 'normal'"):
        parse_space(_space(space={"lr_mp": {"normal": [0, 1]}}))
    with pytest.raises(ConfigError, match="needs low < high"):
        parse_space(_space(space={"lr_mp": {"uniform": [0.1, 0.01]}}))
    with pytest.raises(ConfigError, match="loguniform needs low > 0"):
        parse_space(_space(space={"lr_mp": {"loguniform": [0, 0.01]}}))
    with pytest.raises(ConfigError, match=r"qrandint takes \[low, high, q\]"):
        parse_space(_space(space={"batch_size": {"qrandint": [8, 64]}}))


def test_yaml_exponent_strings_are_read_as_numbers():
    # PyYAML reads `1e-4` (no dot) as a string; the space parser converts it with the field type.
    spec = parse_space(yaml.safe_load("preset: tiny\nspace:\n  lr_mp: {loguniform: [1e-4, 1e-2]}\n"))
    assert spec.space["lr_mp"].args == [1e-4, 1e-2]


def test_a_field_cannot_be_both_fixed_and_varied():
    with pytest.raises(ConfigError, match=r"\['lr_mp'\] are both fixed"):
        parse_space(_space(overrides={"lr_mp": 0.01}))


def test_resources_section_sets_workers_and_cpus():
    spec = parse_space(_space(resources={"workers_per_trial": 2, "cpus_per_worker": 0.4, "driver_cpus": 0.2}))
    _, train = spec.base_configs()
    assert (train.num_workers, train.cpus_per_worker, spec.driver_cpus) == (2, 0.4, 0.2)


def test_set_overrides_win_over_the_file():
    spec = parse_space(_space(overrides={"max_training_steps": 50}), extra_overrides=["max_training_steps=7"])
    assert spec.base_configs()[1].max_training_steps == 7


def test_asha_max_t_cannot_exceed_the_training_steps():
    with pytest.raises(ConfigError, match="max_t=500 steps exceeds max_training_steps=100"):
        parse_space(_space(overrides={"max_training_steps": 100},
                           scheduler={"type": "asha", "time_attr": "step", "max_t": 500, "grace_period": 10}))


def _pbt(**scheduler):
    return {"type": "pbt", "perturbation_interval": 50, **scheduler}


def test_pbt_mutates_the_spaces_learning_rates_by_default():
    spec = parse_space(_space(overrides={"max_training_steps": 200, "checkpoint_interval": 50},
                              space={"lr_mp": {"grid": [1.0e-4, 1.0e-3]}, "lr_language_backbone": {"grid": [1.0e-4]},
                                     "batch_size": {"choice": [8, 16]}},
                              scheduler=_pbt()))
    assert spec.scheduler.mutate == ["lr_mp", "lr_language_backbone"]


@pytest.mark.parametrize("changes, message", [
    ({"scheduler": _pbt(), "overrides": {"max_training_steps": 200, "checkpoint_interval": 100}},
     "checkpoint_interval=100 exceeds scheduler.perturbation_interval=50"),
    ({"scheduler": _pbt(), "overrides": {"max_training_steps": 50, "checkpoint_interval": 50}},
     "perturbation_interval=50 steps is not below max_training_steps=50"),
    ({"scheduler": _pbt(mutate=["mp_pixel_shuffle_factor"]),
      "space": {"lr_mp": {"grid": [1.0e-4, 1.0e-3]}, "mp_pixel_shuffle_factor": {"choice": [2, 4]}}},
     "a model field: a checkpoint cannot continue as another model"),
    ({"scheduler": _pbt(), "space": {"lr_mp": {"loguniform": [1.0e-4, 1.0e-2]}}},
     "needs a population of at least 2 trials"),
    ({"scheduler": _pbt(), "space": {"batch_size": {"grid": [8, 16]}}}, "the space varies none"),
    ({"scheduler": _pbt(max_t=10)}, r"unknown keys \['max_t'\]"),
    ({"search": "optuna", "space": {"lr_mp": {"grid": [1.0e-4, 1.0e-3]}}}, "instead of {grid: \\[...\\]}"),
    ({"search": "optuna", "scheduler": _pbt(), "space": {"lr_mp": {"choice": [1.0e-4, 1.0e-3]}}},
     "use it with search: random"),
    ({"search": {"type": "optuna", "startup_trials": 0}}, "startup_trials=0 must be a positive integer"),
    ({"search": "tpe"}, "search must be one of"),
])
def test_search_and_scheduler_combinations_that_cannot_work_are_refused(changes, message):
    data = _space(overrides={"max_training_steps": 200, "checkpoint_interval": 50},
                  space={"lr_mp": {"grid": [1.0e-4, 1.0e-3]}})
    data.update({k: v for k, v in changes.items() if k != "overrides"})
    data["overrides"].update(changes.get("overrides", {}))
    with pytest.raises(ConfigError, match=message):
        parse_space(data)


def test_pbt_on_object_storage_is_refused_before_ray_starts():
    from nanovlm.sweep.runner import run_sweep

    spec = parse_space(_space(overrides={"max_training_steps": 200, "checkpoint_interval": 50},
                              space={"lr_mp": {"grid": [1.0e-4, 1.0e-3]}}, scheduler=_pbt()))
    with pytest.raises(ConfigError, match="scheduler pbt hands checkpoints between trials by path.*s3://bucket/sweeps"):
        run_sweep(spec, storage_path="s3://bucket/sweeps", tracking_uri="sqlite:////nonexistent/mlflow.db")


def test_pbt_pauses_trials_to_share_slots_only_when_the_population_exceeds_them():
    from nanovlm.sweep.strategies import build_scheduler

    data = _space(overrides={"max_training_steps": 200, "checkpoint_interval": 50},
                  space={"lr_mp": {"grid": [1.0e-4, 1.0e-3]}}, scheduler=_pbt(), num_samples=2)
    assert build_scheduler(parse_space({**data, "max_concurrent_trials": 4})).time_share is False  # 2 x 2 trials
    assert build_scheduler(parse_space({**data, "max_concurrent_trials": 3})).time_share is True


def test_param_space_has_one_tune_domain_per_field():
    from ray import tune

    spec = parse_space(_space(space={"mp_pixel_shuffle_factor": {"grid": [1, 2]},
                                     "lr_mp": {"loguniform": [1e-4, 1e-2]},
                                     "batch_size": {"qrandint": [8, 32, 8]},
                                     "lm_n_blocks": {"randint": [1, 4]}}))
    space = spec.param_space()
    assert space["mp_pixel_shuffle_factor"] == {"grid_search": [1, 2]}
    assert isinstance(space["lr_mp"], tune.search.sample.Float)
    assert isinstance(space["batch_size"], tune.search.sample.Integer)
    assert isinstance(space["lm_n_blocks"], tune.search.sample.Integer)


def test_a_sampled_config_that_cannot_be_built_raises_with_the_reason():
    # tiny: 64 px / 8 px patches = 8x8 grid; a shuffle factor of 3 does not divide it.
    spec = parse_space(_space(space={"mp_pixel_shuffle_factor": {"choice": [2, 3]}}))
    with pytest.raises(ConfigError, match="mp_pixel_shuffle_factor=3 does not divide"):
        trial_configs(spec, {"mp_pixel_shuffle_factor": 3})


def test_a_sampled_config_follows_derived_sizes():
    spec = parse_space(_space(space={"mp_pixel_shuffle_factor": {"choice": [1, 4]}}))
    vlm, _ = trial_configs(spec, {"mp_pixel_shuffle_factor": 4})
    assert vlm.mp_image_token_length == 4  # (8 / 4) ** 2


# ------------------------------------------------------------------------- results

def _records():
    def hist(losses, step0=10):
        return [{"step": step0 * (i + 1), "val_loss": v, "tokens_per_second": 100.0 + i} for i, v in enumerate(losses)]

    return [
        TrialRecord("t1", {"mp_pixel_shuffle_factor": 2}, "completed", history=hist([2.0, 1.0]), wall_time_s=30),
        TrialRecord("t2", {"mp_pixel_shuffle_factor": 4}, "early-stopped", history=hist([1.5]), wall_time_s=12),
        TrialRecord("t3", {"mp_pixel_shuffle_factor": 3}, "invalid", reason="factor 3 does not divide 8"),
        TrialRecord("t0", {"mp_pixel_shuffle_factor": 1}, "completed", history=hist([3.0, 0.5]), wall_time_s=40),
    ]


def test_trials_are_ranked_by_final_metric_with_unscored_last():
    ranked = rank_trials(_records(), "val_loss", "min")
    assert [r.trial_id for r in ranked] == ["t0", "t1", "t2", "t3"]
    assert [r.trial_id for r in rank_trials(_records(), "val_loss", "max")][:3] == ["t2", "t1", "t0"]


def test_best_trial_prefers_completed_trials():
    assert best_trial(_records(), "val_loss", "min").trial_id == "t0"
    # max mode: the early-stopped t2 (1.5) ranks first, but the best completed trial is t1 (1.0).
    assert best_trial(_records(), "val_loss", "max").trial_id == "t1"


def test_write_results_produces_table_best_config_and_plots(tmp_path):
    spec = parse_space(_space(space={"mp_pixel_shuffle_factor": {"choice": [1, 2, 3, 4]}}))
    written = write_results(_records(), spec, tmp_path)
    rows = list(csv.DictReader(open(written["results.csv"])))
    assert [r["trial"] for r in rows] == ["t0", "t1", "t2", "t3"]
    assert rows[0]["mp_pixel_shuffle_factor"] == "1" and float(rows[0]["val_loss"]) == 0.5
    assert rows[3]["status"] == "invalid" and "does not divide" in rows[3]["reason"]
    md = written["results.md"].read_text()
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    # never-reported metrics (val_accuracy, loss here) get no column
    assert header == ["rank", "trial", "status", "mp_pixel_shuffle_factor", "val_loss", "tokens_per_second",
                      "steps", "wall_time_s", "reason"]
    vlm, train = configs_from_dict(json.loads(written["config.json"].read_text()))
    expected_vlm, _ = preset("tiny", **GRID_8X8, mp_pixel_shuffle_factor=1)
    assert vlm == expected_vlm and train.lr_mp == preset("tiny")[1].lr_mp
    for name in ("metric_vs_fields.png", "learning_curves.png"):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_throughput_column_is_the_median_over_reports():
    record = TrialRecord("t", {}, "completed", history=[{"step": i, "tokens_per_second": v}
                                                         for i, v in enumerate([10.0, 300.0, 100.0, 120.0])])
    assert record.median("tokens_per_second") == 110.0
    assert record.final("tokens_per_second") == 120.0


def test_markdown_table_keeps_reasons_on_one_line():
    md = format_markdown([{"trial": "t", "reason": "Invalid VLMConfig:\n  factor 3"}])
    assert md.splitlines()[2] == "| t     | Invalid VLMConfig: factor 3 |"
