"""VQACollator: left padding that never changes what a sample computes."""

import pytest
import torch
import torch.nn.functional as F

from nanovlm.data import VQACollator, VQADataset, image_processor_for
from nanovlm.data.shapes import ShapesRows

IGNORE = -100


@pytest.fixture(scope="module")
def items(tiny_cfg, tokenizer):
    """Samples of clearly different lengths: a caption, a yes/no, a colour question."""
    rows = [ShapesRows("train", 1, seed=s, max_objects=2, question_types=q)[0]
            for s, q in ((1, "caption"), (2, "exists"), (3, "colour"))]
    dataset = VQADataset(rows, tokenizer, image_processor_for(tiny_cfg), tiny_cfg)
    items = [dataset[i] for i in range(len(dataset))]
    assert len({len(item["input_ids"]) for item in items}) == 3
    return items


def test_batch_is_left_padded_with_masked_padding(items, tokenizer):
    batch = VQACollator(tokenizer, 128)(items)
    longest = max(len(item["input_ids"]) for item in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    for row, item in enumerate(items):
        pad = longest - len(item["input_ids"])
        assert batch["input_ids"][row, :pad].eq(tokenizer.pad_token_id).all()
        assert batch["labels"][row, :pad].eq(IGNORE).all()
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, pad:], item["input_ids"])
        assert torch.equal(batch["labels"][row, pad:], item["labels"])


def test_images_prompts_and_answers_keep_sample_order(items, tokenizer):
    batch = VQACollator(tokenizer, 128)(items)
    assert torch.equal(batch["images"], torch.cat([item["images"] for item in items]))
    assert batch["answers"] == [item["answer"] for item in items]
    assert batch["question_types"] == ["caption", "exists", "colour"]
    longest = max(len(item["prompt_ids"]) for item in items)
    for row, item in enumerate(items):
        assert torch.equal(batch["prompt_ids"][row, longest - len(item["prompt_ids"]):], item["prompt_ids"])
        assert batch["prompt_attention_mask"][row].sum() == len(item["prompt_ids"])


def test_samples_longer_than_max_length_are_dropped_and_counted(items, tokenizer):
    collator = VQACollator(tokenizer, max_length=min(len(item["input_ids"]) for item in items))
    batch = collator(items)
    assert len(batch["answers"]) == 1 and collator.dropped == 2


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    losses = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return losses.sum(1) / (labels != IGNORE).sum(1)


def test_padding_never_changes_a_samples_loss_in_the_vlm(items, tokenizer, tiny_cfg):
    from nanovlm.models import VisionLanguageModel
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_cfg, load_backbone=False).eval()
    with torch.no_grad():
        for p in model.parameters():  # fresh inits leave norms at identity and biases at zero
            p.add_(0.02 * torch.randn_like(p))
        batch = VQACollator(tokenizer, tiny_cfg.lm_max_length)(items)
        logits, _ = model(batch["input_ids"], batch["images"], attention_mask=batch["attention_mask"])
        padded = per_sample_loss(logits, batch["labels"])
        for row, item in enumerate(items):
            alone, _ = model(item["input_ids"][None], item["images"], attention_mask=item["attention_mask"][None])
            torch.testing.assert_close(padded[row], per_sample_loss(alone, item["labels"][None])[0],
                                       rtol=1e-5, atol=1e-5)


def test_padding_never_changes_a_samples_loss_in_a_reference_llama(items, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.3)  # large weights: sharp attention, position-sensitive
    model = LlamaForCausalLM(config).eval()
    batch = VQACollator(tokenizer, 128)(items)
    mask = batch["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
        padded = per_sample_loss(logits, batch["labels"])
        for row, item in enumerate(items):
            alone = model(input_ids=item["input_ids"][None]).logits
            torch.testing.assert_close(padded[row], per_sample_loss(alone, item["labels"][None])[0],
                                       rtol=1e-5, atol=1e-5)
