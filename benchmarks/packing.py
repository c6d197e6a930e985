"""Packed vs padded training on a mixed-length dataset: real-token throughput, one process, CPU.

    python benchmarks/packing.py [--rounds 3] [--steps 30] [--warmup 5] [--threads N] [--caption-objects 9]
                                 [--set f=v ...]

The dataset (written once to a temporary `save_to_disk` directory, read by the training loop as
any local dataset) mixes short answers and long captions over 1 to 4 `shapes` images per sample:
a short sample asks one question about its first image (a word or a number), a long one asks to
describe every image (each a caption of 1 to `--caption-objects` objects, ~8 tokens each): 30 to
~360 tokens, ~83 on average. The `tiny` model (lm_max_length raised to 384 to hold the longest
sample) trains on it through `nanovlm.training.train` twice per round: padded (`packing=False`,
`--batch-size` samples per batch) and packed (`packing=True`, `--rows` rows of lm_max_length
tokens per batch), in alternating order, each from the same initial weights.

The ratio depends on the mix: the vision encoder's work per image is the same either way, and
only the decoder's padding goes away, so shorter captions (`--caption-objects 5`: 30 to 220
tokens) give a lower ratio than the default (the records say how much).

Throughput = real tokens (padding excluded) over step time, summed over the steps after
`--warmup`; the step time includes loading the batch. `compute_*` leave the data wait out.
The ratio reported is the median over rounds of packed / padded measured in the same round
(docs/benchmarks.md, "Paired ratio"). Goal (issue 18): >= 1.5. Prints one JSON line with the
threads and the 1-minute load average before and after; exit status 0 when the goal is met.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanovlm.config import apply_overrides, preset  # noqa: E402
from nanovlm.data.shapes import generate_sample, render_image, shapes_features  # noqa: E402
from nanovlm.training import TrainHooks, train  # noqa: E402

GOAL = 1.5
LONG_FRACTION = 0.35        # of the samples: describe every image; the rest answer one question
SHORT_TYPES = ("colour", "shape", "count", "size")
CAPTION_OBJECTS = 9         # at most, per image of a long sample


def mixed_rows(n: int, seed: int, img_size: int, caption_objects: int = CAPTION_OBJECTS) -> list[dict]:
    """`n` rows in the nanoVLM schema: 1-4 images each, short answers and long captions mixed."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        n_images = rng.randint(1, 4)
        long = rng.random() < LONG_FRACTION
        samples = [generate_sample(seed, "train", 4 * i + k, caption_objects if long else 3,
                                   ("caption",) if long else SHORT_TYPES, img_size) for k in range(n_images)]
        if long:
            user = "Describe the images." if n_images > 1 else "Describe the image."
            answer = " Then ".join(s.answer for s in samples)
        else:
            user, answer = f"{samples[0].question} (first image)", samples[0].answer
        rows.append({"images": [render_image(s.objects, img_size) for s in samples],
                     "texts": [{"user": user, "assistant": answer}],
                     "question_type": "caption" if long else samples[0].question_type, "answer": answer})
    return rows


class StepRecorder(TrainHooks):
    def __init__(self):
        self.steps: dict[int, dict[str, float]] = {}

    def on_step(self, step, metrics):
        self.steps[step] = metrics


def measure(vlm, train_cfg, warmup: int) -> dict[str, float]:
    recorder = StepRecorder()
    train(vlm, train_cfg, hooks=recorder)
    steps = [m for s, m in recorder.steps.items() if s > warmup]
    tokens = sum(m["tokens_per_second"] * m["step_time"] for m in steps)
    samples = sum(m["samples_per_second"] * m["step_time"] for m in steps)
    step_time = sum(m["step_time"] for m in steps)
    compute_time = step_time - sum(m["data_wait"] for m in steps)
    return {"tokens_per_second": tokens / step_time, "compute_tokens_per_second": tokens / compute_time,
            "samples_per_second": samples / step_time, "tokens_per_step": tokens / len(steps),
            "padding_fraction": statistics.mean(m["padding_fraction"] for m in steps),
            "step_time_s": step_time / len(steps)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of each measurement")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per padded batch")
    parser.add_argument("--rows", type=int, default=6, help="rows of lm_max_length tokens per packed batch")
    parser.add_argument("--samples", type=int, default=800, help="rows in the dataset")
    parser.add_argument("--caption-objects", type=int, default=CAPTION_OBJECTS,
                        help="at most this many objects described per image of a long sample (1-9)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the cores the 1-minute load average leaves free, at least 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup {args.warmup} must be smaller than --steps {args.steps}.")

    load_before = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    torch.set_num_threads(args.threads or max(1, round(cores - load_before)))
    work = Path(tempfile.mkdtemp(prefix="packing-bench-"))
    vlm, base = preset("tiny")
    vlm, base = apply_overrides(vlm, base, [
        "lm_max_length=384", f"max_training_steps={args.steps}", "val_ratio=0", f"eval_interval={10 * args.steps}",
        f"checkpoint_interval={10 * args.steps}", f"log_interval={10 * args.steps}",
        f"train_dataset_path={work / 'data'}", *args.overrides])

    import datasets
    datasets.disable_progress_bars()
    sides = {"padded": base.replace(packing=False, batch_size=args.batch_size),
             "packed": base.replace(packing=True, batch_size=args.rows)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    try:
        datasets.Dataset.from_list(mixed_rows(args.samples, base.seed, vlm.vit_img_size, args.caption_objects),
                                   features=shapes_features()).save_to_disk(str(work / "data"))
        for r in range(args.rounds):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                out = str(work / f"{name}{r}")
                runs[name].append(measure(vlm, sides[name].replace(output_dir=out), args.warmup))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratios = [p["tokens_per_second"] / q["tokens_per_second"] for p, q in zip(runs["packed"], runs["padded"])]
    compute = [p["compute_tokens_per_second"] / q["compute_tokens_per_second"]
               for p, q in zip(runs["packed"], runs["padded"])]
    ratio = statistics.median(ratios)
    summary = {name: {k: round(statistics.median(run[k] for run in per), 4) for k in per[0]}
               for name, per in runs.items()}
    print(json.dumps({
        "ratio_packed_over_padded": round(ratio, 3), "goal": GOAL, "per_round": [round(x, 3) for x in ratios],
        "compute_ratio": round(statistics.median(compute), 3), "threads": torch.get_num_threads(),
        "cpu_count": cores, "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2),
        "rounds": args.rounds, "steps": args.steps, "warmup_steps": args.warmup,
        "padded_batch_samples": args.batch_size, "packed_batch_rows": args.rows, "row_tokens": vlm.lm_max_length,
        "dataset_rows": args.samples, "caption_objects": args.caption_objects, "torch": torch.__version__, **summary,
    }))
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
