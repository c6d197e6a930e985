"""Answer parsers and metrics of the benchmarks against hand-computed cases (the rules are
lmms-eval 0.7's; nanovlm/eval/metrics.py names the file each follows)."""

import pytest

from nanovlm.eval import metrics
from nanovlm.eval.evalai import normalize_vqa_answer
from nanovlm.eval.runner import aggregate, as_metrics
from nanovlm.eval.tasks import TASKS, category_key, parse_task_list


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"),                                   # alone
    ("(C)", "C"),                                 # parentheses
    ("D. the cat", "D"),                          # starts with the letter
    ("A or B", "A"),                              # at the start (priority 10) beats at the end (9)
    ("I think it is (B) because of C.", "C"),     # at the end (9) beats "(B)" (6); the final period is stripped
    ("The answer is C, I am sure", "C"),          # after an answer phrase (7)
    ("Apple", "A"),                               # no form matches: the fallback finds the capital A
    ("none of these", ""),                        # no capital letter at all
    ("", ""),
])
def test_mcq_letter_follows_lmms_eval_priorities(answer, letter):
    assert metrics.mcq_letter(answer) == letter


def test_scienceqa_exact_match_takes_the_letter_or_a_leading_letter_and_period():
    assert metrics.scienceqa_exact_match("b", "B") == ("b", 1.0)
    assert metrics.scienceqa_exact_match("B. a magnet", "B") == ("B", 1.0)
    assert metrics.scienceqa_exact_match("b. a magnet", "B") == ("b. a magnet", 0.0)   # lower case: not parsed
    assert metrics.scienceqa_exact_match("The answer is B", "B") == ("The answer is B", 0.0)


def test_ai2d_letter_then_exact_match_ignoring_case_and_punctuation():
    assert metrics.ai2d_letter("  C. the sun") == "C"
    assert metrics.ai2d_letter("c") == "c"
    assert metrics.exact_match(metrics.ai2d_letter("c"), "C") == 1.0
    assert metrics.exact_match("(C)", "C") == 1.0            # punctuation deleted
    assert metrics.exact_match("C ", "C") == 0.0             # whitespace is kept


@pytest.mark.parametrize("raw, normalized", [
    ("Two Dogs.", "2 dogs"),
    ("the Coca-Cola", "coca cola"),
    ("3.5", "3.5"),
    ("1,000", "1000"),
    ("dont", "don't"),
    ("A cat's toy", "cat 's toy"),
])
def test_evalai_normalisation(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_is_the_mean_over_leave_one_out_subsets():
    answers = ["red"] * 3 + ["blue"] * 7
    # each red left out: 2 reds remain -> 2/3; each blue left out: 3 reds -> 1; (3 * 2/3 + 7) / 10
    assert metrics.vqa_accuracy("Red.", answers) == pytest.approx(0.9)
    assert metrics.vqa_accuracy("blue", answers) == 1.0
    assert metrics.vqa_accuracy("red", ["red"] + ["x"] * 9) == pytest.approx(0.3)   # 9 * (1/3) / 10
    assert metrics.vqa_accuracy("green", answers) == 0.0


def test_relaxed_correctness_allows_five_percent_on_numbers_only():
    assert metrics.relaxed_correctness("104", "100") == 1.0
    assert metrics.relaxed_correctness("106", "100") == 0.0
    assert metrics.relaxed_correctness("12%", "0.12") == 1.0
    assert metrics.relaxed_correctness("Yes", "yes") == 1.0
    assert metrics.relaxed_correctness("0", "0") == 1.0        # zero target: exact match
    assert metrics.relaxed_correctness("0.01", "0") == 0.0


def test_levenshtein_and_anls():
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.anls("Kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)   # lower-cased first; 0.57 >= 0.5
    assert metrics.anls("kitten", ["kittens"]) == pytest.approx(1 - 1 / 7)
    assert metrics.anls("acme  corp", ["ACME Corp", "other"]) == pytest.approx(1 - 0 / 10)
    assert metrics.anls("abc", ["xyz"]) == 0.0                  # similarity 0 < 0.5


def test_mmstar_score_is_the_mean_over_l2_categories():
    task = TASKS["mmstar"]
    predictions = [{"score": s, "categories": [c], "group": g} for s, c, g in [
        (1.0, "perception", "colour"), (1.0, "perception", "colour"), (0.0, "perception", "colour"),
        (1.0, "perception", "shape"), (0.0, "reasoning", "count")]]
    result = aggregate(task, predictions)
    # l2 means: colour 2/3, shape 1, count 0 -> 5/9; perception: (2/3 + 1) / 2
    assert result["accuracy"] == pytest.approx(5 / 9)
    assert result["by_category"] == pytest.approx({"perception": 5 / 6, "reasoning": 0.0})
    assert result["n"] == 5 and result["n_by_category"] == {"perception": 4, "reasoning": 1}
    assert as_metrics({"mmstar": result})["eval_mmstar_accuracy_perception"] == pytest.approx(5 / 6)


def test_task_lists_and_metric_names():
    assert [(t.name, limit) for t, limit in parse_task_list("mmstar:20, docvqa", 5)] == [("mmstar", 20), ("docvqa", 5)]
    with pytest.raises(ValueError, match="valid tasks: mmstar, scienceqa"):
        parse_task_list("mmstarr")
    assert category_key("science & technology") == "science_technology"
    assert TASKS["docvqa"].metric_key == "eval_docvqa_anls"
