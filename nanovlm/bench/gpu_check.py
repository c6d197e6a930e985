"""One-shot GPU benchmark of a preset with random weights (no Hub, no network, no tokenizer).

    nanovlm bench gpu-check                     # nanovlm-222m on cuda, about 5 minutes
    nanovlm bench gpu-check --json out.json --markdown out.md
    nanovlm bench gpu-check --preset tiny --device cpu --quick   # rehearsal on CPU

Measures, each in its own try/except so one failure does not lose the rest:
training in bf16 (autocast) with and without torch.compile (step time, tokens/s, MFU against
a measured bf16 matmul and, on known GPUs, the datasheet peak; peak memory), decoding at
batch 1 and 32 (time to first token, decode tokens/s, peak memory), and the same training
and batch-1 decode on transformers' Idefics3 with the same weights (ratios ours/reference).
Prints a Markdown table, then the JSON (the same metric names as `nanovlm bench grid`).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from nanovlm.models.flops import param_counts
from nanovlm.bench.harness import (
    InferenceSpec, NanoVLMRunner, TrainSpec, flat, matmul_peak_flops, measure_inference, measure_training,
    synthetic_batch, timed,
)
from nanovlm.config import preset

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), for a second MFU figure.
DATASHEET_BF16 = {"H100 80GB HBM3": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
                  "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12, "L40S": 362e12}


def datasheet_peak(device_name: str) -> float | None:
    for key, value in DATASHEET_BF16.items():
        if key.lower() in device_name.lower():
            return value
    return None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> int:
    """`nanovlm bench gpu-check` (its flags: nanovlm/commands/bench.py): print the table and the
    JSON, write them where asked; 0 when every measurement ran, else 1."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    cfg = preset(args.preset, vlm_load_backbone_weights=False)[0].validate()
    if args.quick:
        train_spec, warmup, repeats, ref_repeats = TrainSpec(batch_size=2, text_tokens=16), 1, 2, 2
        decode_specs = {"decode_bs1": InferenceSpec(1, 8, 8), "decode_bs32": InferenceSpec(4, 8, 8)}
    else:
        train_spec, warmup, repeats, ref_repeats = TrainSpec(16, 512 - cfg.mp_image_token_length), 3, 10, 5
        decode_specs = {"decode_bs1": InferenceSpec(1, 64, 128), "decode_bs32": InferenceSpec(32, 64, 128)}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    report: dict[str, Any] = {
        "preset": args.preset, "params": param_counts(cfg), "device": str(device), "dtype": dtype,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
        "train_spec": train_spec.__dict__, "decode_specs": {k: v.__dict__ for k, v in decode_specs.items()},
        "results": {}, "errors": {},
    }
    started = time.time()

    def attempt(name: str, fn: Callable[[], dict[str, float]]) -> None:
        t0 = time.time()
        try:
            report["results"][name] = fn()
            logger.info("%s done in %.0f s", name, time.time() - t0)
        except Exception as exc:  # noqa: BLE001 - report it and go on with the next measurement
            report["errors"][name] = f"{type(exc).__name__}: {exc}"
            logger.error("%s failed after %.0f s:\n%s", name, time.time() - t0, traceback.format_exc())
        finally:
            _free(device)
            if args.json:  # after every measurement, so a run cut short keeps what it measured
                report["wall_s"] = time.time() - started
                Path(args.json).write_text(json.dumps(report, indent=2))

    from nanovlm.models import VisionLanguageModel

    def ours(compile: bool = False) -> NanoVLMRunner:
        torch.manual_seed(0)
        return NanoVLMRunner(VisionLanguageModel(cfg).to(device), dtype=dtype, compile=compile)

    peak = {}

    def measure_peak() -> dict[str, float]:
        peak["measured"] = matmul_peak_flops(device, dtype, size=256 if args.quick else None)
        out = {"matmul_peak_flops": peak["measured"]}
        sheet = datasheet_peak(report["device_name"]) if device.type == "cuda" and dtype == "bfloat16" else None
        if sheet:
            out["datasheet_peak_flops"] = peak["datasheet"] = sheet
        return out

    def train(compile: bool) -> dict[str, float]:
        runner = ours(compile)
        if compile:  # the first steps compile; they are timed separately, not counted
            batch = synthetic_batch(cfg, train_spec.batch_size, train_spec.text_tokens, train_spec.n_images, device,
                                    image_size=train_spec.image_size)
            compile_s = timed(lambda: runner.train_step(batch), device)
        res = measure_training([runner], cfg, train_spec, peak.get("measured", 1.0), warmup, repeats)[runner.name]
        out = flat(res)
        if compile:
            out["compile_first_step_s"] = compile_s
        if "datasheet" in peak:
            out["mfu_datasheet"] = res["flops_per_s"].median / peak["datasheet"]
        return out

    def decode(spec: InferenceSpec, compile: bool = False) -> dict[str, float]:
        runner = ours(compile)
        out = {}
        if compile:  # the first call compiles (and records the CUDA graph); timed separately
            batch = synthetic_batch(cfg, spec.batch_size, spec.prompt_tokens, spec.n_images, device,
                                    image_size=spec.image_size)
            out["compile_first_call_s"] = timed(lambda: runner.generate(batch, spec.new_tokens), device)
            eager = NanoVLMRunner(runner.model, dtype=dtype)
            out["tokens_equal_eager"] = float(torch.equal(runner.generate(batch, spec.new_tokens),
                                                          eager.generate(batch, spec.new_tokens)))
        return {**flat(measure_inference([runner], cfg, spec, warmup, repeats)[runner.name]), **out}

    def versus_reference() -> dict[str, float]:
        from nanovlm.bench.reference import ReferenceRunner, build_reference
        out: dict[str, float] = {}
        torch.manual_seed(0)
        model = VisionLanguageModel(cfg).to(device)
        ref = build_reference(model)
        o, r = NanoVLMRunner(model, dtype=dtype), ReferenceRunner(ref, dtype=dtype)
        spec = decode_specs["decode_bs1"]
        res = measure_inference([o, r], cfg, spec, warmup, ref_repeats, memory=False)
        for metric in ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s"):
            out[f"ours_{metric}"] = res["ours"][metric].median
            out[f"reference_{metric}"] = res["reference"][metric].median
        out["decode_ratio"] = out["ours_decode_tokens_per_s"] / out["reference_decode_tokens_per_s"]
        out["prefill_ratio"] = out["ours_prefill_tokens_per_s"] / out["reference_prefill_tokens_per_s"]
        del o, r, ref, model
        _free(device)
        torch.manual_seed(0)
        model = VisionLanguageModel(cfg).to(device)
        ref = build_reference(model)
        o, r = NanoVLMRunner(model, dtype=dtype), ReferenceRunner(ref, dtype=dtype)
        res = measure_training([o, r], cfg, train_spec, peak.get("measured", 1.0), warmup, ref_repeats,
                               memory=False)
        out["ours_train_tokens_per_s"] = res["ours"]["tokens_per_s"].median
        out["reference_train_tokens_per_s"] = res["reference"]["tokens_per_s"].median
        out["train_ratio"] = out["ours_train_tokens_per_s"] / out["reference_train_tokens_per_s"]
        return out

    attempt("matmul_peak", measure_peak)
    attempt(f"train_{dtype}_eager", lambda: train(False))
    for name, spec in decode_specs.items():
        attempt(name, lambda spec=spec: decode(spec))
    if not args.skip_compile:  # after the eager runs: compiling is the slowest and least certain step
        for name, spec in decode_specs.items():
            attempt(f"{name}_compile", lambda spec=spec: decode(spec, compile=True))
        attempt(f"train_{dtype}_compile", lambda: train(True))
    if not args.skip_reference:
        attempt("versus_reference", versus_reference)
    report["wall_s"] = time.time() - started

    table = markdown(report)
    print(table)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 1 if report["errors"] else 0


HEADLINE = ["tokens_per_s", "step_time_s", "mfu", "mfu_datasheet", "compile_first_step_s", "time_to_first_token_s",
            "decode_tokens_per_s", "prefill_tokens_per_s", "end_to_end_s", "peak_memory_mb", "matmul_peak_flops",
            "datasheet_peak_flops", "compile_first_call_s", "tokens_equal_eager", "decode_ratio", "prefill_ratio",
            "train_ratio", "ours_decode_tokens_per_s",
            "reference_decode_tokens_per_s", "ours_train_tokens_per_s", "reference_train_tokens_per_s"]


def markdown(report: dict[str, Any]) -> str:
    lines = [f"{report['preset']} ({report['params']['total'] / 1e6:.0f}M params, random weights) on "
             f"{report['device_name']} ({report['device']}, {report['dtype']}), torch {report['torch']}, "
             f"{report['date']}", "", "| measurement | metric | value |", "|---|---|---|"]
    for name, metrics in report["results"].items():
        for metric in HEADLINE:
            if metric in metrics:
                v = metrics[metric]
                text = f"{v:.3g}" if (abs(v) >= 1e5 or abs(v) < 1e-2) else f"{v:.4g}"
                lines.append(f"| {name} | {metric} | {text} |")
    for name, error in report["errors"].items():
        lines.append(f"| {name} | FAILED | {error.splitlines()[0][:120]} |")
    return "\n".join(lines)

