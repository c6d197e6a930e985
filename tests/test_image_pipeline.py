"""The image pipeline (docs/data.md): nanoVLM's resize, tiles, global view and image string.

The reference in tests/data/nanovlm_reference/ was produced by the published nanoVLM's own
processor, image string, model and generate path (its README says how); `nanovlm generate
--greedy` on the same checkpoint must give the same prompt ids, pixels and text. The unit tests
below check the rules against hand-computed cases.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from nanovlm.config import image_split_tokens, nanovlm_extra_tokens, preset
from nanovlm.data import VQACollator, VQADataset, get_tokenizer
from nanovlm.data.processors import (get_image_processor, get_image_string, image_processor_for, resized_size,
                                     split_into_tiles, tiles_with_global_view)
from nanovlm.models import VisionLanguageModel

REFERENCE = Path(__file__).parent / "data" / "nanovlm_reference"
EXPECTED = json.loads((REFERENCE / "expected.json").read_text())


@pytest.fixture(scope="module")
def reference_pixels():
    return load_file(REFERENCE / "pixels.safetensors")


@pytest.fixture(scope="module")
def reference_tokenizer():
    cfg = VisionLanguageModel.from_pretrained(REFERENCE / "checkpoint").cfg
    return cfg, get_tokenizer(str(REFERENCE / "tokenizer"), cfg.vlm_extra_tokens, cfg.lm_chat_template)


# ---------------------------------------------------------------- against nanoVLM's own outputs

@pytest.mark.parametrize("case", sorted(EXPECTED["cases"]))
def test_generate_gives_nanovlms_prompt_pixels_and_text(case, reference_pixels, monkeypatch, capsys):
    from nanovlm.cli import main

    expected = EXPECTED["cases"][case]
    fed = {}
    generate = VisionLanguageModel.generate

    def recording_generate(self, input_ids, images=None, *args, **kwargs):
        fed.update(input_ids=input_ids, images=images)
        return generate(self, input_ids, images, *args, **kwargs)

    monkeypatch.setattr(VisionLanguageModel, "generate", recording_generate)
    command = ["generate", "--checkpoint", str(REFERENCE / "checkpoint"), "--tokenizer", str(REFERENCE / "tokenizer"),
               "--prompt", EXPECTED["prompt"], "--max-new-tokens", str(EXPECTED["max_new_tokens"]), "--greedy",
               "--device", "cpu"]
    for name in expected["images"]:
        command += ["--image", str(REFERENCE / "images" / f"{name}.png")]
    assert main(command) == 0
    assert fed["input_ids"].tolist() == [expected["prompt_ids"]]
    torch.testing.assert_close(fed["images"], reference_pixels[f"{case}.pixels"], rtol=0, atol=1e-6)
    assert capsys.readouterr().out == expected["text"].strip() + "\n"


@pytest.mark.parametrize("name", sorted(EXPECTED["processor_resize_to_max_side_len"]))
def test_upscaling_processor_and_image_string_match_nanovlm(name, reference_pixels, reference_tokenizer):
    cfg, tokenizer = reference_tokenizer
    expected = EXPECTED["processor_resize_to_max_side_len"][name]
    processor = image_processor_for(cfg.replace(resize_to_max_side_len=True))
    pixels, grid = processor(Image.open(REFERENCE / "images" / f"{name}.png"))
    assert list(grid) == expected["grid"]
    torch.testing.assert_close(pixels, reference_pixels[f"{name}.resize_to_max_side_len.pixels"], rtol=0, atol=1e-6)
    string = get_image_string(tokenizer, [grid], cfg.mp_image_token_length)
    assert tokenizer(string, add_special_tokens=False)["input_ids"] == expected["image_string_ids"]


# ---------------------------------------------------------------- the resize rules

@pytest.mark.parametrize("height,width,up,expected", [
    (10, 30, False, (16, 32)),    # long side up to the next tile multiple; short side rounded up
    (10, 30, True, (16, 48)),     # long side always max_img_size
    (25, 13, False, (32, 32)),    # 13 * 32/25 = 16.6 px -> 2 tiles
    (11, 15, False, (16, 16)),    # one tile
    (11, 15, True, (48, 48)),     # up-scaled: 11 * 3.2 = 35.2 px -> 3 tiles
    (50, 75, False, (32, 48)),    # down-scaled to max_img_size
    (2, 75, False, (16, 48)),     # the short side is at least one tile
    (32, 48, False, (32, 48)),    # already whole tiles: unchanged
    (187, 187, False, (64, 48)),  # 187 * (48 / 187) / 16 = 3.0000000000000004 -> 4 tiles, as nanoVLM rounds
])
def test_resized_size_follows_nanovlms_rounding(height, width, up, expected):
    assert resized_size(height, width, tile=16, max_img_size=48, resize_to_max_side_len=up) == expected


def test_without_splitting_every_image_is_squashed_into_one_tile():
    for height, width in ((10, 30), (90, 20), (16, 16)):
        assert resized_size(height, width, tile=16, max_img_size=16) == (16, 16)
        assert resized_size(height, width, tile=16, max_img_size=16, resize_to_max_side_len=True) == (16, 16)


# ---------------------------------------------------------------- tiles and the global view

def test_tiles_are_cut_row_major():
    pixels = torch.arange(2 * 3, dtype=torch.float32).view(1, 2, 3).repeat_interleave(4, 1).repeat_interleave(4, 2)
    pixels = pixels.expand(3, -1, -1)                                    # [3, 8, 12]: tile (i, j) holds 3i + j
    tiles, grid = split_into_tiles(pixels, 4)
    assert grid == (2, 3) and tiles.shape == (6, 3, 4, 4)
    assert [float(t[0, 0, 0]) for t in tiles] == [0, 1, 2, 3, 4, 5]
    assert all(bool((t == t[0, 0, 0]).all()) for t in tiles)


def test_the_global_view_comes_first_and_only_with_several_tiles():
    pixels = torch.rand(3, 8, 12)
    tiles, grid = tiles_with_global_view(pixels, 4)
    assert grid == (2, 3) and tiles.shape == (7, 3, 4, 4)
    expected_global = F.interpolate(pixels[None], size=(4, 4), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(tiles[0], expected_global)
    torch.testing.assert_close(tiles[1:], split_into_tiles(pixels, 4)[0], rtol=0, atol=0)
    one, grid = tiles_with_global_view(torch.rand(3, 4, 4), 4)
    assert grid == (1, 1) and one.shape == (1, 3, 4, 4)
    assert tiles_with_global_view(pixels, 4, with_global_view=False)[0].shape == (6, 3, 4, 4)


def test_the_global_view_of_a_flat_image_is_flat():
    image = Image.new("RGB", (40, 12), (51, 102, 204))
    tiles, grid = get_image_processor(48, 16)(image)                      # -> 16x48: 1x3 tiles + global
    assert grid == (1, 3) and tiles.shape == (4, 3, 16, 16)
    for channel, value in enumerate((0.2, 0.4, 0.8)):
        torch.testing.assert_close(tiles[:, channel], torch.full((4, 16, 16), value), rtol=0, atol=1e-6)


def test_processor_pixels_are_nanovlms_0_to_1_unless_the_config_says_otherwise():
    image = Image.new("RGB", (16, 16), (255, 0, 0))
    nanovlm, _ = get_image_processor(16, 16)(image)
    assert (float(nanovlm[0, 0, 0, 0]), float(nanovlm[0, 1, 0, 0])) == (1.0, 0.0)
    tiny, _ = image_processor_for(preset("tiny")[0])(image)               # vit_img_mean = vit_img_std = 0.5
    assert (float(tiny[0, 0, 0, 0]), float(tiny[0, 1, 0, 0])) == (1.0, -1.0)


def test_the_grid_is_known_from_the_size_alone():
    processor = get_image_processor(48, 16, resize_to_max_side_len=True)
    for width, height in ((30, 10), (13, 25), (187, 187)):
        assert processor.grid(width, height) == processor(Image.new("RGB", (width, height)))[1]


# ---------------------------------------------------------------- the image string

TOKENS = SimpleNamespace(**nanovlm_extra_tokens())
I4 = "<|image|>" * 4


@pytest.mark.parametrize("grids,expected", [
    ([(1, 1)], "<|global_image|>" + I4),
    ([(1, 2)], "<|global_image|>" + I4 + "<row_1_col_1>" + I4 + "<row_1_col_2>" + I4),
    ([(2, 1)], "<|global_image|>" + I4 + "<row_1_col_1>" + I4 + "<row_2_col_1>" + I4),
    ([(1, 1), (1, 2)], "<image: 0><|global_image|>" + I4 + "<image: 1><|global_image|>" + I4
                       + "<row_1_col_1>" + I4 + "<row_1_col_2>" + I4),
])
def test_image_string_is_nanovlms(grids, expected):
    assert get_image_string(TOKENS, grids, 4) == expected


def test_image_string_without_a_global_token_names_every_tile():
    # nanoVLM between image splitting and the global view: r{i}c{j} even for one tile.
    tokens = SimpleNamespace(image_token="<|image|>", **{k: v for k, v in image_split_tokens(2).items()
                                                          if k != "global_image_token"})
    assert get_image_string(tokens, [(1, 1)], 4) == "<row_1_col_1>" + I4
    assert get_image_string(tokens, [(1, 2)], 4) == "<row_1_col_1>" + I4 + "<row_1_col_2>" + I4


def test_image_string_of_a_model_without_split_tokens_is_its_image_tokens():
    # nanoVLM before image splitting, and the tiny preset.
    assert get_image_string(SimpleNamespace(image_token="<|image|>"), [(1, 1)], 4) == I4


# ---------------------------------------------------------------- several images, end to end

@pytest.fixture(scope="module")
def splitting_cfg():
    """The tiny preset with images split into up to 2x2 tiles of 48 px and nanoVLM's tokens."""
    vlm, train = preset("tiny", max_img_size=96, vlm_extra_tokens=nanovlm_extra_tokens(), vit_n_blocks=1,
                        lm_n_blocks=1, lm_max_length=256, max_images_per_example=2)
    return vlm.validate(), train


def _rows():
    wide, tall, small = Image.new("RGB", (90, 40), (200, 0, 0)), Image.new("RGB", (30, 70), (0, 0, 200)), Image.new(
        "RGB", (20, 20))
    return [{"images": [wide, tall], "texts": [{"user": "Which is red?", "assistant": "the first"}]},
            {"images": [small], "texts": [{"user": "What is it?", "assistant": "dark"}]},
            {"images": [small, small, small], "texts": [{"user": "Too many?", "assistant": "yes"}]}]


def test_several_images_per_sample_train_in_order(splitting_cfg):
    vlm, train = splitting_cfg
    tokenizer = get_tokenizer(vlm.lm_tokenizer, vlm.vlm_extra_tokens, vlm.lm_chat_template)
    dataset = VQADataset(_rows(), tokenizer, None, vlm, max_images=train.max_images_per_example)
    assert len(dataset) == 2 and dataset.skipped == {"too_many_images": 1}
    item = dataset[0]
    assert item["grids"] == [(1, 2), (2, 1)]                       # 48x96 and 96x48 px
    processor = image_processor_for(vlm)
    first, second = (processor(image)[0] for image in _rows()[0]["images"])
    assert torch.equal(item["images"], torch.cat([first, second]))  # global view, tiles; then the next image
    text = tokenizer.decode(item["input_ids"])
    assert text.index("<image: 0>") < text.index("<image: 1>") < text.index("Which is red?")
    assert text.count("<|global_image|>") == 2 and text.count("<row_2_col_1>") == 1

    batch = VQACollator(tokenizer, vlm.lm_max_length)([dataset[0], dataset[1]])
    assert batch["images"].shape == (6 + 1, 3, 48, 48)
    torch.manual_seed(0)
    model = VisionLanguageModel(vlm)
    _, loss = model(batch["input_ids"], batch["images"], attention_mask=batch["attention_mask"],
                    targets=batch["labels"])
    loss.backward()
    assert torch.isfinite(loss) and model.vision_encoder.patch_embedding.conv.weight.grad.abs().sum() > 0


def test_the_benchmark_batch_uses_the_same_pipeline(splitting_cfg):
    from nanovlm.bench.harness import synthetic_batch

    vlm, _ = splitting_cfg
    batch = synthetic_batch(vlm, batch_size=2, text_tokens=5, n_images=2, image_size=(40, 90))
    assert batch.n_tiles == 2 * (1 + 2) and batch.images.shape == (2 * 6, 3, 48, 48)
    tokenizer = get_tokenizer(vlm.lm_tokenizer, vlm.vlm_extra_tokens, vlm.lm_chat_template)
    special = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(list(vlm.vlm_extra_tokens.values())))
    string = get_image_string(tokenizer, [(1, 2), (1, 2)], vlm.mp_image_token_length)
    expected = [i for i in tokenizer(string, add_special_tokens=False)["input_ids"] if i in special]
    got = [i for i in batch.input_ids[0, :-5].tolist() if i in special]
    assert got == expected                                          # the same special tokens, in order
    VisionLanguageModel(vlm)(batch.input_ids, batch.images, targets=batch.targets)


def test_training_and_evaluation_run_on_split_images(tmp_path):
    from nanovlm.training import train
    from training_configs import tiny_configs

    vlm, train_cfg = tiny_configs(tmp_path, max_img_size=64, resize_to_max_side_len=True,
                                  vlm_extra_tokens=nanovlm_extra_tokens(), max_training_steps=2, eval_interval=2)
    assert vlm.lm_vocab_size == 512 + 66
    summary = train(vlm, train_cfg)
    assert summary["steps_this_run"] == 2 and 0 <= summary["val_accuracy"] <= 1
    # each 32 px shapes image became 2x2 tiles of 32 px and a global view
    assert summary["images_per_second"] / summary["samples_per_second"] == pytest.approx(5)


def test_image_tokens_in_the_text_are_removed(splitting_cfg):
    vlm, _ = splitting_cfg
    tokenizer = get_tokenizer(vlm.lm_tokenizer, vlm.vlm_extra_tokens, vlm.lm_chat_template)
    rows = [{"images": [Image.new("RGB", (20, 20))], "texts": [{"user": "<|image|>What?", "assistant": "a <|image|>"},
                                                               {"user": "And <|image|>?", "assistant": "b"}]}]
    item = VQADataset(rows, tokenizer, None, vlm)[0]
    assert int((item["input_ids"] == vlm.image_token_id).sum()) == vlm.mp_image_token_length   # one tile
