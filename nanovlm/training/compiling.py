"""torch.compile for training, with the options measured best per device."""

from __future__ import annotations

from typing import Callable

import torch


def compile_for_training(model: torch.nn.Module | Callable, device: torch.device, dynamic: bool | None = None):
    """`torch.compile(model)` (a module or a function); on CPU with inductor's C++ wrapper, which
    calls the generated kernels from C++ instead of Python: ~3 ms less per step of the 27M `compare` config
    (2 threads; ~9 ms of its step was the Python wrappers' own time), at a longer first compile.
    dynamic=False compiles for one input shape (benchmarks); None lets torch decide."""
    options = {"cpp_wrapper": True} if device.type == "cpu" else None
    return torch.compile(model, dynamic=dynamic, options=options)
