"""Ours vs transformers' Idefics3, same weights, same process, same run.

    python -m nanovlm.bench.compare [--json PATH] [--configs tiny,mid] [--repeats 7] [--threads N]

For each config: build our model (random weights, perturbed so norms and biases are not
trivial), export the weights into the reference, check the outputs agree (logits max abs
diff <= 1e-4, greedy tokens identical), then measure with interleaved repetitions:
training tokens/s, prefill tokens/s (prompt positions / time to first token) and decode
tokens/s at batch 1 with 64 new tokens. Ratios are ours / reference (> 1 = ours faster).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanovlm.bench.flops import param_counts
from nanovlm.bench.harness import (
    InferenceSpec, NanoVLMRunner, Stat, TrainSpec, matmul_peak_flops, measure_inference, measure_training,
    synthetic_batch,
)
from nanovlm.bench.reference import ReferenceRunner, build_reference
from nanovlm.config import VLMConfig, preset

logger = logging.getLogger(__name__)

LOGITS_TOL = 1e-4
TARGETS = {"train_tokens_per_s": 1.2, "prefill_tokens_per_s": 1.0, "decode_tokens_per_s": 2.0}


def mid_config() -> VLMConfig:
    """About 27M parameters: a 6-block ViT on 128 px images and an 8-block GQA decoder."""
    vlm, _ = preset("tiny", vit_hidden_dim=384, vit_inter_dim=1536, vit_n_heads=6, vit_n_blocks=6,
                    vit_img_size=128, vit_patch_size=16, lm_hidden_dim=384, lm_inter_dim=1024, lm_n_heads=6,
                    lm_n_kv_heads=2, lm_n_blocks=8, lm_base_vocab_size=8192, lm_max_length=256)
    return vlm.validate()


CONFIGS = {"tiny": lambda: preset("tiny")[0], "mid": mid_config}


@dataclass
class CompareSettings:
    train_batch: int = 8
    train_text_tokens: int = 48
    prefill_batch: int = 4
    prompt_tokens: int = 48
    decode_new_tokens: int = 64
    warmup: int = 2
    repeats: int = 7


def build_pair(cfg: VLMConfig, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    from nanovlm.models import VisionLanguageModel

    torch.manual_seed(seed)
    ours = VisionLanguageModel(cfg, load_backbone=False)
    with torch.no_grad():   # fresh inits leave LayerNorm at identity and biases at zero
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ours, build_reference(ours)


def check_outputs_equal(ours: NanoVLMRunner, ref: ReferenceRunner, cfg: VLMConfig, new_tokens: int) -> dict:
    """Logits on a batch of 2 and greedy tokens at batch 1 must agree before anything is timed."""
    batch = synthetic_batch(cfg, 2, 24, seed=1)
    diff = (ours.logits(batch) - ref.logits(batch)).abs().max().item()
    one = synthetic_batch(cfg, 1, 24, seed=2)
    same_tokens = bool(torch.equal(ours.generate(one, new_tokens).cpu(), ref.generate(one, new_tokens).cpu()))
    if diff > LOGITS_TOL or not same_tokens:
        raise AssertionError(f"ours and the reference disagree (logits max abs diff {diff:.2e}, tolerance "
                             f"{LOGITS_TOL}; greedy tokens identical: {same_tokens}); timings would be meaningless.")
    return {"logits_max_abs_diff": diff, "greedy_tokens_identical": same_tokens}


def compare_config(name: str, cfg: VLMConfig, s: CompareSettings) -> dict:
    ours_model, ref_model = build_pair(cfg)
    ours, ref = NanoVLMRunner(ours_model), ReferenceRunner(ref_model)
    check = check_outputs_equal(ours, ref, cfg, s.decode_new_tokens)
    logger.info("%s: outputs agree (%s)", name, check)
    # Training mutates the weights, so it runs on separate copies built the same way.
    t_ours_model, t_ref_model = build_pair(cfg)
    t_ours, t_ref = NanoVLMRunner(t_ours_model), ReferenceRunner(t_ref_model)
    peak = matmul_peak_flops("cpu", "float32")
    train = measure_training([t_ours, t_ref], cfg, TrainSpec(s.train_batch, s.train_text_tokens), peak,
                             warmup=s.warmup, repeats=s.repeats, memory=False)
    prefill = measure_inference([ours, ref], cfg, InferenceSpec(s.prefill_batch, s.prompt_tokens, 2),
                                warmup=s.warmup, repeats=s.repeats, memory=False)
    decode = measure_inference([ours, ref], cfg, InferenceSpec(1, s.prompt_tokens, s.decode_new_tokens),
                               warmup=s.warmup, repeats=s.repeats, memory=False)
    picks = {
        "train_tokens_per_s": (train, "tokens_per_s"),
        "prefill_tokens_per_s": (prefill, "prefill_tokens_per_s"),
        "decode_tokens_per_s": (decode, "decode_tokens_per_s"),
    }
    measures = {}
    for key, (res, metric) in picks.items():
        o, r = res["ours"][metric], res["reference"][metric]
        # Paired: each round's ours/reference ratio (measured seconds apart), then their median;
        # steadier than the ratio of medians when the machine's load changes during the run.
        paired = Stat.of([a / b for a, b in zip(o.samples, r.samples)])
        measures[key] = {"ours": o.median, "reference": r.median, "ratio": paired.median,
                         "ratio_p25": paired.p25, "ratio_p75": paired.p75, "ratio_of_medians": o.median / r.median,
                         "target": TARGETS[key], "ours_rel_iqr": o.rel_iqr, "reference_rel_iqr": r.rel_iqr}
    return {"params": param_counts(cfg)["total"], "check": check, "measures": measures,
            "train_mfu_ours": train["ours"]["mfu"].median, "matmul_peak_flops": peak}


def free_cores() -> int:
    """Cores not busy with other processes, by the 1-minute load average (at least 1)."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, cores - round(os.getloadavg()[0])))


def markdown(results: dict) -> str:
    lines = ["| config | params | measure | ours | reference | ratio (paired median) | ratio IQR | target | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["configs"].items():
        for key, m in r["measures"].items():
            ok = "yes" if m["ratio"] >= m["target"] else "NO"
            lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {key} | {m['ours']:.1f} | {m['reference']:.1f} "
                         f"| {m['ratio']:.2f} | {m['ratio_p25']:.2f}-{m['ratio_p75']:.2f} | >= {m['target']} | {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="write the results (per config and measure) to this file")
    parser.add_argument("--configs", default="tiny,mid", help=f"comma separated, from {sorted(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=CompareSettings.repeats)
    parser.add_argument("--warmup", type=int, default=CompareSettings.warmup)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the cores the 1-minute load average leaves free, at "
                             "least 1: on a shared machine, OpenMP threads that wait for a busy core turn "
                             "every small op into a scheduler delay)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads or free_cores())
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    settings = CompareSettings(warmup=args.warmup, repeats=args.repeats)
    results = {
        "machine": {"host": platform.node(), "processor": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu",
                    "dtype": "float32"},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": settings.__dict__,
        "configs": {},
    }
    for name in names:
        results["configs"][name] = compare_config(name, CONFIGS[name](), settings)
    table = markdown(results)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    all_ok = all(m["ratio"] >= m["target"] for r in results["configs"].values() for m in r["measures"].values())
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
