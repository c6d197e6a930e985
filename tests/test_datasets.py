"""Rows -> VQADataset: masked labels, prompts, dropping and counting bad rows, sharding, loading."""

import json

import datasets
import pytest
import torch
from PIL import Image

from nanovlm.config import preset
from nanovlm.data import VQADataset, build_datasets, get_tokenizer, image_processor_for, normalize_answer
from nanovlm.data.datasets import load_rows
from nanovlm.data.shapes import ShapesRows

IGNORE = -100


@pytest.fixture(scope="module")
def cfgs():
    return preset("tiny", shapes_train_size=60, shapes_eval_size=20)


@pytest.fixture(scope="module")
def tokenizer(cfgs):
    vlm, _ = cfgs
    return get_tokenizer(vlm.lm_tokenizer, vlm.vlm_extra_tokens, vlm.lm_chat_template)


def make_dataset(rows, tokenizer, vlm, **kwargs):
    return VQADataset(rows, tokenizer, image_processor_for(vlm), vlm, **kwargs)


def image(colour=(255, 0, 0)):
    return Image.new("RGB", (16, 16), colour)


def test_labels_are_exactly_the_answer_tokens_and_the_end_token(cfgs, tokenizer):
    vlm, _ = cfgs
    dataset = make_dataset(ShapesRows("train", 30), tokenizer, vlm)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for item in (dataset[i] for i in range(len(dataset))):
        expected = tokenizer(item["answer"], add_special_tokens=False)["input_ids"] + [end]
        labels, ids = item["labels"], item["input_ids"]
        supervised = (labels != IGNORE).nonzero().flatten()
        assert labels[supervised].tolist() == expected
        # contiguous, right after the prompt, and shifted: position t is trained to predict t + 1
        start = len(item["prompt_ids"]) - 1
        assert supervised.tolist() == list(range(start, start + len(expected)))
        assert torch.equal(labels[supervised], ids[supervised + 1])
        assert labels[-1] == IGNORE


def test_prompt_ids_are_the_generation_prompt_with_image_placeholders(cfgs, tokenizer):
    vlm, _ = cfgs
    row = ShapesRows("train", 1)[0]
    item = make_dataset([row], tokenizer, vlm)[0]
    user = tokenizer.image_token * vlm.mp_image_token_length + row["texts"][0]["user"]
    reference = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                              add_generation_prompt=True)
    assert item["prompt_ids"].tolist() == tokenizer(reference, add_special_tokens=False)["input_ids"]
    assert torch.equal(item["input_ids"][:len(item["prompt_ids"])], item["prompt_ids"])
    assert int((item["input_ids"] == vlm.image_token_id).sum()) == vlm.mp_image_token_length
    assert item["images"].shape == (1, 3, vlm.vit_img_size, vlm.vit_img_size)
    assert item["attention_mask"].tolist() == [1] * len(item["input_ids"])


def test_every_answer_of_a_multi_turn_row_is_labelled(cfgs, tokenizer):
    vlm, _ = cfgs
    row = {"images": [image(), image((0, 0, 255))],
           "texts": [{"user": "What colour is it?", "assistant": "red"},
                     {"user": "And the other?", "assistant": "blue"}]}
    item = make_dataset([row], tokenizer, vlm)[0]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    supervised = item["labels"][item["labels"] != IGNORE].tolist()
    red, blue = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("red", "blue"))
    assert supervised == red + [end] + blue + [end]
    assert item["answer"] == "blue" and item["question_type"] == "default"
    assert int((item["input_ids"] == vlm.image_token_id).sum()) == 2 * vlm.mp_image_token_length
    assert item["images"].shape[0] == 2


def test_samples_longer_than_lm_max_length_are_dropped_and_counted(cfgs, tokenizer):
    vlm, _ = cfgs
    short = {"images": [image()], "texts": [{"user": "Colour?", "assistant": "red"}]}
    long = {"images": [image()], "texts": [{"user": "Describe.", "assistant": " and ".join(["a small red star"] * 40)}]}
    dataset = make_dataset([short, long, short], tokenizer, vlm)
    assert len(dataset) == 2 and dataset.skipped["too_long"] == 1 and dataset.num_skipped == 1
    assert all(len(dataset[i]["input_ids"]) <= vlm.lm_max_length for i in range(len(dataset)))


def test_rows_without_usable_turns_are_skipped_and_counted(cfgs, tokenizer):
    vlm, _ = cfgs
    rows = [{"images": [image()], "texts": []},
            {"images": [image()], "texts": [{"user": "Colour?", "assistant": "  "}]},
            {"images": [image()], "texts": [{"user": "Colour?", "assistant": "red"}]},
            {"image": image(), "question": "Colour?", "answer": "red"}]  # accepted column variant
    dataset = make_dataset(rows, tokenizer, vlm)
    assert dataset.indices == [2, 3] and dataset.skipped["no_usable_turns"] == 2


def write_imagefolder(directory, broken: set[int], n: int = 6):
    directory.mkdir()
    lines = []
    for i in range(n):
        name = f"img{i}.png"
        if i in broken:
            (directory / name).write_bytes(b"this is not a png")
        else:
            image((40 * i, 0, 0)).save(directory / name)
        lines.append(json.dumps({"file_name": name, "texts": [{"user": "Colour?", "assistant": f"c{i}"}]}))
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_corrupt_images_in_an_imagefolder_are_skipped_and_counted(cfgs, tokenizer, tmp_path):
    vlm, train = cfgs
    write_imagefolder(tmp_path / "folder", broken={1, 4})
    splits = build_datasets(vlm, train.replace(train_dataset_path=str(tmp_path / "folder"), val_ratio=0.0),
                            tokenizer)
    assert splits.val is None
    assert len(splits.train) == 4 and splits.train.skipped["unreadable_image"] == 2
    assert sorted(splits.train[i]["answer"] for i in range(4)) == ["c0", "c2", "c3", "c5"]


def test_corrupt_images_in_parquet_are_skipped_and_counted(cfgs, tokenizer, tmp_path):
    vlm, train = cfgs
    buffer = tmp_path / "ok.png"
    image().save(buffer)
    good = {"bytes": buffer.read_bytes(), "path": None}
    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  "texts": datasets.List({"user": datasets.Value("string"),
                                                          "assistant": datasets.Value("string")})})
    table = datasets.Dataset.from_dict({
        "images": [[good], [{"bytes": b"garbage", "path": None}], [good]],
        "texts": [[{"user": "Colour?", "assistant": a}] for a in ("red", "broken", "blue")],
    }, features=features)
    table.to_parquet(str(tmp_path / "data.parquet"))
    splits = build_datasets(vlm, train.replace(train_dataset_path=str(tmp_path / "data.parquet"), val_ratio=0.0),
                            tokenizer)
    assert len(splits.train) == 2 and splits.train.skipped["unreadable_image"] == 1


def test_an_image_that_fails_lazily_is_replaced_by_the_next_row_and_counted(cfgs, tokenizer, tmp_path):
    vlm, _ = cfgs
    write_imagefolder(tmp_path / "folder", broken={1}, n=3)
    rows = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "folder"))["train"]
    dataset = make_dataset(rows, tokenizer, vlm, verify_images=False)
    assert len(dataset) == 3
    assert dataset[1]["answer"] == "c2" and dataset.skipped_at_load == 1


def test_a_saved_validation_split_is_used_else_val_ratio(cfgs, tokenizer, tmp_path):
    vlm, train = cfgs
    rows = [{"images": [image()], "texts": [{"user": "Colour?", "assistant": f"a{i}"}]} for i in range(10)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:7]),
                          "validation": datasets.Dataset.from_list(rows[7:])}).save_to_disk(str(tmp_path / "dd"))
    train_rows, val_rows, local = load_rows(train.replace(train_dataset_path=str(tmp_path / "dd")))
    assert (len(train_rows), len(val_rows), local) == (7, 3, True)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    train_rows, val_rows, _ = load_rows(train.replace(train_dataset_path=str(tmp_path / "single"), val_ratio=0.2))
    assert (len(train_rows), len(val_rows)) == (8, 2)
    assert not {r["texts"][0]["assistant"] for r in train_rows} & {r["texts"][0]["assistant"] for r in val_rows}


def test_rank_shards_are_disjoint_and_equally_long(cfgs, tokenizer):
    vlm, train = cfgs
    shards = [build_datasets(vlm, train, tokenizer, rank=r, world_size=4) for r in range(4)]
    indices = [set(s.train.indices) for s in shards]
    assert [len(s.train) for s in shards] == [60 // 4] * 4
    assert set.union(*indices) <= set(range(60))
    assert all(not (a & b) for i, a in enumerate(indices) for b in indices[i + 1:])
    assert all(len(s.val) == 20 and (s.sampler_rank, s.sampler_world_size) == (0, 1) for s in shards)


def test_build_datasets_on_shapes_unpacks_as_train_and_val(cfgs, tokenizer):
    vlm, train = cfgs
    train_ds, val_ds = build_datasets(vlm, train.replace(data_cutoff_idx=25), tokenizer)
    assert len(train_ds) == 25 and len(val_ds) == 20
    assert train_ds[0]["question_type"] in train.shapes_question_types or train.shapes_question_types == "all"


def test_a_tokenizer_whose_image_token_id_differs_from_the_config_is_rejected(cfgs, tokenizer):
    vlm, train = cfgs
    with pytest.raises(ValueError, match="lm_base_vocab_size"):
        build_datasets(vlm.replace(lm_base_vocab_size=1000, lm_vocab_size=1001), train, tokenizer)


@pytest.mark.parametrize("raw, normalised", [
    ("Red.", "red"), ("  The  top   left! ", "top left"), ("a large red circle", "large red circle"),
    ("Yes", "yes"), ("3", "3"), ("an orange star in the middle", "orange star in middle"),
])
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_a_dataset_survives_pickling_for_spawned_workers(cfgs, tokenizer):
    import pickle
    vlm, _ = cfgs
    dataset = make_dataset(ShapesRows("train", 5), tokenizer, vlm)
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[3]["input_ids"], dataset[3]["input_ids"])
    assert torch.equal(clone[3]["images"], dataset[3]["images"])


def test_a_dataset_with_no_usable_rows_fails_early_naming_the_path(cfgs, tokenizer, tmp_path):
    vlm, train = cfgs
    datasets.Dataset.from_list([{"images": [image()], "texts": []}] * 3).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="empty.*0 usable.*no_usable_turns"):
        build_datasets(vlm, train.replace(train_dataset_path=str(tmp_path / "empty"), val_ratio=0.0), tokenizer)
