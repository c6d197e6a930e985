"""The benchmarks `nanovlm eval` runs: where each reads its questions, how it prompts, parses and
scores, as lmms-eval 0.7 does (`lmms_eval/tasks/<task>/`: the YAML's default
`lmms_eval_specific_kwargs` for the prompt, its `generation_kwargs`, and `utils.py` for the
rest). docs/eval.md lists them.

A row is one question in the task's published schema (a dict, images as PIL images). A task
turns it into the prompt (the text after the image string) and the images, and scores the
model's stripped answer: (parsed answer, score in [0, 1]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from nanovlm.config import ConfigError
from nanovlm.eval import metrics

# max_new_tokens where lmms-eval leaves it to the model: nanoVLM's lmms-eval wrapper uses 50.
DEFAULT_MAX_NEW_TOKENS = 50
# lmms-eval stops a generation at its `until` strings; a task without any gets "\n\n" (the
# few-shot delimiter, api/task.py).
DEFAULT_UNTIL = ("\n\n",)

MULTIPLE_CHOICE_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly"
SHORT_ANSWER_POST_PROMPT = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class Task:
    name: str                                    # what `--task` and `eval_tasks` take
    lmms_eval_task: str                          # the same benchmark in lmms-eval
    hub_id: str                                  # its published dataset (lmms-eval's dataset_path)
    hub_config: str | None
    split: str                                   # lmms-eval's test_split
    columns: tuple[str, ...]                     # the published columns the task reads
    metric: str                                  # the name of its score: accuracy, relaxed_accuracy, anls
    prompt: Callable[[dict], str]
    score: Callable[[dict, str], tuple[str, float]]
    question_id: Callable[[dict, int], Any] = lambda row, position: position
    categories: Callable[[dict], Sequence[str]] = lambda row: ()
    # macro averaging (MMStar): the score is the mean of the means of these groups
    group: Callable[[dict], str] | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    until: tuple[str, ...] = DEFAULT_UNTIL
    images: Callable[[dict], list] = field(default=lambda row: [] if row.get("image") is None else [row["image"]])

    @property
    def metric_key(self) -> str:
        """Its score among training metrics and in MLflow: eval_<task>_<metric>."""
        return f"eval_{self.name}_{self.metric}"


def _choices(options: Sequence[str]) -> str:
    """'A. first\\nB. second': how ScienceQA and AI2D list options."""
    return "\n".join(f"{letter}. {option}" for letter, option in zip(metrics.option_letters(len(options)), options))


def _letter(options: Sequence[Any], index: Any) -> str:
    return metrics.option_letters(len(options))[int(index)]


# ---------------------------------------------------------------- MMStar (tasks/mmstar)

def _mmstar_prompt(row: dict) -> str:
    # mmstar_doc_to_text: a yes/no instruction in the question gives way to the post-prompt
    return row["question"].strip().replace(" Please answer yes or no.", "") + MULTIPLE_CHOICE_POST_PROMPT


def _mmstar_score(row: dict, answer: str) -> tuple[str, float]:
    letter = metrics.mcq_letter(answer, ("A", "B", "C", "D"))
    return letter, float(letter == row["answer"].strip().upper())


# ---------------------------------------------------------------- ScienceQA, image split (tasks/scienceqa)

def _scienceqa_prompt(row: dict) -> str:
    context = f"Context: {row['hint']}\n" if row["hint"] else ""
    return (f"{context}{row['question']}\n{_choices(row['choices'])}"
            "\nAnswer with the option's letter from the given choices directly.")


def _scienceqa_score(row: dict, answer: str) -> tuple[str, float]:
    return metrics.scienceqa_exact_match(answer, _letter(row["choices"], row["answer"]))


# ---------------------------------------------------------------- AI2D (tasks/ai2d)

def _ai2d_prompt(row: dict) -> str:
    return (f"{row['question']}\n{_choices(row['options'])}"
            "\nAnswer with the option's letter from the given choices directly.")


def _ai2d_score(row: dict, answer: str) -> tuple[str, float]:
    parsed = metrics.ai2d_letter(answer)
    return parsed, metrics.exact_match(parsed, _letter(row["options"], row["answer"]))


# ---------------------------------------------------------------- TextVQA, ChartQA, DocVQA

def _textvqa_score(row: dict, answer: str) -> tuple[str, float]:
    from nanovlm.eval.evalai import normalize_vqa_answer
    return normalize_vqa_answer(answer), metrics.vqa_accuracy(answer, row["answers"])


def _listed(value: Any) -> Sequence[str]:
    if value is None:
        return ()
    return [value] if isinstance(value, str) else list(value)


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("mmstar", "mmstar", "Lin-Chen/MMStar", None, "val",
         ("index", "question", "image", "answer", "category", "l2_category"), "accuracy",
         _mmstar_prompt, _mmstar_score, question_id=lambda row, position: row["index"],
         categories=lambda row: (row["category"],), group=lambda row: row["l2_category"]),
    Task("scienceqa", "scienceqa_img", "lmms-lab-encoder/ScienceQA", "ScienceQA-IMG", "test",
         ("question", "choices", "answer", "hint", "image"), "accuracy",
         _scienceqa_prompt, _scienceqa_score, categories=lambda row: _listed(row.get("subject")),
         max_new_tokens=16),
    Task("ai2d", "ai2d", "lmms-lab-encoder/ai2d", None, "test", ("question", "options", "answer", "image"),
         "accuracy", _ai2d_prompt, _ai2d_score, max_new_tokens=16),
    Task("textvqa", "textvqa_val", "lmms-lab-encoder/textvqa", None, "validation",
         ("question_id", "question", "image", "answers"), "accuracy",
         lambda row: row["question"].capitalize() + SHORT_ANSWER_POST_PROMPT, _textvqa_score,
         question_id=lambda row, position: row["question_id"], until=("ASSISTANT:",)),
    Task("chartqa", "chartqa", "lmms-lab-encoder/ChartQA", None, "test", ("question", "answer", "image"),
         "relaxed_accuracy", lambda row: row["question"] + "\nAnswer the question with a single word.",
         lambda row, answer: (answer, metrics.relaxed_correctness(answer, row["answer"])),
         categories=lambda row: _listed(row.get("type")), max_new_tokens=16),
    Task("docvqa", "docvqa_val", "lmms-lab-encoder/DocVQA", "DocVQA", "validation",
         ("questionId", "question", "image", "answers"), "anls",
         lambda row: row["question"] + SHORT_ANSWER_POST_PROMPT,
         lambda row, answer: (answer, metrics.anls(answer, row["answers"])),
         question_id=lambda row, position: row["questionId"],
         categories=lambda row: _listed(row.get("question_types")), max_new_tokens=32),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"Unknown benchmark task {name!r}; valid tasks: {', '.join(TASKS)}.")
    return TASKS[name]


def parse_task_list(spec: str, default_limit: int | None = None, what: str = "--task") -> list[tuple[Task, int | None]]:
    """'mmstar' or 'mmstar:200,textvqa' -> [(task, question limit or default_limit), ...]."""
    parsed = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, limit = item.partition(":")
        if limit and not (limit.isdigit() and int(limit) > 0):
            raise ConfigError(f"{what}={spec!r}: {item!r} has limit {limit!r}; write task or task:N with N > 0.")
        try:
            parsed.append((get_task(name.strip()), int(limit) if limit else default_limit))
        except ConfigError as exc:
            raise ConfigError(f"{what}={spec!r}: {exc}") from None
    if not parsed:
        raise ConfigError(f"{what}={spec!r} names no task; valid tasks: {', '.join(TASKS)}.")
    return parsed


_NOT_IN_A_NAME = re.compile(r"[^0-9a-z]+")


def category_key(category: str) -> str:
    """A category as part of a metric name: 'science & technology' -> 'science_technology'."""
    return _NOT_IN_A_NAME.sub("_", str(category).lower()).strip("_") or "none"

