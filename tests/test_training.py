"""The training loop end to end on a tiny model: it learns, freezes, stops on NaN, reports and
writes summary.json."""

import json
import math
import os
import platform

import pytest
import torch

from nanovlm.models import VisionLanguageModel
from nanovlm.training import NonFiniteLossError, TrainHooks, train
from nanovlm.training.checkpointing import list_checkpoints, load_train_state
from nanovlm.training.loop import keep_freed_memory
from training_configs import tiny_configs

STEP_KEYS = {"loss", "lr_mp", "lr_vision_backbone", "lr_language_backbone", "grad_norm", "tokens_per_second",
             "samples_per_second", "images_per_second", "step_time", "data_wait", "mfu", "peak_memory_mb",
             "padding_fraction"}


class Recorder(TrainHooks):
    def __init__(self):
        self.steps, self.evals, self.checkpoints, self.ends = {}, {}, [], []
        self.model = None

    def wrap_model(self, model):
        self.model = model
        self.initial = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    def on_step(self, step, metrics):
        self.steps[step] = metrics

    def on_eval(self, step, metrics):
        self.evals[step] = metrics

    def on_checkpoint(self, step, checkpoint_dir, metrics):
        self.checkpoints.append((step, checkpoint_dir))

    def on_end(self, summary):
        self.ends.append(summary)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """5 steps, accumulation 2, eval every 2 steps, checkpoint every 2 steps (keep 2)."""
    out = tmp_path_factory.mktemp("run")
    hooks = Recorder()
    vlm_cfg, train_cfg = tiny_configs(out, max_training_steps=5, eval_interval=2, checkpoint_interval=2,
                                      gradient_accumulation_steps=2, checkpoints_to_keep=2)
    summary = train(vlm_cfg, train_cfg, hooks=hooks)
    return out, hooks, summary, vlm_cfg, train_cfg


def test_loss_falls_within_tens_of_steps(tmp_path):
    hooks = Recorder()
    train(*tiny_configs(tmp_path, max_training_steps=30, batch_size=8, shapes_question_types="colour",
                        lr_mp=3e-3, lr_vision_backbone=3e-3, lr_language_backbone=3e-3, warmup_ratio=0.1),
          hooks=hooks)
    losses = [hooks.steps[s]["loss"] for s in sorted(hooks.steps)]
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_every_step_reports_the_documented_metrics_as_plain_floats(short_run):
    _, hooks, *_ = short_run
    assert sorted(hooks.steps) == [1, 2, 3, 4, 5]
    for metrics in hooks.steps.values():
        assert STEP_KEYS <= metrics.keys()
        assert all(type(v) is float and math.isfinite(v) for v in metrics.values())
        assert 0 < metrics["mfu"] < 1 and metrics["samples_per_second"] > 0


def test_eval_runs_at_the_interval_and_at_the_end(short_run):
    _, hooks, *_ = short_run
    assert sorted(hooks.evals) == [2, 4, 5]
    final = hooks.evals[5]
    assert {"val_loss", "val_accuracy"} <= final.keys()
    assert any(k.startswith("val_accuracy_") for k in final)


def test_checkpoints_at_the_interval_and_at_the_end_keeping_the_last_two(short_run):
    out, hooks, *_ = short_run
    assert [s for s, _ in hooks.checkpoints] == [2, 4, 5]
    assert [p.name for p in list_checkpoints(out)] == ["step_000004", "step_000005"]
    state = load_train_state(out / "checkpoints" / "step_000005")
    assert state["step"] == 5
    assert state["data_position"]["batches_consumed"] == 10  # 5 steps x 2 micro-batches


def test_final_checkpoint_loads_as_the_trained_model(short_run):
    out, hooks, *_ = short_run
    loaded = VisionLanguageModel.from_pretrained(out / "checkpoints" / "step_000005")
    for name, tensor in hooks.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_summary_json_holds_final_metrics_chance_and_config(short_run):
    out, hooks, summary, vlm_cfg, train_cfg = short_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert hooks.ends == [summary]
    assert on_disk["steps"] == 5
    assert on_disk["val_loss"] == pytest.approx(hooks.evals[5]["val_loss"])
    assert on_disk["val_accuracy"] == hooks.evals[5]["val_accuracy"]
    for key in ("tokens_per_second", "wall_time_s", "train_loss"):
        assert on_disk[key] > 0
    assert {k.removeprefix("val_accuracy_") for k in on_disk if k.startswith("val_accuracy_")} <= \
        set(on_disk["chance"])
    assert on_disk["config"] == {"vlm": vlm_cfg.to_dict(), "train": train_cfg.to_dict()}


def test_zero_lr_leaves_that_part_bit_identical(tmp_path):
    hooks = Recorder()
    train(*tiny_configs(tmp_path, max_training_steps=3, lr_vision_backbone=0.0, weight_decay=0.1,
                        warmup_ratio=0.0), hooks=hooks)
    final = hooks.model.state_dict()
    vision = [k for k in final if k.startswith("vision_encoder.")]
    assert vision and all(torch.equal(final[k], hooks.initial[k]) for k in vision)
    assert not all(torch.equal(final[k], hooks.initial[k]) for k in final if k.startswith("decoder."))


class PoisonAfter(Recorder):
    """Sets one weight to NaN after `step`, so the next step's loss is NaN."""

    def __init__(self, step):
        super().__init__()
        self.poison_step = step

    def on_step(self, step, metrics):
        super().on_step(step, metrics)
        if step == self.poison_step:
            with torch.no_grad():
                next(self.model.decoder.parameters()).view(-1)[0] = float("nan")


def test_nan_loss_stops_naming_step_and_batch_and_keeps_the_last_good_checkpoint(tmp_path):
    hooks = PoisonAfter(3)
    vlm_cfg, train_cfg = tiny_configs(tmp_path, max_training_steps=10, checkpoint_interval=2)
    with pytest.raises(NonFiniteLossError, match=r"step 4.*batch 3 of the epoch") as error:
        train(vlm_cfg, train_cfg, hooks=hooks)
    assert "step_000002" in str(error.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"]
    good = VisionLanguageModel.from_pretrained(tmp_path / "checkpoints" / "step_000002")
    assert all(torch.isfinite(p).all() for p in good.parameters())
    assert not (tmp_path / "summary.json").exists()


# ---------------------------------------------------------------------------- metrics

def test_step_metrics_are_rates_over_the_step_time():
    from nanovlm.training.metrics import step_metrics
    m = step_metrics(loss=2.0, lrs={"lr_mp": 1e-3}, grad_norm=0.5, step_time=2.0, data_wait=0.1,
                     local_tokens=1000, local_samples=10, local_images=20, local_flops=4e9, peak_flops=1e10,
                     device=torch.device("cpu"), local_positions=1250)
    assert m["tokens_per_second"] == m["tokens_per_second_per_worker"] == 500.0   # real tokens only
    assert m["padding_fraction"] == 0.2
    assert m["samples_per_second"] == 5.0 and m["images_per_second"] == 10.0
    assert m["mfu"] == pytest.approx(4e9 / (2.0 * 1e10))
    assert m["peak_memory_mb"] > 0


def test_measuring_the_peak_does_not_move_the_global_rng():
    from nanovlm.training import metrics
    metrics._PEAK_CACHE.clear()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert metrics.measured_peak_flops(torch.device("cpu"), torch.float32) > 0
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_cpu_training_keeps_freed_memory_unless_malloc_is_configured(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    for key in [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(key)
    assert keep_freed_memory()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")     # the user's own setting wins
    assert not keep_freed_memory()
