"""The offline `shapes` dataset: deterministic, disjoint splits, exact answers, balanced answers."""

import hashlib
from collections import Counter

import numpy as np
import pytest

from nanovlm.data import shapes
from nanovlm.data.shapes import (COLOURS, POSITIONS, QUESTION_TYPES, ShapesRows, chance_per_type,
                                 generate_sample, shapes_dataset, uniform_chance)


def image_digest(image) -> str:
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


def test_rows_are_deterministic():
    a = [ShapesRows("train", 20, seed=7, max_objects=3)[i] for i in range(20)]
    b = [ShapesRows("train", 20, seed=7, max_objects=3)[i] for i in range(20)]
    assert [r["texts"] for r in a] == [r["texts"] for r in b]
    assert [image_digest(r["images"][0]) for r in a] == [image_digest(r["images"][0]) for r in b]


def test_a_sample_depends_only_on_seed_split_and_index():
    small, large = ShapesRows("validation", 10, seed=3), ShapesRows("validation", 1000, seed=3)
    assert large[999]["texts"]  # access order does not matter
    assert small[5]["texts"] == large[5]["texts"]
    assert image_digest(small[5]["images"][0]) == image_digest(large[5]["images"][0])
    other_seed = ShapesRows("validation", 10, seed=4)
    assert [other_seed[i]["texts"] for i in range(10)] != [small[i]["texts"] for i in range(10)]


def test_splits_never_share_an_image():
    digests = {split: {image_digest(row["images"][0]) for row in ShapesRows(split, n, seed=0)}
               for split, n in (("train", 3000), ("validation", 600), ("test", 600))}
    assert not digests["train"] & digests["validation"]
    assert not digests["train"] & digests["test"]
    assert not digests["validation"] & digests["test"]


def test_rows_follow_the_nanovlm_schema():
    row = ShapesRows("train", 1, img_size=48)[0]
    assert set(row) == {"images", "texts", "question_type", "answer"}
    assert row["images"][0].size == (48, 48) and row["images"][0].mode == "RGB"
    assert row["texts"] == [{"user": row["texts"][0]["user"], "assistant": row["answer"]}]
    assert row["question_type"] in QUESTION_TYPES


def _foreground(image) -> np.ndarray:
    pixels = np.asarray(image).astype(int)
    return np.abs(pixels - np.array(shapes.BACKGROUND)).sum(-1) > 0


@pytest.mark.parametrize("qtype", ["colour", "position", "size"])
def test_single_object_answers_agree_with_the_pixels(qtype):
    rows = ShapesRows("train", 60, seed=1, question_types=qtype)
    for row in rows:
        image = row["images"][0]
        mask = _foreground(image)
        ys, xs = np.nonzero(mask)
        if qtype == "colour":
            colours = Counter(map(tuple, np.asarray(image)[mask]))
            assert colours.most_common(1)[0][0] == COLOURS[row["answer"]]
        elif qtype == "position":
            cell = 3 * int(ys.mean() * 3 // 64) + int(xs.mean() * 3 // 64)
            assert POSITIONS[cell] == row["answer"]
        else:
            extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
            assert (extent <= 17) == (row["answer"] == "small"), (extent, row["answer"])


def test_objects_per_image_cover_one_to_max_without_overlap():
    counts = Counter()
    for i in range(300):
        sample = generate_sample(0, "train", i, max_objects=4)
        counts[len(sample.objects)] += 1
        assert not shapes._any_overlap(sample.objects)
        assert len({(o.colour, o.shape) for o in sample.objects}) == len(sample.objects)
        assert len({o.cell for o in sample.objects}) == len(sample.objects)
    assert set(counts) == {1, 2, 3, 4}


def test_majority_guessing_is_near_chance_for_every_type():
    measured = chance_per_type(max_objects=3, samples=1000)
    uniform = uniform_chance(max_objects=3)
    assert set(measured) == set(QUESTION_TYPES)
    assert uniform["colour"] == 1 / 6 and uniform["shape"] == 1 / 5 and uniform["position"] == 1 / 9
    assert uniform["size"] == uniform["exists"] == 1 / 2 and uniform["count"] == 1 / 3
    for qtype in QUESTION_TYPES:
        assert measured[qtype] == pytest.approx(uniform[qtype], abs=0.06), qtype


def test_question_types_can_be_restricted_and_unknown_types_are_rejected():
    rows = ShapesRows("train", 50, question_types="colour,shape")
    assert {rows.sample(i).question_type for i in range(50)} == {"colour", "shape"}
    with pytest.raises(ValueError, match="shapes_question_types.*'color'"):
        ShapesRows("train", 5, question_types="color")
    with pytest.raises(ValueError, match="shapes_max_objects=10"):
        ShapesRows("train", 5, max_objects=10)


def test_answers_are_short():
    for i in range(200):
        sample = generate_sample(0, "train", i, max_objects=2)
        if sample.question_type != "caption":
            assert len(sample.answer.split()) <= 2, sample


def test_hf_dataset_holds_the_same_rows(tmp_path):
    dataset = shapes_dataset("test", 6, seed=5, max_objects=2, cache_dir=str(tmp_path))
    rows = ShapesRows("test", 6, seed=5, max_objects=2)
    assert len(dataset) == 6
    for i in range(6):
        assert dataset[i]["texts"] == rows[i]["texts"]
        assert dataset[i]["question_type"] == rows[i]["question_type"]
        assert image_digest(dataset[i]["images"][0].convert("RGB")) == image_digest(rows[i]["images"][0])


# ------------------------------------------------------------------ multiple choice (MMStar's format)

def _options(question):
    """'...\nOptions: A: red, B: blue' -> {'A': 'red', 'B': 'blue'}"""
    listed = question.split("\nOptions: ")[1]
    return dict(item.split(": ", 1) for item in listed.split(", "))


@pytest.mark.parametrize("attribute", ["colour", "shape", "size", "position"])
def test_choice_questions_list_options_in_order_with_the_answer_at_its_letter(attribute):
    types = shapes.parse_question_types(f"{attribute},choice")
    values = shapes.CHOICE_OPTIONS[attribute]
    letters_seen = set()
    for index in range(200):
        sample = generate_sample(5, "train", index, 1, types, 48)
        if sample.question_type != shapes.CHOICE:
            continue
        options = _options(sample.question)
        assert list(options) == list("ABCD"[:min(4, len(values))])
        assert [values.index(v) for v in options.values()] == sorted(values.index(v) for v in options.values())
        assert options[sample.answer] == getattr(sample.objects[0], attribute)   # the truth, from the scene
        assert sample.category == attribute
        letters_seen.add(sample.answer)
    assert len(letters_seen) == min(4, len(values))


def test_choice_training_rows_end_with_the_mmstar_post_prompt_and_answer_a_letter():
    rows = ShapesRows("train", 50, seed=2, question_types="colour,choice", img_size=32)
    choice = [rows[i] for i in range(50) if rows[i]["question_type"] == "choice"]
    assert choice
    for row in choice:
        assert row["texts"][0]["user"].endswith("\nAnswer with the option's letter from the given choices directly")
        assert row["answer"] in "ABCD" and row["texts"][0]["assistant"] == row["answer"]


def test_choice_is_asked_only_when_named():
    assert shapes.CHOICE not in shapes.parse_question_types("all")
    assert shapes.parse_question_types("colour,choice") == ("colour", "choice")
    assert uniform_chance(1, "size,choice")["choice"] == 0.5   # two sizes: two options
