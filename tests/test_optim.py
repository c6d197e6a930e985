"""Param groups per VLM part, freezing by lr 0, and the warm-up + cosine schedule."""

import math

import pytest
import torch

from nanovlm.config import TrainConfig
from nanovlm.training.optim import PARTS, adamw, build_optimizer, build_scheduler, current_lrs, lr_multiplier


class ThreePartModel(torch.nn.Module):
    """Stands in for VisionLanguageModel: the three submodules the optimizer knows."""

    def __init__(self):
        super().__init__()
        self.vision_encoder = torch.nn.Linear(4, 4)
        self.MP = torch.nn.Linear(4, 4)
        self.decoder = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))

    def forward(self, x):
        return self.decoder(self.MP(self.vision_encoder(x)))


def cfg(**changes) -> TrainConfig:
    base = dict(lr_mp=1e-2, lr_vision_backbone=1e-3, lr_language_backbone=1e-4, weight_decay=0.1,
                max_training_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    base.update(changes)
    return TrainConfig(**base)


def reference_schedule(step, max_steps, warmup, min_ratio):
    # written independently of the implementation: piecewise definition from the docs
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / (max_steps - warmup)
    return min_ratio + 0.5 * (1 - min_ratio) * (1 + math.cos(math.pi * t))


def test_each_part_gets_its_own_learning_rate():
    opt = build_optimizer(ThreePartModel(), cfg())
    by_part = {g["part"]: g["lr"] for g in opt.param_groups}
    assert by_part == {"MP": 1e-2, "vision_encoder": 1e-3, "decoder": 1e-4}


def test_matrices_decay_and_biases_and_norms_do_not():
    model = ThreePartModel()
    opt = build_optimizer(model, cfg())
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay_of[id(model.MP.weight)] == 0.1
    assert decay_of[id(model.MP.bias)] == 0.0
    assert decay_of[id(model.decoder[1].weight)] == 0.0


def test_zero_lr_freezes_the_part_and_keeps_it_out_of_the_optimizer():
    model = ThreePartModel()
    opt = build_optimizer(model, cfg(lr_vision_backbone=0.0))
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    for p in model.vision_encoder.parameters():
        assert not p.requires_grad and id(p) not in in_optimizer
    assert current_lrs(opt)["lr_vision_backbone"] == 0.0


def test_frozen_part_is_bit_identical_after_steps_with_weight_decay():
    torch.manual_seed(0)
    model = ThreePartModel()
    before = {k: v.clone() for k, v in model.vision_encoder.state_dict().items()}
    opt = build_optimizer(model, cfg(lr_vision_backbone=0.0, weight_decay=0.5))
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for k, v in model.vision_encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_parameters_outside_the_three_parts_are_an_error():
    model = ThreePartModel()
    model.stray = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="stray"):
        build_optimizer(model, cfg())


@pytest.mark.parametrize("step", [0, 4, 9, 10, 11, 30, 55, 99])
def test_multiplier_matches_warmup_then_cosine(step):
    assert lr_multiplier(step, 100, 10, 0.1) == pytest.approx(reference_schedule(step, 100, 10, 0.1))


def test_schedule_endpoints():
    assert lr_multiplier(0, 100, 10, 0.1) == pytest.approx(0.1)      # 1/10 of the way up
    assert lr_multiplier(10, 100, 10, 0.1) == pytest.approx(1.0)     # peak right after warm-up
    assert lr_multiplier(55, 100, 10, 0.1) == pytest.approx(0.55)    # half-way: (1 + m) / 2
    assert lr_multiplier(100, 100, 10, 0.1) == pytest.approx(0.1)    # floor at min_lr_ratio


def test_no_warmup_starts_at_the_peak():
    assert lr_multiplier(0, 50, 0, 0.0) == pytest.approx(1.0)


def test_scheduler_sets_every_group_to_base_times_multiplier():
    train_cfg = cfg()
    opt = build_optimizer(ThreePartModel(), train_cfg)
    sched = build_scheduler(opt, train_cfg)
    bases = {lr_field: getattr(train_cfg, lr_field) for _, lr_field in PARTS}
    for step in range(100):
        for lr_field, lr in current_lrs(opt).items():
            assert lr == pytest.approx(bases[lr_field] * reference_schedule(step, 100, 10, 0.1))
        opt.step()
        sched.step()


def test_scheduler_state_round_trips():
    train_cfg = cfg()
    opt = build_optimizer(ThreePartModel(), train_cfg)
    sched = build_scheduler(opt, train_cfg)
    for _ in range(17):
        opt.step()
        sched.step()
    opt2 = build_optimizer(ThreePartModel(), train_cfg)
    sched2 = build_scheduler(opt2, train_cfg)
    sched2.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    assert current_lrs(opt2) == current_lrs(opt)
    opt.step(); sched.step(); opt2.step(); sched2.step()
    assert current_lrs(opt2) == current_lrs(opt)


def test_resuming_with_more_steps_follows_the_new_schedule():
    from nanovlm.training.optim import load_optimizer_state
    short = cfg(max_training_steps=10)
    opt = build_optimizer(ThreePartModel(), short)
    sched = build_scheduler(opt, short)
    for _ in range(5):
        opt.step()
        sched.step()
    longer = cfg(max_training_steps=40)
    opt2 = build_optimizer(ThreePartModel(), longer)
    sched2 = build_scheduler(opt2, longer)
    load_optimizer_state(opt2, sched2, opt.state_dict(), sched.state_dict(), longer)
    assert sched2.last_epoch == 5
    assert current_lrs(opt2)["lr_mp"] == pytest.approx(1e-2 * reference_schedule(5, 40, 4, 0.1))
    opt2.step()
    sched2.step()
    assert current_lrs(opt2)["lr_mp"] == pytest.approx(1e-2 * reference_schedule(6, 40, 4, 0.1))


def test_optimizer_is_fused_on_cpu_and_steps_like_plain_adamw():
    torch.manual_seed(0)
    model = ThreePartModel()
    assert build_optimizer(model, cfg()).defaults["fused"] is True
    twin = ThreePartModel()
    twin.load_state_dict(model.state_dict())
    fused, plain = adamw(model.parameters(), lr=1e-2, weight_decay=0.1), \
        torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(8, 4)
    for _ in range(3):
        for m, opt in ((model, fused), (twin, plain)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_optimizer_falls_back_to_plain_adamw_for_non_float_or_other_devices():
    meta = torch.nn.Linear(2, 2, device="meta")
    assert not adamw(meta.parameters(), lr=1e-3).defaults.get("fused")
