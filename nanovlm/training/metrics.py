"""Throughput, FLOPs, MFU and memory: the numbers every step reports, as plain floats.

MFU = (model FLOPs of the step's samples) / (step time * peak FLOP/s * workers).
The FLOPs come from `vlm_flops` (analytic, see nanovlm/models/flops.py); the peak is
`TrainConfig.peak_flops`, or when that is None a matmul timed once on the device in the
training dtype (an achievable peak, not the datasheet number).
"""

from __future__ import annotations

import logging
import resource
import sys
import time

import torch
import torch.distributed as dist

from nanovlm.models.flops import vlm_flops  # noqa: F401  (re-exported: FLOPs of one sample)

logger = logging.getLogger(__name__)

_PEAK_CACHE: dict[tuple[str, torch.dtype], float] = {}


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul on `device` in `dtype`, timed once per process and cached."""
    key = (str(device), dtype)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    n = 8192 if device.type == "cuda" else 1024
    repeats = 10 if device.type == "cuda" else 20  # ~0.5 s on 2 cores
    # A private generator: measuring must not move the global RNG (resume determinism).
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up (kernel selection, lazy init)
    # The fastest of several timings: on a shared machine the slow ones measure the neighbours.
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    peak = 2 * n ** 3 / max(best, 1e-9)
    logger.info("Measured matmul peak on %s (%s): %.3g FLOP/s (set TrainConfig.peak_flops to override).",
                device, dtype, peak)
    _PEAK_CACHE[key] = peak
    return peak


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10  # bytes on macOS, KiB on Linux


def global_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum `values` over all workers when torch.distributed is initialised (one all_reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    backend = dist.get_backend()
    on = device if backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(tensor)
    return tensor.tolist()


def step_metrics(*, loss: float, lrs: dict[str, float], grad_norm: float, step_time: float,
                 data_wait: float, local_tokens: int, local_samples: int, local_images: int,
                 local_flops: float, peak_flops: float, device: torch.device,
                 local_positions: int | None = None) -> dict[str, float]:
    """The per-step metrics of docs/design.md. Counts are summed over workers (global
    throughput); `tokens_per_second_per_worker` is this worker's own rate. Tokens are real
    tokens; `local_positions` counts the batch's positions, padding included (default: no padding),
    and `padding_fraction` = (positions - tokens) / positions."""
    positions = local_tokens if local_positions is None else local_positions
    tokens, positions, samples, images, flops, workers = global_sum(
        [local_tokens, positions, local_samples, local_images, local_flops, 1.0], device)
    step_time = max(step_time, 1e-9)
    return {
        "loss": float(loss),
        **{k: float(v) for k, v in lrs.items()},
        "grad_norm": float(grad_norm),
        "tokens_per_second": tokens / step_time,
        "tokens_per_second_per_worker": local_tokens / step_time,
        "padding_fraction": (positions - tokens) / positions if positions else 0.0,
        "samples_per_second": samples / step_time,
        "images_per_second": images / step_time,
        "step_time": float(step_time),
        "data_wait": float(data_wait),
        "mfu": flops / (step_time * peak_flops * workers),
        "peak_memory_mb": float(peak_memory_mb(device)),
    }
