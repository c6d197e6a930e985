"""Checkpoints hold everything a resumed run needs, and resuming continues the same trajectory."""

import random

import numpy as np
import pytest
import torch

from nanovlm.config import TrainConfig
from nanovlm.training import checkpointing
from nanovlm.training.optim import build_optimizer, build_scheduler
from nanovlm.training.sampling import ResumableBatchSampler
from training_configs import tiny_configs


class SavableModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_encoder = torch.nn.Linear(3, 3)
        self.MP = torch.nn.Linear(3, 3)
        self.decoder = torch.nn.Linear(3, 3)

    def save_pretrained(self, path, **card):
        torch.save(self.state_dict(), f"{path}/weights.pt")


def save(tmp_path, step, keep=None, model=None):
    model = model or SavableModel()
    cfg = TrainConfig(max_training_steps=10)
    opt = build_optimizer(model, cfg)
    return checkpointing.save_checkpoint(tmp_path, step, model, opt, build_scheduler(opt, cfg), cfg,
                                         {"batches_consumed": step}, keep=keep)


# ---------------------------------------------------------------------------- checkpoint files

def test_checkpoint_directory_holds_weights_state_and_config(tmp_path):
    path = save(tmp_path, 7)
    assert path == tmp_path / "checkpoints" / "step_000007"
    assert {p.name for p in path.iterdir()} == {"weights.pt", "train_state.pt", "train_config.json"}
    state = checkpointing.load_train_state(path)
    assert state["step"] == 7 and state["data_position"] == {"batches_consumed": 7}
    assert TrainConfig.from_json(path / "train_config.json").max_training_steps == 10


def test_failed_write_leaves_no_step_directory(tmp_path):
    class Broken(SavableModel):
        def save_pretrained(self, path, **card):
            raise OSError("disk full")

    save(tmp_path, 1)
    with pytest.raises(OSError):
        save(tmp_path, 2, model=Broken())
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]


def test_only_the_last_few_checkpoints_are_kept(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]


def test_resolve_accepts_a_run_dir_or_a_step_dir(tmp_path):
    save(tmp_path, 5)
    latest = save(tmp_path, 10)
    assert checkpointing.resolve_checkpoint(tmp_path) == latest
    assert checkpointing.resolve_checkpoint(latest) == latest
    with pytest.raises(FileNotFoundError, match="neither a training checkpoint"):
        checkpointing.resolve_checkpoint(tmp_path / "nowhere")


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    path = save(tmp_path, 1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    checkpointing.restore_rng_state(checkpointing.load_train_state(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---------------------------------------------------------------------------- data order

def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_started_at_a_position_continues_the_uninterrupted_order():
    full = take(ResumableBatchSampler(50, 4, seed=0), 30)  # 12 batches per epoch: crosses 2 epochs
    assert take(ResumableBatchSampler(50, 4, seed=0, start_batch=17), 13) == full[17:]


def test_each_epoch_is_a_fresh_permutation_and_ranks_do_not_overlap():
    ranks = [ResumableBatchSampler(40, 5, seed=3, rank=r, world_size=2) for r in (0, 1)]
    epoch0 = [sorted(i for b in take(s, 4) for i in b) for s in ranks]
    assert not set(epoch0[0]) & set(epoch0[1])
    assert sorted(epoch0[0] + epoch0[1]) == list(range(40))
    assert ranks[0].epoch_indices(0) != ranks[0].epoch_indices(1)


def test_sampler_refuses_a_dataset_smaller_than_a_batch():
    with pytest.raises(ValueError, match="batch_size=8"):
        ResumableBatchSampler(7, 8, seed=0)


# ---------------------------------------------------------------------------- end to end

class LossRecorder:
    def __init__(self):
        from nanovlm.training import TrainHooks
        self.losses = {}
        self.hooks = type("Recorder", (TrainHooks,), {"on_step": lambda _, step, m: self.losses.__setitem__(step, m["loss"])})()


@pytest.mark.parametrize("packing", [False, True])
def test_resumed_run_reproduces_the_uninterrupted_losses(tmp_path, packing):
    from nanovlm.training import train
    # dropout and gradient accumulation make the RNG state and the data position matter; packed
    # (2 rows of ~4 samples per batch), the 12 batches cross an epoch of 8
    changes = dict(max_training_steps=6, checkpoint_interval=3, eval_interval=3, gradient_accumulation_steps=2,
                   lm_dropout=0.1, vit_dropout=0.1, packing=packing, **({"batch_size": 2} if packing else {}))
    full = LossRecorder()
    train(*tiny_configs(tmp_path / "full", **changes), hooks=full.hooks)
    checkpoint = tmp_path / "full" / "checkpoints" / "step_000003"
    assert checkpointing.load_train_state(checkpoint)["data_position"]["batches_consumed"] == 6

    resumed = LossRecorder()
    summary = train(*tiny_configs(tmp_path / "resumed", **changes), hooks=resumed.hooks, resume_from=checkpoint)
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-6, abs=1e-7), step
    assert summary["steps"] == 6 and summary["resumed_from"] == str(checkpoint)
