"""AdamW over the VLM's three parts, each with its own learning rate, and the LR schedule.

Parts and the TrainConfig field that sets their rate (nanoVLM's names):

    MP              -> lr_mp                  (modality projector)
    vision_encoder  -> lr_vision_backbone     (ViT)
    decoder         -> lr_language_backbone   (language model)

A rate of 0 freezes the part: its parameters get `requires_grad=False` and stay out of the
optimizer, so neither the update nor weight decay can touch them.

Schedule (a multiplier on each group's base rate, for optimizer step s = 0, 1, ...):
    warm-up   s <  W:  (s + 1) / W                  with W = round(warmup_ratio * max_steps)
    cosine    s >= W:  m + (1 - m) * (1 + cos(pi * p)) / 2,  p = (s - W) / (max_steps - W),  m = min_lr_ratio
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import torch

from nanovlm.config import TrainConfig

logger = logging.getLogger(__name__)

# (submodule name on VisionLanguageModel, TrainConfig field holding its learning rate)
PARTS: tuple[tuple[str, str], ...] = (
    ("MP", "lr_mp"),
    ("vision_encoder", "lr_vision_backbone"),
    ("decoder", "lr_language_backbone"),
)


def _named_parameters(model: torch.nn.Module, part: str) -> Iterator[tuple[str, torch.nn.Parameter]]:
    module = getattr(model, part, None)
    if module is None:
        raise AttributeError(f"The model has no submodule {part!r}; the optimizer expects "
                             f"{[p for p, _ in PARTS]} (VisionLanguageModel's parts).")
    return module.named_parameters()


def apply_freezing(model: torch.nn.Module, train_cfg: TrainConfig) -> dict[str, bool]:
    """Set requires_grad from the per-part learning rates; returns {part: trainable}."""
    trainable = {}
    for part, lr_field in PARTS:
        trainable[part] = getattr(train_cfg, lr_field) > 0
        for _, param in _named_parameters(model, part):
            param.requires_grad_(trainable[part])
        if not trainable[part]:
            logger.info("%s=0: %s is frozen.", lr_field, part)
    return trainable


def build_optimizer(model: torch.nn.Module, train_cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with one group per (part, decay/no-decay). Matrices decay; biases and norm gains
    (1-D tensors) do not, as in nanoGPT. Each group records `part` and `lr_field`."""
    apply_freezing(model, train_cfg)
    covered = {id(p) for part, _ in PARTS for _, p in _named_parameters(model, part)}
    stray = [name for name, p in model.named_parameters() if id(p) not in covered]
    if stray:
        raise ValueError(f"Parameters outside {[p for p, _ in PARTS]} would never be trained: {stray[:5]}"
                         f"{' ...' if len(stray) > 5 else ''}. Put them under one of those submodules.")

    groups = []
    for part, lr_field in PARTS:
        lr = getattr(train_cfg, lr_field)
        if lr == 0:
            continue
        params = [p for _, p in _named_parameters(model, part)]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        for tensors, weight_decay in ((decay, train_cfg.weight_decay), (no_decay, 0.0)):
            if tensors:
                groups.append({"params": tensors, "lr": lr, "weight_decay": weight_decay,
                               "part": part, "lr_field": lr_field})
    return adamw(groups, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2))


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (one kernel for all parameters) where the parameters'
    device has one (CPU and CUDA), else the default implementation. The same arithmetic: on
    CPU the default is a per-parameter Python loop, about 3x slower (benchmarks/records/
    2026-11-27-compare-cpu.md). HF's Trainer defaults to fused too."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    devices = {p.device.type for p in tensors}
    if tensors and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in tensors):
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def warmup_steps(train_cfg: TrainConfig) -> int:
    return int(round(train_cfg.warmup_ratio * train_cfg.max_training_steps))


def lr_multiplier(step: int, max_steps: int, n_warmup: int, min_lr_ratio: float) -> float:
    """The schedule's factor for optimizer step `step` (0-based); see the module docstring."""
    if step < n_warmup:
        return (step + 1) / n_warmup
    decay_steps = max(1, max_steps - n_warmup)
    progress = min(1.0, (step - n_warmup) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable LR lambda (a plain function would be dropped from LambdaLR's state_dict)."""

    def __init__(self, max_steps: int, n_warmup: int, min_lr_ratio: float):
        self.max_steps, self.n_warmup, self.min_lr_ratio = max_steps, n_warmup, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, self.max_steps, self.n_warmup, self.min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Call `scheduler.step()` after every optimizer step; the rate in effect for step s is
    base_lr * lr_multiplier(s)."""
    schedule = WarmupCosine(train_cfg.max_training_steps, warmup_steps(train_cfg), train_cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """{'lr_mp': ..., 'lr_vision_backbone': ..., 'lr_language_backbone': ...}; 0.0 for frozen parts."""
    lrs = {lr_field: 0.0 for _, lr_field in PARTS}
    for group in optimizer.param_groups:
        lrs[group["lr_field"]] = float(group["lr"])
    return lrs


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def load_optimizer_state(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                         optimizer_state: dict, scheduler_state: dict, train_cfg: TrainConfig) -> None:
    """Restore a checkpoint's optimizer moments and step count, then re-apply the *current*
    config's rates, weight decay, betas and schedule. With an unchanged config this is exactly
    the saved state; a resumed run given e.g. a larger max_training_steps follows the new schedule
    (the saved state would otherwise bring back the old one)."""
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    schedule = WarmupCosine(train_cfg.max_training_steps, warmup_steps(train_cfg), train_cfg.min_lr_ratio)
    scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
    scheduler.base_lrs = []
    for group in optimizer.param_groups:
        base = getattr(train_cfg, group["lr_field"])
        scheduler.base_lrs.append(base)
        group["initial_lr"] = base
        group["lr"] = base * schedule(scheduler.last_epoch)
        group["betas"] = (train_cfg.adam_beta1, train_cfg.adam_beta2)
        if group["weight_decay"] > 0:
            group["weight_decay"] = train_cfg.weight_decay
