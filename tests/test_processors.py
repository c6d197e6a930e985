"""get_tokenizer (VLM special tokens after the base vocabulary, shapes-bpe cache) and the image processor."""

import numpy as np
import pytest
import torch
from PIL import Image

from nanovlm.config import CHATML_TEMPLATE
from nanovlm.data import processors
from nanovlm.data.processors import ensure_shapes_tokenizer, get_image_processor, get_tokenizer
from nanovlm.data.tokenizer_training import train_bpe_tokenizer


def test_image_token_id_matches_the_tiny_config(tokenizer, tiny_cfg):
    assert tokenizer.image_token == "<|image|>"
    assert tokenizer.image_token_id == tiny_cfg.image_token_id == 512
    assert len(tokenizer) == tiny_cfg.lm_vocab_size


def test_every_extra_token_gets_the_next_id_and_an_attribute(tmp_path):
    train_bpe_tokenizer(["some text to learn from"] * 10, 300, tmp_path)
    extra = {"image_token": "<|image|>", "global_image_token": "<|global_image|>"}
    tokenizer = get_tokenizer(str(tmp_path), extra, CHATML_TEMPLATE)
    assert tokenizer.image_token_id == 300
    assert tokenizer.global_image_token == "<|global_image|>" and tokenizer.global_image_token_id == 301
    assert tokenizer("<|image|><|image|>hi", add_special_tokens=False)["input_ids"][:2] == [300, 300]


def test_shapes_tokenizer_ends_turns_with_im_end_and_pads_with_endoftext(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizers_are_cached_per_arguments(tiny_cfg, tokenizer):
    again = get_tokenizer(tiny_cfg.lm_tokenizer, dict(tiny_cfg.vlm_extra_tokens), tiny_cfg.lm_chat_template)
    assert again is tokenizer
    other = get_tokenizer(tiny_cfg.lm_tokenizer, {"image_token": "<|img|>"}, tiny_cfg.lm_chat_template)
    assert other is not tokenizer and other.image_token == "<|img|>"


def test_shapes_tokenizer_is_built_under_nanovlm_cache_once(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLM_CACHE", str(tmp_path))
    directory = ensure_shapes_tokenizer(512)
    assert directory == tmp_path / "tokenizers" / "shapes-bpe-512"
    mtime = (directory / "tokenizer.json").stat().st_mtime_ns
    assert ensure_shapes_tokenizer(512) == directory
    assert (directory / "tokenizer.json").stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == ["shapes-bpe-512"]  # no temp dirs left


def test_shapes_tokenizer_build_is_deterministic(tmp_path):
    a = ensure_shapes_tokenizer(512, root=tmp_path / "a")
    b = ensure_shapes_tokenizer(512, root=tmp_path / "b")
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_a_stale_cached_tokenizer_is_rebuilt(tmp_path):
    directory = ensure_shapes_tokenizer(512, root=tmp_path)
    (directory / processors._MARKER).write_text('{"shapes_data_version": "old"}')
    assert ensure_shapes_tokenizer(512, root=tmp_path) == directory
    assert "old" not in (directory / processors._MARKER).read_text()


def test_unknown_tokenizer_error_names_the_fields(tmp_path):
    with pytest.raises(OSError, match="lm_tokenizer"):
        get_tokenizer(str(tmp_path / "missing"), {"image_token": "<|image|>"}, CHATML_TEMPLATE)


def test_image_processor_matches_a_manual_reference():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    out, grid = get_image_processor(32, 32, mean=0.5, std=0.5)(image)   # one tile: squashed to a square
    reference = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    reference = (reference - 0.5) / 0.5
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32 and grid == (1, 1)
    torch.testing.assert_close(out[0], torch.from_numpy(reference).permute(2, 0, 1), rtol=0, atol=1e-6)


def test_image_processor_converts_to_rgb_and_uses_mean_and_std():
    image = Image.new("L", (8, 8), 51)  # grey 0.2
    out, _ = get_image_processor(8, 8, mean=0.1, std=0.5)(image)
    torch.testing.assert_close(out[0, :, 0, 0], torch.full((3,), (0.2 - 0.1) / 0.5), rtol=0, atol=1e-6)
    assert out.shape == (1, 3, 8, 8)


def _build_in_child(root, queue):
    queue.put(str(ensure_shapes_tokenizer(512, root=root)))


def test_concurrent_builders_both_get_one_complete_directory(tmp_path):
    import multiprocessing
    from transformers import AutoTokenizer
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_build_in_child, args=(tmp_path, queue)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0, 0]
    results = {queue.get(timeout=5) for _ in children}
    assert results == {str(tmp_path / "tokenizers" / "shapes-bpe-512")}
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == ["shapes-bpe-512"]
    assert len(AutoTokenizer.from_pretrained(results.pop())) == 512
