"""Every accepted row format makes the same samples, map-style and streamed (docs/data.md,
Formats): the_cauldron / FineVision rows and their rating filters, weighted mixtures, LLaVA JSON
and JSONL, parquet and CSV with image paths. Bad rows are skipped and counted by reason; a
dataset without a usable row is one error before training."""

import json
from collections import Counter

import datasets
import pandas as pd
import pytest
import torch
from PIL import Image

from data_files import COLOURS, answer, cauldron_rows, write_images, write_jsonl, write_parquet
from nanovlm.cli import main
from nanovlm.data import VQACollator, build_datasets, get_tokenizer, image_processor_for
from nanovlm.data.streaming import StreamItems
from training_configs import set_arguments, tiny_configs

MODES = pytest.mark.parametrize("stream", [False, True], ids=["map-style", "streamed"])


@pytest.fixture
def no_progress_bars():
    """`datasets` draws progress bars on stderr: off, so that stderr holds only what a command prints."""
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def first_items(tmp_path, path, stream: bool, n: int, **changes):
    """(the first `n` training items, the rows skipped by reason) of the dataset at `path`. Streamed,
    one row a batch: the first window (4 rows) reads the rows in file order until 4 are usable."""
    vlm, cfg = tiny_configs(tmp_path / "out", train_dataset_path=str(path), stream_dataset=stream, val_ratio=0.0,
                            batch_size=1, **changes)
    tokenizer = get_tokenizer(vlm.lm_tokenizer, vlm.vlm_extra_tokens, vlm.lm_chat_template)
    train = build_datasets(vlm, cfg, tokenizer).train
    if not stream:
        assert len(train) == n
        return [train[k] for k in range(n)], train.skipped, tokenizer
    _, sampler, _ = train.loader_parts(VQACollator(tokenizer, vlm.lm_max_length))
    batches, items = iter(sampler), StreamItems(train.builder)
    return [items[next(batches)[0]] for _ in range(n)], sampler.skipped, tokenizer


def assert_colour_samples(items, tokenizer):
    """Each item's answer is its image's colour, and its pixels are that image's, processed."""
    processor = image_processor_for(tiny_configs("unused")[0])
    for item in items:
        assert item["answer"] in COLOURS, item["answer"]
        tiles, _ = processor(Image.new("RGB", (8, 8), COLOURS[item["answer"]]))
        assert torch.equal(item["images"][0], tiles[0])
        answer_ids = item["input_ids"][item["labels"].roll(1) != -100]   # the labelled positions' tokens
        assert item["answer"] in tokenizer.decode(answer_ids)


# ---------------------------------------------------------------------------------- formats

@MODES
def test_the_cauldron_rows_with_embedded_images(tmp_path, stream):
    rows = [{"images": [Image.new("RGB", (8, 8), COLOURS[answer(i)])],
             "texts": [{"user": "What colour is it?", "assistant": answer(i)}]} for i in range(4)]
    features = datasets.Features({"images": datasets.Sequence(datasets.Image()),
                                  "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string")}]})
    datasets.Dataset.from_list(rows, features=features).to_parquet(tmp_path / "cauldron.parquet")
    items, skipped, tokenizer = first_items(tmp_path, tmp_path / "cauldron.parquet", stream, 4)
    assert not skipped and Counter(i["answer"] for i in items) == Counter(answer(i) for i in range(4))
    assert_colour_samples(items, tokenizer)


RATINGS = ["relevance", "image_correspondence", "visual_dependency", "formatting"]


@pytest.mark.parametrize("rating", RATINGS)
@MODES
def test_finevision_min_rating_drops_lower_rated_turns_and_rows(tmp_path, stream, rating):
    # nanoVLM's filter: a turn whose <name>_ratings entry is below <name>_min_rating is left out;
    # a row with no turn left is skipped (here: counted as low_rating)
    write_images(tmp_path)
    turns = [{"user": f"question {k}?", "assistant": f"answer{k}"} for k in range(3)]
    rows = [{"images": ["red.png"], "texts": turns, **{f"{r}_ratings": [5, 5, 5] for r in RATINGS}}
            for _ in range(5)]
    for row in rows[1:]:
        row[f"{rating}_ratings"] = [4, 2, 3]          # the middle turn is rated below 3
    rows[0][f"{rating}_ratings"] = [1, 2, 2]          # every turn below 3
    write_jsonl(tmp_path / "finevision.jsonl", rows)
    items, skipped, tokenizer = first_items(tmp_path, tmp_path / "finevision.jsonl", stream, 4,
                                            **{f"{rating}_min_rating": 3})
    assert skipped == {"low_rating": 1}
    for item in items:
        text = tokenizer.decode(item["input_ids"])
        assert "question 0?" in text and "question 2?" in text and "question 1?" not in text
        assert item["answer"] == "answer2"


@MODES
def test_a_weighted_mixture_draws_each_dataset_by_its_weight(tmp_path, stream):
    first = write_parquet(tmp_path / "a" / "rows.parquet", 400)
    second = write_parquet(tmp_path / "b" / "rows.parquet", 400, first_id=10_000)
    vlm, cfg = tiny_configs(tmp_path / "out", train_dataset_path=f"{first},{second}", train_dataset_weights="3,1",
                            stream_dataset=stream, val_ratio=0.0, batch_size=8)
    tokenizer = get_tokenizer(vlm.lm_tokenizer, vlm.vlm_extra_tokens, vlm.lm_chat_template)
    train = build_datasets(vlm, cfg, tokenizer).train
    if not stream:   # an epoch holds round(800 * 3/4) samples of the first and 200 of the second
        assert Counter(part for part, _ in train.index) == {0: 600, 1: 200}
        assert len(set(train.index)) == 400 + 200     # the first repeats its rows, the second gives a subset
        return
    _, sampler, _ = train.loader_parts(VQACollator(tokenizer, vlm.lm_max_length))
    batches = iter(sampler)
    ids = [row["id"] for _ in range(500) for row in next(batches)]   # 4,000 draws
    share = sum(i < 10_000 for i in ids) / len(ids)
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / len(ids)) ** 0.5, share   # 4 standard deviations


def llava_rows():
    """LLaVA conversations, two turns, `<image>` in the first question, paths relative to the file."""
    return [{"id": str(i), "image": f"imgs/{answer(i)}.png",
             "conversations": [{"from": "human", "value": "<image>\nDescribe the picture."},
                               {"from": "gpt", "value": "A square."},
                               {"from": "human", "value": "What colour is it?"},
                               {"from": "gpt", "value": answer(i)}]} for i in range(4)]


@pytest.mark.parametrize("suffix", ["json", "jsonl"])
@MODES
def test_llava_conversations_with_image_paths_relative_to_the_file(tmp_path, stream, suffix):
    write_images(tmp_path / "data" / "imgs")
    path = tmp_path / "data" / f"llava.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(llava_rows()))
    else:
        write_jsonl(path, llava_rows())
    items, skipped, tokenizer = first_items(tmp_path, path, stream, 4)
    assert not skipped
    assert_colour_samples(items, tokenizer)
    for item in items:
        text = tokenizer.decode(item["input_ids"])
        assert "Describe the picture." in text and "A square." in text and "<image>" not in text
        assert item["images"].shape[0] == 1 and text.count(tokenizer.image_token) == tiny_configs("x")[0].mp_image_token_length


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
@MODES
def test_a_table_of_image_paths_and_questions(tmp_path, stream, suffix):
    write_images(tmp_path / "imgs")
    table = pd.DataFrame({"image": [f"imgs/{answer(0)}.png", str(tmp_path / "imgs" / f"{answer(1)}.png"),
                                    f"imgs/{answer(2)}.png", f"imgs/{answer(3)}.png"],
                          "question": ["What colour is it?"] * 4, "answer": [answer(i) for i in range(4)]})
    path = tmp_path / f"rows.{suffix}"
    table.to_csv(path, index=False) if suffix == "csv" else table.to_parquet(path)
    items, skipped, tokenizer = first_items(tmp_path, path, stream, 4)
    assert not skipped and Counter(i["answer"] for i in items) == Counter(answer(i) for i in range(4))
    assert_colour_samples(items, tokenizer)


# -------------------------------------------------------------------------------- bad rows

def write_bad_rows(root):
    """Four bad rows, one per reason, before four good ones (the_cauldron JSONL)."""
    write_images(root)
    (root / "garbled.png").write_bytes(b"not a png at all")
    bad = [{"images": ["garbled.png"], "texts": [{"user": "Colour?", "assistant": "red"}]},
           {"images": ["nowhere.png"], "texts": [{"user": "Colour?", "assistant": "red"}]},
           {"images": ["red.png"], "texts": [{"user": "Colour?", "assistant": "red " * 400}]},
           {"images": ["red.png"] * 5, "texts": [{"user": "Colour?", "assistant": "red"}]}]
    return write_jsonl(root / "rows.jsonl", bad + cauldron_rows(4))


EXPECTED_SKIPS = {"unreadable_image": 1, "missing_image": 1, "too_long": 1, "too_many_images": 1}


@MODES
def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path, stream):
    items, skipped, tokenizer = first_items(tmp_path, write_bad_rows(tmp_path), stream, 4)
    assert skipped == EXPECTED_SKIPS
    assert_colour_samples(items, tokenizer)


@MODES
def test_skip_counts_go_to_summary_json_and_mlflow(tmp_path, stream):
    from nanovlm import tracking
    from nanovlm.training.tracked import train_tracked

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    vlm, cfg = tiny_configs(tmp_path / "out", train_dataset_path=str(write_bad_rows(tmp_path)), stream_dataset=stream,
                            val_ratio=0.0, batch_size=1, max_training_steps=2)
    summary = train_tracked(vlm, cfg, tracking_uri=uri)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())["data"]
    assert written["skipped"] == EXPECTED_SKIPS and written["skipped_total"] == 4
    assert written["streaming"] == stream
    metrics = tracking._client(uri).get_run(summary["mlflow_run_id"]).data.metrics
    assert {k: metrics[f"data_skipped_{k}"] for k in EXPECTED_SKIPS} == EXPECTED_SKIPS
    assert metrics["data_skipped_total"] == 4 and metrics["data_skipped_low_rating"] == 0


@MODES
def test_a_dataset_without_a_usable_row_is_one_error_before_training(tmp_path, stream, capsys, no_progress_bars):
    write_images(tmp_path)
    write_jsonl(tmp_path / "rows.jsonl", [{"images": ["nowhere.png"], "texts": [{"user": "Colour?", "assistant": "x"}]},
                                          {"images": ["red.png"], "texts": []}])
    code = main(["train", "--dataset", str(tmp_path / "rows.jsonl"), *set_arguments(), "--set", "val_ratio=0",
                 "--set", f"stream_dataset={stream}", "--max-steps", "1", "--no-tracking",
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "rows.jsonl" in err and "1 missing_image" in err and "1 no_usable_turns" in err, err
    assert not (tmp_path / "out" / "checkpoints").exists()


# ------------------------------------------------------------------------- map-style scans

def test_a_map_style_scan_is_kept_until_the_rows_or_the_settings_change(tmp_path):
    path = write_parquet(tmp_path / "rows.parquet", 300)
    vlm, cfg = tiny_configs(tmp_path / "out", train_dataset_path=str(path), stream_dataset=False, val_ratio=0.0)
    tokenizer = get_tokenizer(vlm.lm_tokenizer, vlm.vlm_extra_tokens, vlm.lm_chat_template)

    def scanned(**changes):
        train = build_datasets(vlm, cfg.replace(**changes), tokenizer).train
        return train.rows_scanned, len(train)

    assert scanned() == (300, 300)
    assert scanned() == (0, 300)                                # a second run, rank or trial reads the scan
    assert scanned(relevance_min_rating=3) == (300, 300)        # a setting the checks read: checked again
    write_parquet(path, 200)                                    # other rows under the same name
    assert scanned() == (200, 200)
