"""Packing: the greedy knapsack on hand-computed cases, the resumable packed sampler, the collator,
and the model computing on packed rows exactly what each sample computes alone."""

import pytest
import torch
import torch.nn.functional as F

from nanovlm.data import VQADataset
from nanovlm.data.processors import image_processor_for
from nanovlm.data.packing import PAD_SAMPLE_ID, PackedCollator, SampleGroups, greedy_knapsack, item_size
from nanovlm.data.shapes import ShapesRows
from nanovlm.models import VisionLanguageModel
from nanovlm.models.language_model import packed_causal_mask, sample_positions
from nanovlm.training.sampling import PackedBatchSampler
from training_configs import tiny_configs

IGNORE = -100


# ---------------------------------------------------------------------------- greedy knapsack

def test_knapsack_puts_the_longest_first_into_the_least_filled_row_that_fits():
    # 2 rows to start (20 tokens / 10, no slack): 6 -> row 0, 5 -> row 1, 4 -> row 1 (5 < 6),
    # 3 -> row 0 (6 < 9), and 2 fits neither row of 9: a new row.
    sizes = [(6, 0), (5, 0), (4, 0), (3, 0), (2, 0)]
    assert greedy_knapsack(sizes, max_tokens=10, max_images=9, slack=0) == [[0, 3], [1, 2], [4]]


def test_knapsack_keeps_to_the_image_limit():
    # One row to start; item 1's 2 images do not fit beside item 0's 3 (limit 4): a new row.
    # Item 2 goes to the emptier row 1, item 3 (1 image) then fits beside item 0.
    sizes = [(5, 3), (4, 2), (3, 2), (2, 1)]
    assert greedy_knapsack(sizes, max_tokens=100, max_images=4, slack=0) == [[0, 3], [1, 2]]


def test_knapsack_slack_spreads_items_over_rows_as_nanovlm_does():
    # ceil(4 / 10) + 5 = 6 empty rows to start: each item goes to an empty (least filled) row.
    assert greedy_knapsack([(1, 0)] * 4, max_tokens=10, max_images=1) == [[0], [1], [2], [3]]


def test_knapsack_breaks_ties_by_given_order_and_then_by_the_older_row():
    # Sorted 1, 2 (4 tokens, given order), then 0, 3; item 0 meets two rows of 4: the older one.
    sizes = [(2, 0), (4, 0), (4, 0), (2, 0)]
    assert greedy_knapsack(sizes, max_tokens=6, max_images=0, slack=0) == [[1, 0], [2, 3]]


def test_knapsack_refuses_an_item_that_fits_no_row():
    with pytest.raises(ValueError, match="item 1 .11 tokens"):
        greedy_knapsack([(3, 0), (11, 0)], max_tokens=10, max_images=4)


# ---------------------------------------------------------------------------- sampler

SIZES = [(t, i) for t, i in zip([30, 90, 12, 55, 140, 70, 8, 25, 64, 41] * 6, [1, 2, 0, 1, 1, 4, 0, 3, 2, 5] * 6)]


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def packed_sampler(**changes):
    return PackedBatchSampler(**{"sizes": SIZES, "batch_size": 2, "seed": 0, "max_tokens": 128,
                                 "max_images": 4, **changes})


def test_sampler_skips_and_counts_samples_that_fit_no_row():
    sampler = packed_sampler()
    assert sampler.skipped == {"too_long": 6, "too_many_images": 6}   # the 140-token and the 5-image ones
    rows = [row for batch in take(sampler, sampler.batches_in_epoch(0)) for row in batch]
    assert all(SIZES[i][0] <= 128 and SIZES[i][1] <= 4 for row in rows for i in row)


def test_sampler_rows_respect_both_limits_and_hold_each_sample_at_most_once_per_epoch():
    sampler = packed_sampler()
    rows = [row for batch in take(sampler, sampler.batches_in_epoch(0)) for row in batch]
    assert all(sum(SIZES[i][0] for i in row) <= 128 and sum(SIZES[i][1] for i in row) <= 4 for row in rows)
    seen = [i for row in rows for i in row]
    assert len(seen) == len(set(seen)) and len(seen) >= 40   # 48 fit; at most one incomplete batch dropped


def test_sampler_started_at_a_position_continues_the_uninterrupted_stream():
    start = packed_sampler().batches_in_epoch(0) + 3                # a position in the second epoch
    full = take(packed_sampler(), start + 10)
    assert take(packed_sampler(start_batch=start), 10) == full[start:]
    assert packed_sampler().position(start) == {"batches_consumed": start, "epoch": 1, "batch_in_epoch": 3}


def test_sampler_ranks_pack_disjoint_shares():
    ranks = [packed_sampler(rank=r, world_size=2, batch_size=1) for r in (0, 1)]
    shares = [{i for row in ranks[r].epoch_groups(0) for i in row} for r in (0, 1)]
    assert not shares[0] & shares[1]


def test_sampler_refuses_a_dataset_that_fills_fewer_rows_than_a_batch():
    with pytest.raises(ValueError, match="batch_size=64"):
        packed_sampler(batch_size=64)


# ---------------------------------------------------------------------------- collator and mask

def item(tokens, labels, n_images):
    return {"input_ids": torch.tensor(tokens), "labels": torch.tensor(labels),
            "images": torch.full((n_images, 3, 2, 2), float(tokens[0]))}


def test_collator_concatenates_samples_and_restarts_their_positions():
    a, b, c = item([1, 2, 3], [2, 3, IGNORE], 1), item([4, 5], [5, IGNORE], 0), item([6], [IGNORE], 2)
    batch = PackedCollator(pad_token_id=0, max_tokens=8, max_images=4)([[a, b], [c]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[2, 3, IGNORE, 5, IGNORE], [IGNORE] * 5]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    assert batch["sample_ids"].tolist() == [[0, 0, 0, 1, 1], [0] + [PAD_SAMPLE_ID] * 4]
    assert batch["images"][:, 0, 0, 0].tolist() == [1.0, 6.0, 6.0]
    assert batch["sample_lengths"] == [3, 2, 1] and batch["sample_images"] == [1, 0, 2]


def test_collator_drops_and_counts_an_item_that_outgrew_its_row():
    collator = PackedCollator(pad_token_id=0, max_tokens=4, max_images=4)
    batch = collator([[item([1, 2, 3], [2, 3, IGNORE], 1), item([4, 5], [5, IGNORE], 0)]])
    assert batch["input_ids"].tolist() == [[1, 2, 3]] and collator.dropped == 1


def test_positions_restart_and_attention_stays_within_each_sample():
    sample_ids = torch.tensor([[0, 0, 0, 1, 1, PAD_SAMPLE_ID]])
    assert sample_positions(sample_ids).tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = packed_causal_mask(sample_ids, sample_ids != PAD_SAMPLE_ID)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0],
                    [0, 0, 0, 1, 0, 0],
                    [0, 0, 0, 1, 1, 0],
                    [0, 0, 0, 0, 0, 1]]


# ---------------------------------------------------------------------------- real samples

@pytest.fixture(scope="module")
def dataset(tiny_cfg, tokenizer):
    """Shapes samples with 0 to 3 images and answers from one word to a caption of three objects."""
    rows = []
    for seed, n_images in enumerate([1, 0, 2, 3, 1, 0, 2, 1]):
        shape_rows = [ShapesRows("train", 1, seed=10 * seed + k, max_objects=3)[0] for k in range(max(n_images, 1))]
        rows.append({"images": [r["images"][0] for r in shape_rows][:n_images], "texts": shape_rows[0]["texts"]})
    return VQADataset(rows, tokenizer, image_processor_for(tiny_cfg), tiny_cfg)


def test_dataset_sizes_read_from_the_text_match_the_loaded_items(dataset):
    assert dataset.sample_sizes() == [item_size(dataset[k]) for k in range(len(dataset))]
    assert {images for _, images in dataset.sample_sizes()} == {0, 1, 2, 3}


def test_packed_batch_has_the_loss_and_gradients_of_its_samples_run_one_by_one(dataset, tiny_cfg, tokenizer):
    # float64 throughout (the head's float32 cross-entropy replaced by a float64 one): the only
    # differences left are summation orders. The loss of a batch is the mean over all its
    # supervised tokens, so the reference weights each sample by its supervised tokens.
    cfg = tiny_cfg.replace(vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=2, vit_n_blocks=1,
                           lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=4, lm_n_kv_heads=2, lm_n_blocks=2)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg).double()
    model.head_loss = lambda hidden, head, targets: F.cross_entropy(head(hidden), targets)
    items = [dataset[k] for k in range(len(dataset))]

    def loss_and_grads(batch):
        model.zero_grad()
        images = batch["images"].double() if batch["images"] is not None else None
        _, loss = model(batch["input_ids"], images, attention_mask=batch["attention_mask"], targets=batch["labels"],
                        return_logits=False, sample_ids=batch.get("sample_ids"),
                        position_ids=batch.get("position_ids"))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    collator = PackedCollator(tokenizer.pad_token_id, max_tokens=10_000, max_images=18)
    packed = collator([items[:3], items[3:5], items[5:]])         # 3 rows of 3, 2 and 3 samples, padded
    assert (packed["attention_mask"] == 0).any()
    loss, grads = loss_and_grads(packed)

    weights = torch.tensor([float((it["labels"] != IGNORE).sum()) for it in items], dtype=torch.float64)
    weights /= weights.sum()
    expected_loss, expected = 0.0, {}
    for w, it in zip(weights, items):
        one = {"input_ids": it["input_ids"][None], "labels": it["labels"][None], "attention_mask": None,
               "images": it["images"] if len(it["images"]) else None}
        sample_loss, sample_grads = loss_and_grads(one)
        expected_loss += w * sample_loss
        for name, grad in sample_grads.items():
            expected[name] = expected.get(name, 0) + w * grad
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], rtol=1e-9, atol=1e-12), name


def test_resumed_packed_loader_yields_the_same_batches(dataset, tokenizer):
    sizes = dataset.sample_sizes()

    def batches(start, n):
        sampler = PackedBatchSampler(sizes, batch_size=2, seed=0, max_tokens=128, max_images=4, start_batch=start)
        loader = torch.utils.data.DataLoader(SampleGroups(dataset), batch_sampler=sampler,
                                             collate_fn=PackedCollator(tokenizer.pad_token_id, 128, 4))
        return [batch for batch, _ in zip(loader, range(n))]

    full = batches(0, 5)
    for expected, got in zip(full[3:], batches(3, 2)):
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            assert torch.equal(value, got[key]) if isinstance(value, torch.Tensor) else value == got[key], key


def test_training_with_packing_reports_real_tokens_and_padding(tmp_path):
    from nanovlm.training import TrainHooks, train

    steps = {}
    hooks = type("Steps", (TrainHooks,), {"on_step": lambda _, step, m: steps.__setitem__(step, m)})()
    summary = train(*tiny_configs(tmp_path, packing=True, max_training_steps=2, batch_size=2,
                                  shapes_max_objects=3, shapes_question_types="all"), hooks=hooks)
    assert summary["steps"] == 2
    for metrics in steps.values():
        assert 0 <= metrics["padding_fraction"] < 0.5
        assert metrics["samples_per_second"] > 2 * metrics["step_time"] ** -1   # more samples than rows


def test_sizes_count_the_tiles_and_image_string_of_split_images(tiny_cfg):
    from PIL import Image

    from nanovlm.config import image_split_tokens
    from nanovlm.data.processors import get_tokenizer

    tokens = {"image_token": "<|image|>", **image_split_tokens(2)}
    cfg = tiny_cfg.replace(max_img_size=96, vlm_extra_tokens=tokens, extra_token_amount=len(tokens),
                           lm_vocab_size=512 + len(tokens), lm_max_length=512).validate()
    tokenizer = get_tokenizer(cfg.lm_tokenizer, cfg.vlm_extra_tokens, cfg.lm_chat_template)
    texts = [{"user": "Describe the image.", "assistant": "a red circle"}]
    shapes = [[(96, 40)], [(30, 90), (48, 48)], [(20, 20)], []]            # wide, tall + one tile, small, none
    rows = [{"images": [Image.new("RGB", size, "red") for size in sizes], "texts": texts} for sizes in shapes]
    dataset = VQADataset(rows, tokenizer, image_processor_for(cfg), cfg)
    sizes = dataset.sample_sizes()
    assert sizes == [item_size(dataset[k]) for k in range(len(dataset))]
    assert [images for _, images in sizes] == [1, 2, 1, 0]                  # images, not their tiles
    assert [dataset[k]["images"].shape[0] for k in range(len(dataset))] == [3, 4, 1, 0]   # 2 + global; 2 + global, 1
