"""Answer parsing and scoring, as lmms-eval 0.7 does it for each task (re-implemented; the file
each rule follows is named). Every function takes the model's raw answer already stripped of
surrounding whitespace (lmms-eval strips it before scoring) and returns a float in [0, 1].

| task | parse | metric |
| --- | --- | --- |
| mmstar | `mcq_letter` (tasks/_task_utils/mcq_extract.py) | letter == answer |
| scienceqa_img | `scienceqa_exact_match` (tasks/scienceqa/utils.py) | exact match, or "X. ..." |
| ai2d | `ai2d_letter` (tasks/ai2d/utils.py, MultiChoiceRegexFilter) | `exact_match` (api/metrics.py) |
| textvqa | `nanovlm.eval.evalai.normalize_vqa_answer` | `vqa_accuracy` (tasks/textvqa/utils.py) |
| chartqa | none | `relaxed_correctness` (tasks/chartqa/utils.py) |
| docvqa | none | `anls` (api/metrics.py) |
"""

from __future__ import annotations

import re
import statistics
import string
from typing import Sequence

from nanovlm.eval.evalai import normalize_vqa_answer

LETTERS = tuple(string.ascii_uppercase)

# ---------------------------------------------------------------- multiple choice: the letter

# The phrases after which a letter is the intended answer (mcq_extract.py's list).
ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
# How a letter is written -> how sure that makes it the answer (higher wins; then the later one).
# "{}" is the letter; start/end/phrase/fallback are found otherwise.
LETTER_FORMS = (("parentheses", "({})", 6), ("period", "{}.", 5), ("colon", "{}:", 4),
                ("right_paren", "{})", 3), ("space", "{} ", 2))
START, END, PHRASE, FALLBACK = 10, 9, 7, 0


def mcq_letter(response: str, choices: Sequence[str] = ("A", "B", "C", "D")) -> str:
    """The option letter a free-form answer gives, "" if none: lmms-eval's `extract_mcq_answer`.

    Candidates are the letters written as "(B)", "B.", "B:", "B)", "B " (anywhere), after an answer
    phrase ("the answer is B"), alone at the start or end of the answer, or, if nothing else,
    anywhere at all; the most telling form wins, and within a form the last occurrence.
    """
    if not response or not response.strip():
        return ""
    text = response.strip()
    for char in ",.!?;:'\"":
        text = text.strip(char)
    text = f" {text} "
    candidates: list[tuple[int, int, str]] = []   # (priority, position, letter)
    for _, form, priority in LETTER_FORMS:
        candidates += [(priority, text.rfind(form.format(ch)), ch) for ch in choices if form.format(ch) in text]
    lowered = text.lower()
    for phrase in ANSWER_PHRASES:
        at = lowered.find(phrase)
        if at != -1:
            after = at + len(phrase)
            candidates += [(PHRASE, text.find(ch, after), ch) for ch in choices if text.find(ch, after) != -1]
    stripped = text.strip()
    for ch in choices:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((START, 0, ch))
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((END, len(text) - 1, ch))
    if not candidates:
        candidates = [(FALLBACK, text.rfind(ch), ch) for ch in choices if ch in text]
    if not candidates:
        return ""
    # the highest priority, then the latest position; ties keep the first found (a stable sort)
    return sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True)[0][2]


def option_letters(n: int) -> tuple[str, ...]:
    """The letters of n options: A, B, ..."""
    if not 0 < n <= len(LETTERS):
        raise ValueError(f"{n} options; a multiple-choice question has 1 to {len(LETTERS)}.")
    return LETTERS[:n]


def scienceqa_exact_match(prediction: str, target_letter: str) -> tuple[str, float]:
    """(parsed, score): the answer equals the letter (any case), or starts "X." with X the letter
    (upper case): tasks/scienceqa/utils.py `sqa_process_results`, which follows LLaVA."""
    target = target_letter.strip().lower()
    if prediction.lower() == target:
        return prediction, 1.0
    if len(prediction) >= 2 and prediction[0].isupper() and prediction[1] == ".":
        return prediction[0], float(prediction[0].lower() == target)
    return prediction, 0.0


_AI2D_LETTER = re.compile(r"^\s*([A-Z])\.")


def ai2d_letter(prediction: str) -> str:
    """The letter of an answer that starts "X.", else the answer itself (ai2d's MultiChoiceRegexFilter)."""
    match = _AI2D_LETTER.match(prediction)
    return match.group(1) if match else prediction


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, target: str, ignore_case: bool = True, ignore_punctuation: bool = True) -> float:
    """lmms-eval's `exact_match` metric (api/metrics.py, HF evaluate's): equal strings after
    lower-casing and deleting ASCII punctuation (whitespace is kept)."""
    if ignore_case:
        prediction, target = prediction.lower(), target.lower()
    if ignore_punctuation:
        prediction, target = prediction.translate(_PUNCTUATION), target.translate(_PUNCTUATION)
    return float(prediction == target)


# ---------------------------------------------------------------- open answers

def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy (TextVQA, VQAv2): for each of the n human answers left out in turn,
    min(1, matches among the other n - 1 / 3); the mean of those. Both sides are normalised
    as EvalAI does (`normalize_vqa_answer`). 10 answers: 3 matches score 1, 2 score 0.6, 1 scores 0.3."""
    if not answers:
        return 0.0
    predicted = normalize_vqa_answer(prediction)
    humans = [normalize_vqa_answer(a) for a in answers]
    per_left_out = [min(1.0, sum(h == predicted for j, h in enumerate(humans) if j != i) / 3)
                    for i in range(len(humans))]
    return statistics.mean(per_left_out)


def _as_number(text: str) -> float | None:
    """A float, a percentage as a fraction ("12%" -> 0.12), or None."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> float:
    """ChartQA's relaxed accuracy (Methani et al. 2020, as Pix2Struct and Qwen-VL compute it): a
    number within 5% of a non-zero numeric target; otherwise a case-insensitive exact match."""
    predicted, expected = _as_number(prediction), _as_number(target)
    if predicted is not None and expected:
        return float(abs(predicted - expected) / abs(expected) <= max_relative_change)
    return float(prediction.lower() == target.lower())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for i, cb in enumerate(b, start=1):
        current = [i]
        for j, ca in enumerate(a, start=1):
            current.append(previous[j - 1] if ca == cb else 1 + min(previous[j - 1], previous[j], current[-1]))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one question (DocVQA, InfoVQA): 1 - the
    smallest normalised edit distance to any reference, 0 when that similarity is below 0.5.
    Both sides are lower-cased with whitespace collapsed; the normaliser is the longer raw length
    (as lmms-eval and the ST-VQA script compute it)."""
    distances = []
    for answer in answers:
        reference = " ".join(answer.strip().lower().split())
        predicted = " ".join(prediction.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(0.0 if length == 0 else levenshtein(reference, predicted) / length)
    if not distances:
        return 0.0
    similarity = 1.0 - min(distances)
    return similarity if similarity >= threshold else 0.0
