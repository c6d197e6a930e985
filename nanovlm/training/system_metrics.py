"""CPU, memory and GPU use of the machine that trains, sampled on a thread and logged with the steps.

    sampler thread "nanovlm-sysmetrics"              training thread (rank 0)
    every `interval_s`: psutil (+ CUDA) ─► latest ─► on_step: take() merges the sample, if a new
                                                     one is there, into that step's metrics

The sample travels in the step's journal line (`nanovlm.tracking_journal`), so it costs the step
a dict merge, is sent with the other metrics, survives a store outage, and is logged once even
when Ray restarts the workers. Keys follow MLflow's own system metrics (`system/...`), which the
MLflow UI shows in the run's "System metrics" tab:

    system/cpu_utilization_percentage       all cores of the machine, since the previous sample
    system/system_memory_usage_megabytes    used memory of the machine (and _percentage)
    system/process_memory_rss_megabytes     this process (rank 0's worker)
    system/gpu_<i>_memory_usage_megabytes   used memory of each GPU this process sees (and _percentage),
    system/gpu_<i>_utilization_percentage   the latter where NVML (pip install nvidia-ml-py) is available

Only GPUs the process can see: a Ray worker sees its own (CUDA_VISIBLE_DEVICES), so rank 0 reports
its GPU, not the whole node's.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

import psutil
import torch

logger = logging.getLogger(__name__)

PREFIX = "system/"
MB = 1e6


def sample(use_cuda: bool) -> dict[str, float]:
    """One sample. CPU utilisation is measured since the previous call (the first call in a
    process reads 0: call once to start the clock)."""
    memory = psutil.virtual_memory()
    values = {
        "cpu_utilization_percentage": psutil.cpu_percent(interval=None),
        "system_memory_usage_megabytes": (memory.total - memory.available) / MB,
        "system_memory_usage_percentage": memory.percent,
        "process_memory_rss_megabytes": psutil.Process().memory_info().rss / MB,
    }
    if use_cuda and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            values[f"gpu_{i}_memory_usage_megabytes"] = (total - free) / MB
            values[f"gpu_{i}_memory_usage_percentage"] = 100.0 * (total - free) / total
            try:
                values[f"gpu_{i}_utilization_percentage"] = float(torch.cuda.utilization(i))
            except Exception:  # noqa: BLE001 - no NVML (nvidia-ml-py) here: memory only
                pass
    return {PREFIX + k: float(v) for k, v in values.items()}


class SystemMetricsSampler:
    """Samples every `interval_s` seconds on a daemon thread; `take()` hands the newest sample
    over once (None when there is no new one). `interval_s <= 0` samples nothing."""

    def __init__(self, interval_s: float, use_cuda: bool):
        self.interval_s = interval_s
        self.use_cuda = use_cuda
        self._latest: Optional[dict[str, float]] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if interval_s > 0:
            self._thread = threading.Thread(target=self._run, name="nanovlm-sysmetrics", daemon=True)
            self._thread.start()

    def take(self) -> Optional[dict[str, float]]:
        with self._lock:
            latest, self._latest = self._latest, None
        return latest

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            sample(self.use_cuda)  # starts the CPU clock
            while not self._stop.wait(self.interval_s):
                values = sample(self.use_cuda)
                with self._lock:
                    self._latest = values
        except Exception as exc:  # noqa: BLE001 - metrics about the machine must never stop training
            logger.warning("System metrics stopped: %s: %s", type(exc).__name__, exc)
