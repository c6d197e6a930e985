"""Timed measurements of a VLM: inference (vision encoding, time to first token, prefill and
decode throughput, end-to-end latency) and training (step time, tokens/s, FLOP/s, MFU), with
peak memory.

Every measurement runs warm-up calls first, then several timed repetitions, and reports the
median with the interquartile range. On CUDA the clock reads only after
`torch.cuda.synchronize()`. Implementations are reached through a `Runner` (ours below, the
transformers reference in `reference.py`), so one loop can interleave their repetitions:
machine noise then hits both alike, and ratios measured in one run stay honest.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import resource
import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Protocol

import torch
from PIL import Image

from nanovlm.accel import apply_training_kernels, compile_for_training
from nanovlm.config import VLMConfig
from nanovlm.data.processors import get_image_string, image_processor_for, process_images
from nanovlm.models.flops import vlm_flops
from nanovlm.training.optim import adamw

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ==================================================================== inputs

@dataclass
class SyntheticBatch:
    """A tokenizer-free batch: each sample is the image string of `n_images` images followed by
    random text tokens; no padding (timings should not depend on the padding pattern)."""
    input_ids: torch.Tensor        # [B, T]
    attention_mask: torch.Tensor   # [B, T], all ones
    images: torch.Tensor           # [B * n_tiles, 3, H, W]
    targets: torch.Tensor          # [B, T], input_ids shifted left, -100 on the image string and the last
    n_images: int
    n_tiles: int = 0               # tiles per sample through the ViT (global views included); 0 -> n_images

    def __post_init__(self) -> None:
        self.n_tiles = self.n_tiles or self.n_images

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


def synthetic_batch(cfg: VLMConfig, batch_size: int, text_tokens: int, n_images: int = 1,
                    device: str | torch.device = "cpu", seed: int = 0,
                    answer_tokens: int | None = None, image_size: tuple[int, int] | None = None) -> SyntheticBatch:
    """`text_tokens` random ids after the image string of `n_images` images. Targets supervise
    the next token at every text position (`answer_tokens=None`, language-model pre-training),
    or only the last `answer_tokens` ids (instruction tuning: image and prompt masked, the
    answer learned; how nanoVLM trains).

    `image_size=None`: each image is one random tile (no resize). `(height, width)`: random
    images of that size go through the model's image processor (resize, tiles, global view),
    and the prompt holds their image string, as in training."""
    if batch_size <= 0 or text_tokens <= 0 or n_images < 0:
        raise ValueError(f"batch_size={batch_size}, text_tokens={text_tokens} must be positive "
                         f"and n_images={n_images} >= 0.")
    if answer_tokens is not None and not 0 < answer_tokens < text_tokens:
        raise ValueError(f"answer_tokens={answer_tokens} must be between 1 and text_tokens - 1 = {text_tokens - 1}.")
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.lm_base_vocab_size, (batch_size, text_tokens), generator=g)
    if image_size is None:
        images = torch.randn(batch_size * n_images, 3, cfg.vit_img_size, cfg.vit_img_size, generator=g)
        grids = [(1, 1)] * n_images
    else:
        pixels = torch.randint(0, 256, (batch_size * n_images, *image_size, 3), dtype=torch.uint8, generator=g)
        images, grids = process_images(image_processor_for(cfg), [Image.fromarray(p) for p in pixels.numpy()])
        grids = grids[:n_images]                                 # every sample's images have the same sizes
    image_string = get_image_string(SimpleNamespace(**cfg.vlm_extra_tokens), grids, cfg.mp_image_token_length)
    image_ids = torch.tensor(placeholder_ids(cfg, image_string), dtype=torch.long)
    n_img_tok = len(image_ids)
    input_ids = torch.cat([image_ids.expand(batch_size, -1), text], dim=1)
    targets = torch.full_like(input_ids, -100)
    first = n_img_tok if answer_tokens is None else input_ids.shape[1] - 1 - answer_tokens
    targets[:, first:-1] = input_ids[:, first + 1:]
    device = torch.device(device)
    return SyntheticBatch(input_ids.to(device), torch.ones_like(input_ids).to(device), images.to(device),
                          targets.to(device), n_images, images.shape[0] // batch_size)


def placeholder_ids(cfg: VLMConfig, image_string: str) -> list[int]:
    """Ids of an image string without a tokenizer: each of `vlm_extra_tokens` gets the id
    `get_tokenizer` gives it (the base vocabulary + its position); any other character
    (`<image: i>`) one ordinary id."""
    ids = {token: cfg.lm_base_vocab_size + k for k, token in enumerate(cfg.vlm_extra_tokens.values())}
    ids[cfg.vlm_extra_tokens["image_token"]] = cfg.image_token_id
    pattern = "|".join(re.escape(token) for token in sorted(ids, key=len, reverse=True))
    out: list[int] = []
    for piece in re.split(f"({pattern})", image_string):
        out += [ids[piece]] if piece in ids else [ord(c) % cfg.lm_base_vocab_size for c in piece]
    return out


# ==================================================================== runners

class Runner(Protocol):
    """What the harness needs from an implementation. Every method may return before the
    device finishes; the harness synchronises."""
    name: str
    device: torch.device

    def encode_images(self, batch: SyntheticBatch) -> torch.Tensor: ...       # image embeddings
    def generate(self, batch: SyntheticBatch, max_new_tokens: int) -> torch.Tensor: ...  # [B, N] greedy
    def logits(self, batch: SyntheticBatch) -> torch.Tensor: ...              # [B, T, V]
    def train_step(self, batch: SyntheticBatch) -> None: ...                   # fwd + bwd + AdamW step


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class NanoVLMRunner:
    """Our `VisionLanguageModel`. Inference casts the weights to `dtype`; training keeps
    float32 weights under autocast (what the training loop does)."""

    def __init__(self, model: torch.nn.Module, dtype: str = "float32", compile: bool = False,
                 lr: float = 1e-4, name: str = "ours"):
        self.name = name
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = DTYPES[dtype]
        self.compile = compile
        self.lr = lr
        self._optimizer: torch.optim.Optimizer | None = None
        self._train_forward: Callable | None = None
        self._infer_model: torch.nn.Module | None = None

    # -- inference: a cast copy only when the dtype differs (float32 shares the weights)
    def _inference_model(self) -> torch.nn.Module:
        if self._infer_model is None:
            if self.dtype == torch.float32:
                self._infer_model = self.model
            else:
                import copy
                self._infer_model = copy.deepcopy(self.model).to(self.dtype)
            self._infer_model.eval()
        return self._infer_model

    def _images(self, batch: SyntheticBatch) -> torch.Tensor:
        return batch.images.to(self.dtype)

    @torch.inference_mode()
    def encode_images(self, batch: SyntheticBatch) -> torch.Tensor:
        m = self._inference_model()
        return m.MP(m.vision_encoder(self._images(batch)))

    @torch.inference_mode()
    def generate(self, batch: SyntheticBatch, max_new_tokens: int) -> torch.Tensor:
        m = self._inference_model()
        return m.generate(batch.input_ids, images=self._images(batch), attention_mask=batch.attention_mask,
                          max_new_tokens=max_new_tokens, greedy=True, eos_token_id=None, compile=self.compile)

    @torch.inference_mode()
    def logits(self, batch: SyntheticBatch) -> torch.Tensor:
        m = self._inference_model()
        logits, _ = m(batch.input_ids, images=self._images(batch), attention_mask=batch.attention_mask)
        return logits

    # -- training
    def train_step(self, batch: SyntheticBatch) -> None:
        if self._optimizer is None:
            self.model.train()
            self._optimizer = adamw(self.model.parameters(), lr=self.lr)
            apply_training_kernels(self.model)   # as the training loop does
            # dynamic=False: a second config in the same process would otherwise be compiled with
            # dynamic shapes (automatic dynamic), measured 2x slower than eager on CPU.
            self._train_forward = (compile_for_training(self.model, self.device, dynamic=False) if self.compile
                                   else self.model)
        with _autocast(self.device, self.dtype):
            _, loss = self._train_forward(batch.input_ids, images=batch.images,
                                          attention_mask=batch.attention_mask, targets=batch.targets,
                                          return_logits=False)
        loss.backward()
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)


# ==================================================================== timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn` takes, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Stat:
    """Median and spread of repeated measurements of one metric."""
    median: float
    p25: float
    p75: float
    min: float
    max: float
    n: int
    samples: list[float] = field(default_factory=list, repr=False, compare=False)  # in repetition order

    @classmethod
    def of(cls, samples: list[float]) -> "Stat":
        """Summary of the finite samples; all NaN if none is finite."""
        s = sorted(x for x in samples if math.isfinite(x))
        if not s:
            nan = math.nan
            return cls(nan, nan, nan, nan, nan, 0, list(samples))
        if len(s) >= 2:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1 = q3 = s[0]
        return cls(statistics.median(s), q1, q3, s[0], s[-1], len(s), list(samples))

    @property
    def rel_iqr(self) -> float:
        """(p75 - p25) / median: how noisy the measurement was."""
        return (self.p75 - self.p25) / self.median if self.median else math.inf


def interleave(trials: dict[str, Callable[[], dict[str, float]]], warmup: int, repeats: int
               ) -> dict[str, dict[str, Stat]]:
    """Run every trial `warmup` times, then `repeats` rounds of one call each, alternating the
    order per round, and summarise each metric a trial returns."""
    names = list(trials)
    for _ in range(warmup):
        for name in names:
            trials[name]()
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            for metric, value in trials[name]().items():
                samples[name].setdefault(metric, []).append(value)
    return {name: {m: Stat.of(v) for m, v in per.items()} for name, per in samples.items()}


# ==================================================================== memory

def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to the current RSS.
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset. CPU: the process's peak resident set size
    (VmHWM since the last reset where Linux allows it, else the lifetime ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_peak(runner_call: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    runner_call()
    synchronize(device)
    return peak_memory_mb(device)


# ==================================================================== peak FLOP/s

def matmul_peak_flops(device: torch.device | str, dtype: str = "float32", size: int | None = None,
                      repeats: int = 5) -> float:
    """Achieved FLOP/s of a large square matmul (2*n^3 FLOPs) in `dtype` on `device`: the
    best of `repeats`. The default denominator for MFU when no datasheet peak is given."""
    device = torch.device(device)
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    torch.matmul(a, b)  # warm-up
    best = min(timed(lambda: torch.matmul(a, b), device) for _ in range(repeats))
    return 2 * n ** 3 / best


# ==================================================================== measurements

@dataclass
class InferenceSpec:
    batch_size: int = 1
    prompt_tokens: int = 32        # text tokens after the image tokens
    new_tokens: int = 64
    n_images: int = 1
    image_size: tuple[int, int] | None = None   # (height, width) through the image processor; None: one tile


@dataclass
class TrainSpec:
    batch_size: int = 8
    text_tokens: int = 32          # text tokens after the image tokens
    n_images: int = 1
    answer_tokens: int | None = None  # supervised tokens at the end (None: every text token)
    image_size: tuple[int, int] | None = None   # (height, width) through the image processor; None: one tile


def inference_trial(runner: Runner, batch: SyntheticBatch, new_tokens: int) -> Callable[[], dict[str, float]]:
    """One repetition: vision encoding, then generate 1 token (time to first token = vision +
    prefill + first token), then generate `new_tokens`; decode throughput comes from the
    difference of those two calls in the same repetition."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens} must be >= 2 to measure decoding after the first token.")
    b, t = batch.batch_size, batch.seq_len
    device = runner.device

    def trial() -> dict[str, float]:
        vision = timed(lambda: runner.encode_images(batch), device)
        ttft = timed(lambda: runner.generate(batch, 1), device)
        e2e = timed(lambda: runner.generate(batch, new_tokens), device)
        # A repetition where noise made the long call no slower than the short one says
        # nothing about decoding: NaN, dropped from the summary.
        decode = e2e - ttft if e2e > ttft else math.nan
        return {
            "vision_encode_s": vision,
            "images_per_s": batch.images.shape[0] / vision,
            "time_to_first_token_s": ttft,
            "prefill_tokens_per_s": b * t / ttft,
            "decode_tokens_per_s": b * (new_tokens - 1) / decode,
            "end_to_end_s": e2e,
        }
    return trial


def train_trial(runner: Runner, batch: SyntheticBatch, cfg: VLMConfig, peak_flops: float
                ) -> Callable[[], dict[str, float]]:
    b, t = batch.batch_size, batch.seq_len
    flops_per_step = b * vlm_flops(cfg, t, batch.n_tiles, backward=True)

    def trial() -> dict[str, float]:
        step = timed(lambda: runner.train_step(batch), runner.device)
        return {
            "step_time_s": step,
            "tokens_per_s": b * t / step,
            "samples_per_s": b / step,
            "flops_per_s": flops_per_step / step,
            "mfu": flops_per_step / step / peak_flops,
        }
    return trial


def measure_inference(runners: list[Runner], cfg: VLMConfig, spec: InferenceSpec, warmup: int = 1,
                      repeats: int = 5, memory: bool = True) -> dict[str, dict[str, Stat]]:
    """Inference metrics for each runner (interleaved), plus `peak_memory_mb` of one
    `new_tokens` generation."""
    device = runners[0].device
    batch = synthetic_batch(cfg, spec.batch_size, spec.prompt_tokens, spec.n_images, device,
                            image_size=spec.image_size)
    results = interleave({r.name: inference_trial(r, batch, spec.new_tokens) for r in runners}, warmup, repeats)
    if memory:
        for r in runners:
            mb = measure_peak(lambda: r.generate(batch, spec.new_tokens), device)
            results[r.name]["peak_memory_mb"] = Stat.of([mb])
    return results


def measure_training(runners: list[Runner], cfg: VLMConfig, spec: TrainSpec, peak_flops: float,
                     warmup: int = 2, repeats: int = 5, memory: bool = True) -> dict[str, dict[str, Stat]]:
    """Training-step metrics for each runner (interleaved); MFU is against `peak_flops`."""
    device = runners[0].device
    batch = synthetic_batch(cfg, spec.batch_size, spec.text_tokens, spec.n_images, device,
                            answer_tokens=spec.answer_tokens, image_size=spec.image_size)
    results = interleave({r.name: train_trial(r, batch, cfg, peak_flops) for r in runners}, warmup, repeats)
    if memory:
        for r in runners:
            mb = measure_peak(lambda: r.train_step(batch), device)
            results[r.name]["peak_memory_mb"] = Stat.of([mb])
    return results


def largest_batch(make_runner: Callable[[], Runner], cfg: VLMConfig, spec: TrainSpec,
                  start: int = 1, limit: int = 4096) -> int | None:
    """Largest training batch that fits in GPU memory (doubling, then bisection); None on
    CPU, where running out of memory swaps or kills rather than raising."""
    runner = make_runner()
    if runner.device.type != "cuda":
        return None

    def fits(batch_size: int) -> bool:
        try:
            batch = synthetic_batch(cfg, batch_size, spec.text_tokens, spec.n_images, runner.device,
                                    answer_tokens=spec.answer_tokens, image_size=spec.image_size)
            runner.train_step(batch)
            synchronize(runner.device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    good, bad = 0, None
    size = start
    while size <= limit:
        if fits(size):
            good, size = size, size * 2
        else:
            bad = size
            break
    if bad is None:
        return good
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good or None


def flat(results: dict[str, Stat], prefix: str = "") -> dict[str, float]:
    """{metric: Stat} -> {prefix+metric: median, prefix+metric_p25: ..., prefix+metric_p75: ...}."""
    out: dict[str, float] = {}
    for metric, s in results.items():
        out[prefix + metric] = s.median
        if s.n > 1:
            out[prefix + metric + "_p25"] = s.p25
            out[prefix + metric + "_p75"] = s.p75
    return out


@dataclass
class BenchmarkResult:
    """Everything one `benchmark()` call measured, as plain floats for MLflow and tables."""
    inference: dict[str, Stat] = field(default_factory=dict)
    training: dict[str, Stat] = field(default_factory=dict)
    peak_flops: float = 0.0
    largest_batch: int | None = None

    def metrics(self) -> dict[str, float]:
        out = {**flat(self.inference, "infer_"), **flat(self.training, "train_"), "peak_flops": self.peak_flops}
        if self.largest_batch is not None:
            out["train_largest_batch"] = float(self.largest_batch)
        return out


def benchmark(cfg: VLMConfig, device: str = "cpu", dtype: str = "float32", compile: bool = False,
              infer: InferenceSpec | None = None, train: TrainSpec | None = None,
              warmup: int = 1, repeats: int = 5, peak_flops: float | None = None,
              find_largest_batch: bool = False, seed: int = 0) -> BenchmarkResult:
    """Build our model from `cfg` (random weights) and measure it. `infer` / `train` None
    skip that part; `peak_flops` None measures a matmul in `dtype` on `device`."""
    from nanovlm.models import VisionLanguageModel

    dev = torch.device(device)
    torch.manual_seed(seed)

    def make_runner() -> NanoVLMRunner:
        model = VisionLanguageModel(cfg, load_backbone=False).to(dev)
        return NanoVLMRunner(model, dtype=dtype, compile=compile)

    result = BenchmarkResult()
    result.peak_flops = peak_flops or matmul_peak_flops(dev, dtype)
    if infer is not None:
        runner = make_runner()
        result.inference = measure_inference([runner], cfg, infer, warmup, repeats)[runner.name]
        del runner
    if train is not None:
        runner = make_runner()
        result.training = measure_training([runner], cfg, train, result.peak_flops, warmup + 1, repeats)[runner.name]
        del runner
        if find_largest_batch and dev.type == "cuda":
            result.largest_batch = largest_batch(make_runner, cfg, train, start=train.batch_size)
    return result
