"""The offline byte-level BPE tokenizer: a normal HF tokenizer directory, exact round trips."""

import json

import pytest
from transformers import AutoTokenizer

from nanovlm.data.shapes import shapes_text_rows
from nanovlm.data.tokenizer_training import train_bpe_tokenizer, train_tokenizer_on_rows

CORPUS = [
    "What colour is the shape? red",
    "Where is the blue star? top left",
    "How many shapes are there? 3",
    "Is there an orange circle? yes",
] * 50


def test_trained_tokenizer_has_exactly_vocab_size_tokens_with_specials_first(tmp_path):
    tokenizer = train_bpe_tokenizer(CORPUS, 300, tmp_path)
    assert len(tokenizer) == 300
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"


def test_autotokenizer_loads_the_saved_directory_with_the_same_ids(tmp_path):
    trained = train_bpe_tokenizer(CORPUS, 300, tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\nWhat colour is the star?<|im_end|>\n"
    assert loaded(text)["input_ids"] == trained(text)["input_ids"]
    assert len(loaded) == 300 and loaded.eos_token_id == 2


@pytest.mark.parametrize("text", [
    "What colour is the shape? red",
    "  unseen words: zebra, Ünïcödé 漢字 and emoji 🟥!\n\ttabs",
    "<|im_start|>assistant\nyes<|im_end|>\n",
])
def test_decode_of_encode_is_the_identity(tmp_path, text):
    train_bpe_tokenizer(CORPUS, 300, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_tokens(tmp_path):
    tokenizer = train_bpe_tokenizer(CORPUS, 300, tmp_path)
    assert tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"] == [2]


def test_training_is_deterministic(tmp_path):
    train_bpe_tokenizer(CORPUS, 300, tmp_path / "a")
    train_bpe_tokenizer(CORPUS, 300, tmp_path / "b")
    a = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    b = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    assert a == b


def test_small_corpus_is_filled_with_reserved_tokens_to_vocab_size(tmp_path):
    tokenizer = train_bpe_tokenizer(["ab ab ab"], 280, tmp_path)
    assert len(tokenizer) == 280
    assert tokenizer.convert_ids_to_tokens(279).startswith("<|reserved_")


def test_shapes_words_become_single_tokens(tmp_path):
    tokenizer = train_tokenizer_on_rows(shapes_text_rows(500), 512, tmp_path)
    for word in ["colour", "triangle", "diamond", "purple"]:
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


def test_too_small_vocab_and_unknown_eos_are_rejected_with_the_field_named(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer(CORPUS, 100, tmp_path)
    with pytest.raises(ValueError, match="eos_token='<eos>'"):
        train_bpe_tokenizer(CORPUS, 300, tmp_path, eos_token="<eos>")


def test_a_tokenizer_trained_on_a_local_dataset_serves_get_tokenizer(tmp_path):
    from datasets import Dataset
    from PIL import Image

    from nanovlm.config import CHATML_TEMPLATE, TrainConfig
    from nanovlm.data import get_tokenizer
    from nanovlm.data.datasets import train_tokenizer_for_dataset

    rows = [{"images": [Image.new("RGB", (8, 8))], "texts": [{"user": f"What is item {i}?", "assistant": "a widget"}]}
            for i in range(20)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "data"))
    cfg = TrainConfig(train_dataset_path=str(tmp_path / "data"))
    train_tokenizer_for_dataset(cfg, 300, tmp_path / "tok")
    tokenizer = get_tokenizer(str(tmp_path / "tok"), {"image_token": "<|image|>"}, CHATML_TEMPLATE)
    assert tokenizer.image_token_id == 300
    assert len(tokenizer(" widget", add_special_tokens=False)["input_ids"]) == 1
