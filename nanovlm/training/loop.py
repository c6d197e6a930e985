"""The training loop: `train(vlm_cfg, train_cfg, hooks, resume_from) -> summary`.

Framework-free: a single process by default; a wrapper (Ray Train) plugs in through
`TrainHooks` (device, DDP wrapping, rank/world size, callbacks) without this file knowing it.

One optimizer step = `gradient_accumulation_steps` micro-batches of `batch_size` samples:

    for each micro-batch:   loss = model(batch) / accumulation;  loss.backward()
    grad_norm = clip(grads, max_grad_norm);  optimizer.step();  scheduler.step()
    -> on_step(metrics); every eval_interval: evaluate -> on_eval;
       every checkpoint_interval: save (rank 0) -> on_checkpoint (every rank)

Steps are numbered from 1; a checkpoint `step_000500` holds the state after 500 steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nanovlm.accel import apply_training_kernels, compile_for_training
from nanovlm.config import ConfigError, TrainConfig, VLMConfig, configs_to_dict
from nanovlm.training import checkpointing
from nanovlm.training.evaluation import evaluate
from nanovlm.training.hooks import TrainHooks
from nanovlm.training.metrics import global_sum, measured_peak_flops, step_metrics, vlm_flops
from nanovlm.training.optim import (build_optimizer, build_scheduler, current_lrs, load_optimizer_state,
                                    trainable_parameters)
from nanovlm.training.sampling import PackedBatchSampler, ResumableBatchSampler

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; no checkpoint was written for that step."""


# ---------------------------------------------------------------------------- set-up helpers

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("TrainConfig.device='cuda' but no CUDA device is available; use device='auto' or 'cpu'.")
    return torch.device(name)


KEPT_MMAP_THRESHOLD = 32 << 20   # bytes: larger blocks still get their own mmap
KEPT_TRIM_THRESHOLD = 1 << 30    # bytes of free heap top kept before glibc trims it
KEPT_MEMORY_SETTING = (f"glibc keeps freed memory (mmap threshold {KEPT_MMAP_THRESHOLD >> 20} MiB, "
                       f"trim threshold {KEPT_TRIM_THRESHOLD >> 30} GiB)")


def malloc_environment() -> dict[str, str]:
    """The allocator settings the environment gives: MALLOC_* / GLIBC_TUNABLES variables and a
    non-empty LD_PRELOAD (another allocator); `keep_freed_memory` leaves those alone."""
    return {k: v for k, v in os.environ.items()
            if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" or (k == "LD_PRELOAD" and v)}


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep the memory a training step frees for the next step instead
    of handing it back to the system, which the next step then faults in again page by page
    (thousands of page faults per step of the 27M `compare` config on CPU; about 5% of its
    step time). The process keeps its peak heap. Skipped (False) where the environment gives allocator
    settings (`malloc_environment`), or malloc is not glibc's."""
    if malloc_environment():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3      # glibc's malloc.h
    return (bool(mallopt(m_mmap_threshold, KEPT_MMAP_THRESHOLD))
            and bool(mallopt(m_trim_threshold, KEPT_TRIM_THRESHOLD)))


def resolve_autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. 'auto' = bf16 on CUDA when supported."""
    if dtype == "float32":
        return None
    if dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            out[key] = [v.to(device, non_blocking=True) for v in value]
        else:
            out[key] = value
    return out


def _count_images(images: Any) -> int:
    if images is None:
        return 0
    if isinstance(images, torch.Tensor):
        return int(images.shape[0])
    return sum(_count_images(img) for img in images)


def _batch_flops(cfg: VLMConfig, batch: dict[str, Any]) -> float:
    """Analytic training FLOPs of a batch: each sample's real length (image tokens included)."""
    if "sample_lengths" in batch:   # packed rows: each sample attends only to itself
        return sum(vlm_flops(cfg, n, k) for n, k in zip(batch["sample_lengths"], batch["sample_images"]))
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    images = batch.get("images")
    per_sample = ([_count_images(x) for x in images] if isinstance(images, list)
                  else [_count_images(images) // max(len(lengths), 1)] * len(lengths))
    return sum(vlm_flops(cfg, int(n), k) for n, k in zip(lengths, per_sample))


def _build_model(vlm_cfg: VLMConfig, train_cfg: TrainConfig, resume_dir: Path | None):
    from nanovlm.models import VisionLanguageModel

    source = resume_dir or train_cfg.resume_from_vlm_checkpoint
    if source is None:
        return VisionLanguageModel(vlm_cfg, load_backbone=vlm_cfg.vlm_load_backbone_weights)
    model = VisionLanguageModel.from_pretrained(str(source))
    loaded = getattr(model, "cfg", None)
    if loaded is not None and loaded.to_dict() != vlm_cfg.to_dict():
        changed = sorted(k for k, v in vlm_cfg.to_dict().items() if loaded.to_dict().get(k) != v)
        logger.warning("The model loaded from %s differs from the given VLMConfig in %s; "
                       "training continues with the checkpoint's config.", source, changed)
    return model


def _packed_training_data(train_ds, vlm_cfg: VLMConfig, train_cfg: TrainConfig, tokenizer, rank: int,
                          world_size: int, start_batch: int):
    """(dataset, batch sampler, collator) that feed the loop packed rows (docs/data.md, Packing)."""
    from nanovlm.data.packing import PackedCollator, SampleGroups, sample_sizes

    max_tokens = train_cfg.max_sample_length or vlm_cfg.lm_max_length
    sampler = PackedBatchSampler(sample_sizes(train_ds), train_cfg.batch_size, train_cfg.seed, max_tokens,
                                 train_cfg.max_images_per_knapsack, rank=rank, world_size=world_size,
                                 start_batch=start_batch)
    if sampler.skipped:
        logger.warning("Packing skips %s of the %d training samples: they fit no row of max_sample_length=%d "
                       "tokens and max_images_per_knapsack=%d images.", dict(sampler.skipped), len(train_ds),
                       max_tokens, train_cfg.max_images_per_knapsack)
    collator = PackedCollator(tokenizer.pad_token_id, max_tokens, train_cfg.max_images_per_knapsack)
    return SampleGroups(train_ds), sampler, collator


def _packed_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The forward's extra inputs of a packed batch: sample ids and per-sample positions."""
    return {k: batch[k] for k in ("sample_ids", "position_ids") if k in batch}


def _progress_bar(total: int, initial: int, rank: int):
    enabled = rank == 0 and sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


# ---------------------------------------------------------------------------- the loop

def train(vlm_cfg: VLMConfig, train_cfg: TrainConfig, hooks: TrainHooks | None = None,
          resume_from: str | Path | None = None, *, validate: bool = True) -> dict[str, Any]:
    """Train and return the summary (also written to output_dir/summary.json on rank 0).

    resume_from: a training checkpoint (`.../checkpoints/step_XXXXXX`) or a run's output dir
    (its latest checkpoint). `hooks.resume_dir()`, when set, takes precedence (a restarted
    Ray worker). Raises NonFiniteLossError on a NaN/inf loss, leaving earlier checkpoints as
    they were.
    validate: check both configs first (`ConfigError`). Callers that validated them where they
    entered the process (the front doors, a Ray worker) pass False.
    """
    from nanovlm.data import VQACollator, build_datasets, get_tokenizer
    from nanovlm.data.local_files import DatasetError

    wall_start = time.perf_counter()
    hooks = hooks or TrainHooks()
    if validate:
        vlm_cfg.validate()
        train_cfg.validate()
    rank, world_size = hooks.rank, hooks.world_size
    output_dir = Path(train_cfg.output_dir)
    device = hooks.device() or resolve_device(train_cfg.device)
    amp_dtype = resolve_autocast_dtype(train_cfg.dtype, device)
    if device.type == "cpu":
        # Once the loss is small, gradients and Adam moments underflow into denormal floats,
        # which x86 CPUs process ~100x slower: a tiny run stalled from 14 to <1 step/s.
        torch.set_flush_denormal(True)
        if keep_freed_memory():
            logger.debug("%s.", KEPT_MEMORY_SETTING)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    resume_dir = hooks.resume_dir() or resume_from
    resume_dir = checkpointing.resolve_checkpoint(resume_dir) if resume_dir is not None else None

    # --- model, optimizer, schedule (same seed on every rank: identical initial weights)
    seed_everything(train_cfg.seed)
    model = _build_model(vlm_cfg, train_cfg, resume_dir).to(device)
    vlm_cfg = getattr(model, "cfg", vlm_cfg)
    model.train()
    optimizer = build_optimizer(model, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg)
    params = trainable_parameters(model)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Model: %.2fM parameters (%.2fM trainable) on %s, autocast %s.", n_params / 1e6,
                sum(p.numel() for p in params) / 1e6, device, amp_dtype or "off (fp32)")

    start_step, batches_consumed, rng_state, data_position = 0, 0, None, None
    if resume_dir is not None:
        state = checkpointing.load_train_state(resume_dir)
        load_optimizer_state(optimizer, scheduler, state["optimizer"], state["scheduler"], train_cfg)
        start_step = int(state["step"])
        data_position = state["data_position"]
        batches_consumed = int(data_position["batches_consumed"])
        rng_state = state["rng"]  # restored last, right before the first step
        logger.info("Resumed from %s at step %d (%d batches consumed).", resume_dir, start_step, batches_consumed)

    apply_training_kernels(model)   # exact: eager and compiled runs alike
    train_model = hooks.wrap_model(model)
    if train_cfg.compile:
        train_model = compile_for_training(train_model, device)

    # --- data: the order is a function of (seed, epoch, rank); batches_consumed is the position
    tokenizer = get_tokenizer(train_cfg.tokenizer_path or vlm_cfg.lm_tokenizer, vlm_cfg.vlm_extra_tokens,
                              vlm_cfg.lm_chat_template)
    datasets = build_datasets(vlm_cfg, train_cfg, tokenizer, rank, world_size)
    train_ds, val_ds = datasets.train, datasets.val
    collator = VQACollator(tokenizer, vlm_cfg.lm_max_length)   # evaluation's, and training's unless packing
    if datasets.streaming:   # the position is the stream's own (docs/data.md, Map-style and streamed)
        train_items, sampler, train_collate = train_ds.loader_parts(collator, data_position)
    elif data_position is not None and "stream" in data_position:
        raise DatasetError("The checkpoint was written by streamed training (its data position is a place in the "
                           "stream); resume it with stream_dataset=true.")
    elif train_cfg.packing:
        train_items, sampler, train_collate = _packed_training_data(
            train_ds, vlm_cfg, train_cfg, tokenizer, datasets.sampler_rank, datasets.sampler_world_size,
            batches_consumed)
    else:
        train_items, train_collate = train_ds, collator
        sampler = ResumableBatchSampler(len(train_ds), train_cfg.batch_size, train_cfg.seed,
                                        rank=datasets.sampler_rank, world_size=datasets.sampler_world_size,
                                        start_batch=batches_consumed)
    loader = torch.utils.data.DataLoader(
        train_items, batch_sampler=sampler, collate_fn=train_collate, num_workers=train_cfg.dataloader_workers,
        pin_memory=device.type == "cuda", persistent_workers=train_cfg.dataloader_workers > 0,
        # a private generator: creating the iterator must not draw from the global RNG
        generator=torch.Generator().manual_seed(train_cfg.seed))
    batches = iter(loader)

    benchmarks = None
    if train_cfg.eval_tasks:   # docs/eval.md; questions loaded now, so a missing dataset fails before training
        from nanovlm.eval.in_training import TrainingBenchmarks
        benchmarks = TrainingBenchmarks(vlm_cfg, train_cfg)

    peak = train_cfg.peak_flops or measured_peak_flops(device, amp_dtype or torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if rng_state is not None:
        checkpointing.restore_rng_state(rng_state)

    def run_eval(at_step: int) -> dict[str, float]:
        if val_ds is None and benchmarks is None:
            logger.warning("No validation set: step %d is not evaluated.", at_step)
            return {}
        result = {} if val_ds is None else evaluate(
            model, val_ds, collator, tokenizer, eval_samples=train_cfg.eval_samples, batch_size=train_cfg.batch_size,
            max_new_tokens=train_cfg.max_new_tokens_eval, device=device, autocast=autocast, rank=rank,
            world_size=world_size)
        if benchmarks is not None:
            result.update(benchmarks(model, tokenizer, batch_size=train_cfg.batch_size, device=device,
                                     autocast=autocast, rank=rank, world_size=world_size))
        logger.info("step %d eval: %s", at_step, "  ".join(f"{k}={v:.4f}" for k, v in result.items()))
        hooks.on_eval(at_step, result)
        return result

    def run_checkpoint(at_step: int, metrics: dict[str, float]) -> Path | None:
        path = None
        if rank == 0:
            path = checkpointing.save_checkpoint(
                output_dir, at_step, model, optimizer, scheduler, train_cfg, sampler.position(batches_consumed),
                extra={"metrics": dict(metrics)}, keep=train_cfg.checkpoints_to_keep)
        if _distributed():
            dist.barrier()
        hooks.on_checkpoint(at_step, path, metrics)
        return path

    # --- steps
    step = start_step
    last_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    last_checkpoint: Path | None = resume_dir
    totals = {"tokens": 0.0, "samples": 0.0, "images": 0.0, "time": 0.0, "flops_time": 0.0}
    skipped_at_load = 0   # streamed rows whose images did not decode (counted in the loader's workers)
    accumulation = train_cfg.gradient_accumulation_steps
    bar = _progress_bar(train_cfg.max_training_steps, start_step, rank)
    try:
        while step < train_cfg.max_training_steps:
            step_start = time.perf_counter()
            data_wait = 0.0
            loss_sum = 0.0
            tokens = positions = samples = images = 0
            flops = 0.0
            bad: str | None = None
            for micro in range(accumulation):
                wait_start = time.perf_counter()
                batch = _to_device(next(batches), device)
                skipped_at_load += batch.pop("skipped_at_load", 0)
                while "input_ids" not in batch:   # streamed: not one image of the batch decoded
                    batches_consumed += 1
                    batch = _to_device(next(batches), device)
                    skipped_at_load += batch.pop("skipped_at_load", 0)
                data_wait += time.perf_counter() - wait_start
                position = sampler.position(batches_consumed)
                batches_consumed += 1
                last_micro = micro == accumulation - 1
                sync = contextlib.nullcontext() if last_micro or not hasattr(train_model, "no_sync") \
                    else train_model.no_sync()
                with sync:
                    with autocast():
                        _, loss = train_model(batch["input_ids"], batch.get("images"),
                                              attention_mask=batch["attention_mask"], targets=batch["labels"],
                                              return_logits=False, **_packed_inputs(batch))
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value) and bad is None:
                        bad = (f"loss={loss_value} on micro-batch {micro + 1}/{accumulation} "
                               f"(data position: epoch {position['epoch']}, batch {position['batch_in_epoch']} "
                               f"of the epoch, {position['batches_consumed']} batches consumed before it)")
                    # every rank still runs backward, so DDP's all-reduce cannot hang on one rank's NaN
                    (loss / accumulation).backward()
                loss_sum += loss_value
                tokens += int(batch["attention_mask"].sum())   # real tokens, not padding
                positions += batch["input_ids"].numel()
                samples += len(batch.get("sample_lengths", batch["input_ids"]))
                images += _count_images(batch.get("images"))
                flops += _batch_flops(vlm_cfg, batch)

            max_norm = train_cfg.max_grad_norm if train_cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if bad is not None or not math.isfinite(grad_norm):
                reason = bad or (f"grad_norm={grad_norm} (another worker's loss was not finite, or the "
                                 f"gradients overflowed)")
                raise NonFiniteLossError(
                    f"Non-finite training loss at step {step + 1}: {reason}. Stopped without updating the "
                    f"weights or writing a checkpoint; the last good checkpoint is "
                    f"{last_checkpoint or 'none (no checkpoint was written yet)'}. Lower the learning rates, "
                    f"set max_grad_norm, or inspect that batch.")
            lrs = current_lrs(optimizer)  # the rates this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_time = time.perf_counter() - step_start

            metrics = step_metrics(
                loss=loss_sum / accumulation, lrs=lrs, grad_norm=grad_norm, step_time=step_time,
                data_wait=data_wait, local_tokens=tokens, local_positions=positions, local_samples=samples,
                local_images=images, local_flops=flops, peak_flops=peak, device=device)
            totals["time"] += step_time
            totals["tokens"] += metrics["tokens_per_second"] * step_time
            totals["samples"] += metrics["samples_per_second"] * step_time
            totals["images"] += metrics["images_per_second"] * step_time
            totals["flops_time"] += metrics["mfu"] * step_time
            last_metrics = metrics
            hooks.on_step(step, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_second']:.0f}")
            if step % train_cfg.log_interval == 0 or step == start_step + 1:
                logger.info("step %d/%d  loss %.4f  grad_norm %.3f  lr_mp %.2e  %.0f tok/s  mfu %.2f%%  "
                            "data_wait %.3fs", step, train_cfg.max_training_steps, metrics["loss"], grad_norm,
                            lrs["lr_mp"], metrics["tokens_per_second"], 100 * metrics["mfu"], data_wait)

            final = step == train_cfg.max_training_steps
            if step % train_cfg.eval_interval == 0 or final:
                eval_metrics = run_eval(step)
            if step % train_cfg.checkpoint_interval == 0 or final:
                last_checkpoint = run_checkpoint(step, {**metrics, **eval_metrics}) or last_checkpoint
    finally:
        if bar is not None:
            bar.close()

    if not eval_metrics:  # resumed at (or past) the last step: evaluate what we have
        eval_metrics = run_eval(step)

    summary = _summary(vlm_cfg, train_cfg, step, start_step, time.perf_counter() - wall_start, last_metrics,
                       eval_metrics, totals, last_checkpoint, resume_dir, _chance(train_cfg))
    summary["data"] = datasets.report(sampler, skipped_at_load, rank, lambda values: global_sum(values, device))
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    hooks.on_end(summary)
    return summary


def _chance(train_cfg: TrainConfig) -> dict[str, float] | None:
    """Majority-answer accuracy per question type, where the dataset knows it (shapes)."""
    if train_cfg.train_dataset_path != "shapes":
        return None
    from nanovlm.data import chance_per_type
    return chance_per_type(train_cfg.shapes_max_objects, train_cfg.shapes_question_types,
                           seed=train_cfg.shapes_seed, split="validation")


def _summary(vlm_cfg, train_cfg, step, start_step, wall_time, last_metrics, eval_metrics, totals,
             last_checkpoint, resume_dir, chance) -> dict[str, Any]:
    train_time = max(totals["time"], 1e-9)
    summary: dict[str, Any] = {
        "steps": step,
        "steps_this_run": step - start_step,
        "wall_time_s": wall_time,
        "train_time_s": totals["time"],
        "train_loss": last_metrics.get("loss"),
        **{k: v for k, v in eval_metrics.items()},
        "tokens_per_second": totals["tokens"] / train_time,
        "samples_per_second": totals["samples"] / train_time,
        "images_per_second": totals["images"] / train_time,
        "mfu": totals["flops_time"] / train_time,
        "peak_memory_mb": last_metrics.get("peak_memory_mb"),
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "resumed_from": str(resume_dir) if resume_dir else None,
    }
    if chance:
        summary["chance"] = {k: float(v) for k, v in dict(chance).items()}
    summary["config"] = configs_to_dict(vlm_cfg, train_cfg)
    return summary
