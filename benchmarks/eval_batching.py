"""Benchmark answering speed: questions per second at batch 1 against batch 16 (nanovlm.eval.answering).

    python benchmarks/eval_batching.py [--checkpoint DIR] [--questions 64] [--rounds 3] [--threads N]
                                       [--max-new-tokens 8] [--batch-sizes 1,16] [--json FILE]

The questions are `shapes` multiple-choice questions in MMStar's schema (colour and shape), asked
as `nanovlm eval --task mmstar` asks them. The model is `--checkpoint`, or else the `tiny` preset with
random weights, perturbed so that greedy answers vary. With random weights no answer ends early, so
every question decodes `--max-new-tokens` tokens; a trained model stops at its end of turn, and
with it the batch when its last row stops.

Each round times every batch size once, in turn, on the same questions; the figure is the median over
rounds of questions / second, and the speed-up the median of the per-round ratios (docs/benchmarks.md,
"Paired ratio"). It also checks that every batch size gives the same answers. Prints one JSON line,
with the threads and the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanovlm.bench.compare import free_cores  # noqa: E402
from nanovlm.config import preset  # noqa: E402
from nanovlm.data.processors import get_tokenizer  # noqa: E402
from nanovlm.eval.answering import BatchAnswerer  # noqa: E402
from nanovlm.eval.benchmark_data import shapes_mmstar_rows  # noqa: E402
from nanovlm.eval.tasks import TASKS  # noqa: E402
from nanovlm.models import VisionLanguageModel  # noqa: E402


def random_answerer() -> BatchAnswerer:
    vlm, _ = preset("tiny")
    torch.manual_seed(0)
    model = VisionLanguageModel(vlm, load_backbone=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    return BatchAnswerer(model, get_tokenizer(vlm.lm_tokenizer, vlm.vlm_extra_tokens, vlm.lm_chat_template), device="cpu")


def time_answers(answerer: BatchAnswerer, questions, batch_size: int, max_new_tokens: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    answers = []
    for i in range(0, len(questions), batch_size):
        answers += answerer.answer(questions[i:i + batch_size], max_new_tokens, TASKS["mmstar"].until)
    return time.perf_counter() - start, answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: the cores the load average leaves free")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()

    torch.set_num_threads(args.threads or free_cores())
    load_before = os.getloadavg()[0]
    answerer = BatchAnswerer.from_checkpoint(args.checkpoint, device="cpu") if args.checkpoint else random_answerer()
    img_size = answerer.cfg.vit_img_size
    task = TASKS["mmstar"]
    rows = shapes_mmstar_rows(args.questions, question_types="colour,shape", img_size=img_size)
    questions = [(task.prompt(row), task.images(row)) for row in rows]
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    time_answers(answerer, questions[:sizes[-1]], sizes[-1], args.max_new_tokens)   # warm-up
    per_round: dict[int, list[float]] = {b: [] for b in sizes}
    answers: dict[int, list[str]] = {}
    for _ in range(args.rounds):
        for b in sizes:
            seconds, answers[b] = time_answers(answerer, questions, b, args.max_new_tokens)
            per_round[b].append(len(questions) / seconds)
    base = sizes[0]
    result = {
        "questions": len(questions), "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
        "checkpoint": args.checkpoint or "tiny preset, random weights",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0],
        "questions_per_second": {str(b): statistics.median(v) for b, v in per_round.items()},
        "questions_per_second_by_round": {str(b): v for b, v in per_round.items()},
        "speedup_over_batch_1": {str(b): statistics.median(x / y for x, y in zip(per_round[b], per_round[base]))
                                 for b in sizes[1:]},
        "same_answers": all(answers[b] == answers[base] for b in sizes),
    }
    line = json.dumps(result)
    print(line)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["same_answers"] else 1


if __name__ == "__main__":
    sys.exit(main())
