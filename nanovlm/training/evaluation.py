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
from typing import Any, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def answer_start(labels: torch.Tensor) -> int:
    """Position of the first input token that is part of the answer.

    `labels` are already shifted (labels[t] is the target for the prediction made at
    position t, i.e. input_ids[t + 1]), so if labels[t] is the first supervised one the
    prompt is input_ids[:t + 1] and the answer starts at t + 1."""
    supervised = (labels != IGNORE_INDEX).nonzero()
    if len(supervised) == 0:
        raise ValueError("A validation sample has no supervised (answer) tokens; cannot evaluate it.")
    return int(supervised[0]) + 1


def answer_end_token(labels: torch.Tensor) -> int:
    """The token that closes an answer: the last supervised label of a sample."""
    supervised = labels[labels != IGNORE_INDEX]
    return int(supervised[-1])


def _left_pad(seqs: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, longest - len(s):] = s
        mask[i, longest - len(s):] = 1
    return ids, mask


def _stack_images(items: Sequence[dict[str, Any]]) -> torch.Tensor | None:
    images = [item["images"] for item in items if item.get("images") is not None and len(item["images"])]
    return torch.cat(images, dim=0) if images else None


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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    loss_sum, token_count = 0.0, 0
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for start in range(0, len(indices), batch_size):
                items = [val_dataset[i] for i in indices[start:start + batch_size]]
                items = [item for item in items if item is not None]
                if not items:
                    continue
                # --- loss over the answer tokens, through the training collator
                batch = collator(items)
                labels = batch["labels"].to(device)
                with autocast():
                    logits, _ = model(batch["input_ids"].to(device), _images_to(batch.get("images"), device),
                                      attention_mask=batch["attention_mask"].to(device))
                token_losses = torch.nn.functional.cross_entropy(
                    logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
                loss_sum += float(token_losses)
                token_count += int((labels != IGNORE_INDEX).sum())
                # --- answers generated from the prompt alone
                prompts = [item["input_ids"][:answer_start(item["labels"])] for item in items]
                ids, mask = _left_pad(prompts, pad_id)
                stop = answer_end_token(items[0]["labels"])
                with autocast():
                    generated = model.generate(ids.to(device), _images_to(_stack_images(items), device),
                                               attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                               greedy=True, eos_token_id=stop)
                for item, out in zip(items, generated.tolist()):
                    text = tokenizer.decode(_cut_at(out, stop), skip_special_tokens=True)
                    qtype = item.get("question_type") or "all"
                    total[qtype] += 1
                    correct[qtype] += int(normalize(text) == normalize(item["answer"]))
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
