"""Configs shared by the training-loop tests (imported by test modules; not a test itself)."""

from nanovlm.config import preset

# A ~50k-parameter model on 32 px shapes: a few steps take seconds on one core.
TINY_SETTINGS = dict(
    vit_img_size=32, vit_patch_size=8, vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=2, vit_n_blocks=1,
    lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=2, lm_n_kv_heads=1, lm_n_blocks=1,
    batch_size=4, shapes_train_size=64, shapes_eval_size=8, eval_samples=4, max_new_tokens_eval=3,
    eval_interval=1000, checkpoint_interval=1000, log_interval=1000, peak_flops=1e12, warmup_ratio=0.2)


def tiny_configs(output_dir, **changes):
    """The `tiny` preset with `TINY_SETTINGS`, writing to `output_dir`."""
    return preset("tiny", **{**TINY_SETTINGS, "output_dir": str(output_dir), **changes})


def set_arguments(**changes) -> list[str]:
    """`TINY_SETTINGS` and `changes` as the CLI's `--set field=value` arguments."""
    return [arg for k, v in {**TINY_SETTINGS, **changes}.items() for arg in ("--set", f"{k}={v}")]


def tiny_sweep(name: str, lr_mp_grid: list[float], max_concurrent_trials: int = 1) -> dict:
    """A sweep space file's content: grid points of `lr_mp`, 2-step trials of a 1-block `tiny`
    model on 1 worker each, no scheduler; seconds per trial once Ray is up."""
    return {
        "name": name, "preset": "tiny",
        "overrides": {"experiment_name": f"{name}-sweep", "max_training_steps": 2, "eval_interval": 2,
                      "eval_samples": 4, "batch_size": 4, "report_interval": 1, "log_interval": 1,
                      "checkpoint_interval": 2, "max_new_tokens_eval": 2, "shapes_train_size": 16,
                      "shapes_eval_size": 4, "vit_n_blocks": 1, "lm_n_blocks": 1, "peak_flops": 1e12},
        "space": {"lr_mp": {"grid": lr_mp_grid}},
        "metric": "val_loss", "mode": "min", "scheduler": {"type": "none"}, "num_samples": 1,
        "max_concurrent_trials": max_concurrent_trials,
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.4, "driver_cpus": 0.2},
        "time_budget_s": 200,
    }


def train_on_global_batches(vlm, train, world_size: int, steps: int):
    """The reference of a `world_size`-worker DDP run, built without Ray: one process, one model,
    and at each step the union of the samples every rank sees (its shard and batch sampler),
    collated into one batch. Every sample must have 2 supervised tokens (colour and shape
    questions), so that the mean of the ranks' losses is the loss of that global batch.
    Returns (per-step losses, initial state_dict, final state_dict)."""
    import torch

    from nanovlm.data import VQACollator, build_datasets, get_tokenizer
    from nanovlm.models import VisionLanguageModel
    from nanovlm.training.loop import seed_everything
    from nanovlm.training.optim import build_optimizer, build_scheduler, trainable_parameters
    from nanovlm.training.sampling import ResumableBatchSampler

    tokenizer = get_tokenizer(vlm.lm_tokenizer, vlm.vlm_extra_tokens, vlm.lm_chat_template)  # also caches it
    shards = [build_datasets(vlm, train, tokenizer, rank, world_size).train for rank in range(world_size)]
    samplers = [iter(ResumableBatchSampler(len(shard), train.batch_size, train.seed)) for shard in shards]
    collator = VQACollator(tokenizer, vlm.lm_max_length)

    seed_everything(train.seed)
    model = VisionLanguageModel(vlm, load_backbone=False)
    model.train()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train)
    losses = []
    for _ in range(steps):
        items = [shard[i] for shard, sampler in zip(shards, samplers) for i in next(sampler)]
        assert all(int((item["labels"] != -100).sum()) == 2 for item in items)
        batch = collator(items)
        _, loss = model(batch["input_ids"], batch["images"], attention_mask=batch["attention_mask"],
                        targets=batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, initial, {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturb_weights(directory, scale: float = 0.3) -> None:
    """Add seeded noise to every weight of the model saved in `directory`: a model trained for a
    few steps answers <|im_end|> at once; a perturbed one answers words."""
    import torch

    from nanovlm.models import VisionLanguageModel
    from nanovlm.models.checkpoint import save_weights

    model = VisionLanguageModel.from_pretrained(directory)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    save_weights(model, f"{directory}/model.safetensors")
