"""Each benchmark read from a local copy in its published schema (written here, in the formats
a cluster without Hub access would hold: parquet, save_to_disk, imagefolder), prompted as
lmms-eval prompts it, and scored by its metric. A scripted answerer stands in for the model:
these tests are about the tasks, tests/test_eval.py about the model."""

import json
import re

import datasets
import pytest
from PIL import Image

from nanovlm.data.local_files import DatasetError
from nanovlm.eval.benchmark_data import load_questions, shapes_mmstar_rows, write_parquet
from nanovlm.eval.runner import run_task
from nanovlm.eval.tasks import TASKS

MC = "\nAnswer with the option's letter from the given choices directly"


class ScriptedAnswerer:
    """Answers each prompt from a dict; records what it was asked."""

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def answer(self, questions, max_new_tokens, until=()):
        self.asked += [(text, images, max_new_tokens, tuple(until)) for text, images in questions]
        return [self.answers[text] for text, _ in questions]


def image(colour="red"):
    return Image.new("RGB", (20, 10), colour)


def as_dataset(rows):
    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())


def test_mmstar_from_parquet(tmp_path):
    meta = {"source": "MathVista", "split": "testmini", "image_path": "images/1.jpg"}
    rows = [{"index": 0, "question": "Is the sky blue? Please answer yes or no.\nOptions: A: yes, B: no",
             "image": image(), "answer": "A", "category": "coarse perception", "l2_category": "image scene and topic",
             "meta_info": meta},
            {"index": 1, "question": "Which shape?\nOptions: A: circle, B: square, C: star, D: heart",
             "image": image("blue"), "answer": "C", "category": "science & technology",
             "l2_category": "geography & earth science & agriculture", "meta_info": meta}]
    path = write_parquet(rows, tmp_path / "mmstar" / "val-00000-of-00001.parquet")
    questions = load_questions(TASKS["mmstar"], str(path))
    prompts = ["Is the sky blue?\nOptions: A: yes, B: no" + MC,          # the yes/no instruction gives way
               "Which shape?\nOptions: A: circle, B: square, C: star, D: heart" + MC]
    answerer = ScriptedAnswerer(dict(zip(prompts, ["A", "The answer is B."])))
    result, predictions = run_task(answerer, TASKS["mmstar"], questions, batch_size=2)
    assert [a[0] for a in answerer.asked] == prompts
    assert answerer.asked[0][1][0].size == (20, 10) and answerer.asked[0][2:] == (50, ("\n\n",))
    assert [p["parsed"] for p in predictions] == ["A", "B"]
    assert result["accuracy"] == 0.5 and result["n"] == 2
    assert result["by_category"] == {"coarse perception": 1.0, "science & technology": 0.0}


def test_scienceqa_from_save_to_disk(tmp_path):
    common = {"task": "closed choice", "grade": "grade4", "topic": "geography", "category": "Geography",
              "skill": "Read a map", "lecture": "", "solution": ""}
    rows = [{"image": image(), "question": "Which country is highlighted?", "choices": ["Fiji", "Tonga", "Samoa"],
             "answer": 1, "hint": "", "subject": "social science", **common},
            {"image": image(), "question": "What is the force?", "choices": ["push", "pull"], "answer": 0,
             "hint": "A cart is moved.", "subject": "natural science", **common}]
    datasets.DatasetDict({"test": as_dataset(rows)}).save_to_disk(str(tmp_path / "sqa"))
    questions = load_questions(TASKS["scienceqa"], str(tmp_path / "sqa"))
    prompts = ["Which country is highlighted?\nA. Fiji\nB. Tonga\nC. Samoa" + MC + ".",
               "Context: A cart is moved.\nWhat is the force?\nA. push\nB. pull" + MC + "."]
    answerer = ScriptedAnswerer(dict(zip(prompts, ["B. Tonga", "b"])))
    result, _ = run_task(answerer, TASKS["scienceqa"], questions)
    assert [a[0] for a in answerer.asked] == prompts and answerer.asked[0][2] == 16
    assert result["accuracy"] == 0.5 and result["by_category"] == {"natural science": 0.0, "social science": 1.0}


def test_ai2d_from_a_parquet_directory(tmp_path):
    rows = [{"question": "Which stage comes first?", "options": ["egg", "larva", "pupa", "adult"], "answer": "0",
             "image": image()},
            {"question": "What eats grass?", "options": ["rabbit", "fox"], "answer": "0", "image": image()}]
    write_parquet(rows, tmp_path / "ai2d" / "data" / "test-00000-of-00001.parquet")
    questions = load_questions(TASKS["ai2d"], str(tmp_path / "ai2d"))
    answerer = ScriptedAnswerer({
        "Which stage comes first?\nA. egg\nB. larva\nC. pupa\nD. adult" + MC + ".": "a",   # case ignored
        "What eats grass?\nA. rabbit\nB. fox" + MC + ".": "B. fox"})
    result, predictions = run_task(answerer, TASKS["ai2d"], questions)
    assert [p["parsed"] for p in predictions] == ["a", "B"] and result["accuracy"] == 0.5


def test_textvqa_from_an_imagefolder(tmp_path):
    folder = tmp_path / "textvqa" / "validation"
    folder.mkdir(parents=True)
    image().save(folder / "a.png")
    row = {"file_name": "a.png", "image_id": "a", "question_id": 34602, "question": "what brand is this?",
           "question_tokens": ["what", "brand"], "image_width": 20, "image_height": 10, "flickr_original_url": "",
           "flickr_300k_url": "", "answers": ["Nike"] * 2 + ["nike"] + ["adidas"] * 7, "image_classes": ["Shoe"],
           "set_name": "val", "ocr_tokens": ["nike"]}
    (folder / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    questions = load_questions(TASKS["textvqa"], str(tmp_path / "textvqa"))
    prompt = "What brand is this?\nAnswer the question using a single word or phrase."
    answerer = ScriptedAnswerer({prompt: "Nike."})
    result, predictions = run_task(answerer, TASKS["textvqa"], questions)
    assert answerer.asked[0][3] == ("ASSISTANT:",)
    assert predictions[0]["id"] == 34602 and predictions[0]["parsed"] == "nike"
    assert result["accuracy"] == pytest.approx(0.9)   # 3 of 10 say nike: 3 * (2/3) + 7 * 1 over 10


def test_chartqa_from_a_parquet_file(tmp_path):
    rows = [{"type": "human_test", "question": "How many in 2019?", "answer": "42", "image": image()},
            {"type": "augmented_test", "question": "Which is largest?", "answer": "Asia", "image": image()}]
    path = write_parquet(rows, tmp_path / "chartqa.parquet")
    questions = load_questions(TASKS["chartqa"], str(path))
    suffix = "\nAnswer the question with a single word."
    answerer = ScriptedAnswerer({"How many in 2019?" + suffix: "43.5", "Which is largest?" + suffix: "Europe"})
    result, _ = run_task(answerer, TASKS["chartqa"], questions)
    assert result["relaxed_accuracy"] == 0.5           # 43.5 is within 5% of 42
    assert result["by_category"] == {"augmented_test": 0.0, "human_test": 1.0}


def test_docvqa_from_save_to_disk_with_split(tmp_path):
    rows = [{"questionId": "49153", "question": "What is the date?", "question_types": ["form"], "image": image(),
             "docId": 14465, "ucsf_document_id": "pybv0228", "ucsf_document_page_no": "81",
             "answers": ["May 5, 1999", "5 May 1999"], "data_split": "val"}]
    datasets.DatasetDict({"validation": as_dataset(rows), "test": as_dataset(rows)}).save_to_disk(str(tmp_path / "d"))
    questions = load_questions(TASKS["docvqa"], str(tmp_path / "d"))
    answerer = ScriptedAnswerer({"What is the date?\nAnswer the question using a single word or phrase.": "may 5 1999"})
    result, predictions = run_task(answerer, TASKS["docvqa"], questions)
    assert result["anls"] == pytest.approx(1 - 1 / 11)  # one edit (the comma) over 11 characters
    assert predictions[0]["id"] == "49153" and result["by_category"] == {"form": pytest.approx(1 - 1 / 11)}
    with pytest.raises(DatasetError, match="no 'dev'; pass --split"):
        load_questions(TASKS["docvqa"], str(tmp_path / "d"), split="dev")


def test_a_missing_column_is_named_before_any_model_loads(tmp_path):
    path = write_parquet([{"question": "q", "answer": "A", "image": image()}], tmp_path / "bad.parquet")
    with pytest.raises(DatasetError, match="no column 'index', 'category', 'l2_category' of task 'mmstar'"):
        load_questions(TASKS["mmstar"], str(path))


def test_shapes_questions_in_mmstar_schema():
    rows = shapes_mmstar_rows(size=12, question_types="colour,shape,choice", img_size=32)
    assert len(rows) == 12 and {r["category"] for r in rows} <= {"colour", "shape"}
    assert all(r["answer"] in "ABCD" and "\nOptions: A: " in r["question"] for r in rows)
    assert rows[0]["image"].size == (32, 32)
    with pytest.raises(DatasetError, match="task 'textvqa' needs its own benchmark"):
        load_questions(TASKS["textvqa"], "shapes")


@pytest.mark.parametrize("changes, message", [
    ({"eval_tasks": "mmstar:0"}, "has limit '0'"),
    ({"eval_tasks": "mmstr"}, "Unknown benchmark task 'mmstr'"),
    ({"eval_tasks": "mmstar", "eval_tasks_limit": 0}, "eval_tasks_limit=0 must be positive"),
    ({"eval_tasks": "mmstar", "eval_tasks_datasets": {"ai2d": "/data/ai2d"}}, "names ['ai2d']"),
    ({"eval_tasks_datasets": {"mmstar": "shapes"}}, "eval_tasks is empty"),
])
def test_training_eval_tasks_are_checked_with_the_config(changes, message):
    from nanovlm.config import ConfigError, preset

    with pytest.raises(ConfigError, match=re.escape(message)):
        preset("tiny", **changes)[1].validate()


def test_a_parquet_copy_may_hold_image_paths_relative_to_its_directory(tmp_path):
    image("green").save(tmp_path / "q0.png")
    datasets.Dataset.from_list([{"question": "Which colour?", "options": ["red", "green"], "answer": "1",
                                 "image": "q0.png"}]).to_parquet(str(tmp_path / "test.parquet"))
    (row,) = load_questions(TASKS["ai2d"], str(tmp_path / "test.parquet"))
    assert row["image"].size == (20, 10) and row["image"].getpixel((0, 0)) == (0, 128, 0)
