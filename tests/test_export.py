"""`nanovlm export --format transformers`: transformers loads the directory by itself and computes our
logits (1e-4) and greedy tokens, for our checkpoints and for one written by nanoVLM's own code; its
processor reproduces our pixels where Idefics3's processor can (one tile per image), and the export
says what it cannot reproduce."""

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from nanovlm.cli import main
from nanovlm.config import preset
from nanovlm.data.processors import get_tokenizer, image_processor_for, process_images
from nanovlm.data.prompts import ConversationEncoder
from nanovlm.export.idefics3_processor import FAKE_IMAGE_TOKEN, image_string
from nanovlm.models import VisionLanguageModel
from training_configs import TINY_SETTINGS

REFERENCE = Path(__file__).parent / "data" / "nanovlm_reference"
EXPECTED = json.loads((REFERENCE / "expected.json").read_text())
MODEL_FIELDS = {k: v for k, v in TINY_SETTINGS.items() if k.startswith(("vit_", "lm_"))}


def _load(directory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    return model, AutoProcessor.from_pretrained(directory, backend="pil")   # PIL: nanovlm's resize


def _images():
    """A wide RGB, a tall RGBA and a small greyscale image: one tile each, squashed differently."""
    wide = Image.linear_gradient("L").resize((70, 30)).convert("RGB")
    tall = Image.new("RGBA", (20, 90), (200, 40, 90, 255))
    return [wide, tall, Image.linear_gradient("L").resize((9, 13))]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def ours_exported(request, tmp_path_factory):
    cfg = preset("tiny", **MODEL_FIELDS, lm_tie_weights=request.param)[0]
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg).eval()
    with torch.no_grad():   # fresh inits leave norms at identity and biases at zero: perturb them all
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("ours")
    model.save_pretrained(root / "checkpoint")
    assert main(["export", "--checkpoint", str(root / "checkpoint"), "--format", "transformers",
                 "--output", str(root / "hf")]) == 0
    return model, root / "hf"


def test_transformers_loads_our_export_and_computes_our_logits_and_greedy_tokens(ours_exported):
    model, directory = ours_exported
    cfg = model.cfg
    hf, processor = _load(directory)
    tok = get_tokenizer(cfg.lm_tokenizer, cfg.vlm_extra_tokens, cfg.lm_chat_template)
    pixels, grids = process_images(image_processor_for(cfg), _images()[:1])
    ids = torch.tensor([ConversationEncoder(tok, cfg.mp_image_token_length).prompt_ids("what colour?", grids)])
    with torch.no_grad():
        ours = model(ids, images=pixels)[0]                                         # [1, T, V]
        theirs = hf(input_ids=ids, pixel_values=pixels[None]).logits                # [1, T, V + added]
    assert hf.config.text_config.vocab_size == len(processor.tokenizer) > cfg.lm_vocab_size
    torch.testing.assert_close(theirs[..., :cfg.lm_vocab_size], ours, rtol=0, atol=1e-4)
    # the rows added for Idefics3's processor tokens never win: their logit is the mean of the real ones
    assert (theirs[..., cfg.lm_vocab_size:].max(-1).values < ours.max(-1).values).all()
    greedy = model.generate(ids, images=pixels, max_new_tokens=8, greedy=True)
    out = hf.generate(input_ids=ids, pixel_values=pixels[None], max_new_tokens=8, min_new_tokens=8, do_sample=False,
                      eos_token_id=None)
    assert out[0, ids.shape[1]:].tolist() == greedy[0].tolist()


def test_exported_processor_reproduces_our_pixels_and_prompt_ids(ours_exported):
    model, directory = ours_exported
    cfg = model.cfg
    _, processor = _load(directory)
    images = _images()
    ours, _ = process_images(image_processor_for(cfg), images)
    theirs = processor.image_processor(images, return_tensors="pt").pixel_values    # [1, 3 images, 3, H, W]
    torch.testing.assert_close(theirs[0], ours, rtol=0, atol=1e-6)
    # the prompt the model was trained on: the image string in the text, the tokenizer called apart
    tok = get_tokenizer(cfg.lm_tokenizer, cfg.vlm_extra_tokens, cfg.lm_chat_template)
    expected = ConversationEncoder(tok, cfg.mp_image_token_length).prompt_ids("what colour?", [(1, 1)])
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": image_string(cfg) + "what colour?"}],
                                                   tokenize=False, add_generation_prompt=True)
    assert processor.tokenizer(text, add_special_tokens=False)["input_ids"] == list(expected)


def test_exported_processor_answers_in_one_call_with_idefics3s_prompt(ours_exported):
    model, directory = ours_exported
    hf, processor = _load(directory)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[_images()[0]], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(model.cfg.image_token_id) == model.cfg.mp_image_token_length
    assert ids.count(processor.tokenizer.convert_tokens_to_ids(FAKE_IMAGE_TOKEN)) == 2   # Idefics3's wrapping
    out = hf.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert (directory / "README.md").read_text().count(FAKE_IMAGE_TOKEN) >= 1          # the card says so


@pytest.fixture(scope="module")
def nanovlm_exported(tmp_path_factory):
    """The checkpoint nanoVLM's code wrote, exported; its directory and the export's warnings."""
    out = tmp_path_factory.mktemp("nanovlm") / "hf"
    with pytest.MonkeyPatch.context() as patch:
        err = io.StringIO()
        patch.setattr(sys, "stderr", err)
        assert main(["export", "--checkpoint", str(REFERENCE / "checkpoint"), "--tokenizer",
                     str(REFERENCE / "tokenizer"), "--format", "transformers", "--output", str(out)]) == 0
    return out, err.getvalue()


def test_nanovlm_written_checkpoint_exports_with_its_logits_and_greedy_tokens(nanovlm_exported):
    out, warnings = nanovlm_exported
    assert "Image splitting" in warnings and "global view comes last" in warnings
    hf, processor = _load(out)
    ours = VisionLanguageModel.from_pretrained(REFERENCE / "checkpoint").eval()
    pixels = load_file(REFERENCE / "pixels.safetensors")
    for case in ("wide", "tall", "two"):   # a 1x2 and a 2x2 grid with global views, and two images
        expected = EXPECTED["cases"][case]
        ids = torch.tensor([expected["prompt_ids"]])
        tiles = pixels[f"{case}.pixels"]
        with torch.no_grad():
            theirs = hf(input_ids=ids, pixel_values=tiles[None]).logits[..., :ours.cfg.lm_vocab_size]
            torch.testing.assert_close(theirs, ours(ids, images=tiles)[0], rtol=0, atol=1e-4)
        out_ids = hf.generate(input_ids=ids, pixel_values=tiles[None], max_new_tokens=len(expected["generated_ids"]),
                              min_new_tokens=len(expected["generated_ids"]), do_sample=False, eos_token_id=None)
        assert out_ids[0, ids.shape[1]:].tolist() == expected["generated_ids"], case   # nanoVLM's own tokens


def test_exported_processor_tiles_match_nanovlms_where_its_resize_lands_on_tile_multiples(nanovlm_exported):
    """Split images: Idefics3 first resizes the long side to max_img_size, then to tile multiples; a
    30x10 image lands on 48x16 at once, which is nanoVLM's up-scaling resize: the same three tiles.
    Its global view comes last and is resized from 8-bit pixels: not nanoVLM's."""
    _, processor = _load(nanovlm_exported[0])
    cfg = VisionLanguageModel.from_pretrained(REFERENCE / "checkpoint").cfg
    settings = processor.image_processor
    assert settings.do_image_splitting and settings.size["longest_edge"] == cfg.max_img_size
    theirs = processor.image_processor([Image.open(REFERENCE / "images" / "wide.png").convert("RGB")],
                                       return_tensors="pt")
    ours = load_file(REFERENCE / "pixels.safetensors")["wide.resize_to_max_side_len.pixels"]   # [global, 3 tiles]
    tiles = theirs.pixel_values[0]                                                          # [3 tiles, global]
    assert tiles.shape == ours.shape
    torch.testing.assert_close(tiles[:3], ours[1:], rtol=0, atol=1e-6)
    assert (tiles[3] - ours[0]).abs().max() > 1e-3


@pytest.mark.parametrize("change, message", [({"vit_cls_flag": True}, "vit_cls_flag=True"),
                                             ({"lm_attn_scaling": 0.5}, "lm_attn_scaling=0.5")])
def test_a_setting_idefics3_has_no_equivalent_is_one_line_naming_it(tmp_path, capsys, change, message):
    cfg = preset("tiny", **MODEL_FIELDS, **change)[0]
    VisionLanguageModel(cfg).save_pretrained(tmp_path / "checkpoint")
    assert main(["export", "--checkpoint", str(tmp_path / "checkpoint"), "--format", "transformers",
                 "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Cannot export to Idefics3" in err
    assert not (tmp_path / "hf").exists()
