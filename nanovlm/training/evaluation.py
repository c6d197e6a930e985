"""Validation: loss on the answer tokens, and answer accuracy by greedy generation.

Accuracy: each sample's prompt (everything before its answer) is fed to `generate` greedily
for up to `max_new_tokens_eval` tokens; the text up to the answer's end token is compared
with the reference answer after `normalize_answer`. Reported overall and per question type
(`val_accuracy_colour`, ...). With several workers each evaluates a strided share of the
first `eval_samples` validation samples and the sums are combined, so every rank gets the
same numbers.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def answer_end_token(labels: torch.Tensor) -> int:
    """The token that closes an answer (e.g. `<|im_end|>`): the last supervised label of a row."""
    supervised = labels[labels != IGNORE_INDEX]
    if len(supervised) == 0:
        raise ValueError("A validation sample has no supervised (answer) tokens; cannot evaluate it.")
    return int(supervised[-1])


def _cut_at(ids: list[int], stop: int) -> list[int]:
    return ids[:ids.index(stop)] if stop in ids else ids


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_dataset: Any, collator: Any, tokenizer: Any, *,
             eval_samples: int, batch_size: int, max_new_tokens: int, device: torch.device,
             autocast: Any = contextlib.nullcontext, rank: int = 0, world_size: int = 1,
             normalize: Any = None) -> dict[str, float]:
    """val_loss (mean over answer tokens), val_accuracy and val_accuracy_<question type>.

    `model` must be the unwrapped VisionLanguageModel (generate is not DDP-safe);
    `autocast` a zero-argument callable returning the training autocast context.
    The global RNG is left untouched, so evaluating does not change the training trajectory.
    """
    if normalize is None:
        from nanovlm.data import normalize_answer as normalize
    n = min(eval_samples, len(val_dataset))
    indices = list(range(rank, n, world_size))
    was_training = model.training
    model.eval()
    loss_sum, token_count = 0.0, 0
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for start in range(0, len(indices), batch_size):
                items = [val_dataset[i] for i in indices[start:start + batch_size]]
                # --- loss over the answer tokens, through the training collator
                batch = collator(items)  # also gives left-padded prompt_ids (before the answer)
                labels = batch["labels"].to(device)
                images = _images_to(batch.get("images"), device)
                with autocast():
                    logits, _ = model(batch["input_ids"].to(device), images,
                                      attention_mask=batch["attention_mask"].to(device))
                loss_sum += float(torch.nn.functional.cross_entropy(
                    logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
                token_count += int((labels != IGNORE_INDEX).sum())
                # --- answers generated greedily from the prompt alone
                stop = answer_end_token(batch["labels"][0])
                with autocast():
                    generated = model.generate(batch["prompt_ids"].to(device), images,
                                               attention_mask=batch["prompt_attention_mask"].to(device),
                                               max_new_tokens=max_new_tokens, greedy=True, eos_token_id=stop)
                for qtype, answer, out in zip(batch["question_types"], batch["answers"], generated.tolist()):
                    text = tokenizer.decode(_cut_at(out, stop), skip_special_tokens=True)
                    total[qtype] += 1
                    correct[qtype] += int(normalize(text) == normalize(answer))
    finally:
        model.train(was_training)

    loss_sum, token_count, correct, total = _combine(loss_sum, token_count, correct, total)
    metrics = {"val_loss": loss_sum / max(token_count, 1),
               "val_accuracy": sum(correct.values()) / max(sum(total.values()), 1)}
    for qtype in sorted(total):
        metrics[f"val_accuracy_{qtype}"] = correct[qtype] / total[qtype]
    return metrics


def _images_to(images: Any, device: torch.device) -> Any:
    if images is None:
        return None
    if isinstance(images, torch.Tensor):
        return images.to(device)
    return [img.to(device) if isinstance(img, torch.Tensor) else img for img in images]


def _combine(loss_sum: float, token_count: int, correct: dict[str, int], total: dict[str, int]):
    """Sum the evaluation counts over workers (question types may differ between shards)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loss_sum, token_count, dict(correct), dict(total)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (loss_sum, token_count, dict(correct), dict(total)))
    loss_sum = sum(g[0] for g in gathered)
    token_count = sum(g[1] for g in gathered)
    correct_all: dict[str, int] = defaultdict(int)
    total_all: dict[str, int] = defaultdict(int)
    for _, _, c, t in gathered:
        for k, v in c.items():
            correct_all[k] += v
        for k, v in t.items():
            total_all[k] += v
    return loss_sum, token_count, dict(correct_all), dict(total_all)
