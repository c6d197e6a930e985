"""Applying the speed paths to a model, from outside (as torchtitan's `apply_*` functions do).

- `apply_training_kernels(model)`: the exact loss kernel (`linear_cross_entropy`), for every
  training run, eager or compiled, on any device. The training loop and the benchmark harness call it.
- `apply_cpu_kernels(model)`: the forms inductor compiles faster on CPU: written-out attentions,
  GELU as x * sigmoid(2u), the token embedding kept out of the graph, and the training tail
  compiled on its own for any number of rows.
- `compile_for_training(model, device)`: both where they apply, then `torch.compile`.

Installs are in place and stay after compiling, so the eager model then computes the same maths
in these forms too.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.accel.kernels import causal_attention, gelu_sigmoid, head_loss, vit_attention
from nanovlm.models.language_model import GroupedQueryAttention, LanguageModel
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.models.vision_transformer import ViTAttention, ViTMLP

# inductor's C++ wrapper calls the generated CPU kernels from C++ instead of Python: a few ms less
# per step of the 27M `compare` config, at a longer first compile.
CPU_OPTIONS = {"cpp_wrapper": True}


def compile_for_training(model: nn.Module, device: torch.device, dynamic: bool | None = None) -> nn.Module:
    """`torch.compile(model)` after installing the kernels for training on `device` (in place;
    `model` may be wrapped, e.g. in DDP). dynamic=False compiles for one input shape
    (benchmarks); None lets torch decide."""
    apply_training_kernels(model)
    if device.type != "cpu":
        return torch.compile(model, dynamic=dynamic)
    apply_cpu_kernels(model)
    return torch.compile(model, dynamic=dynamic, options=CPU_OPTIONS)


def apply_training_kernels(model: nn.Module) -> nn.Module:
    """The VLM's head and loss on the supervised rows through `linear_cross_entropy` (float32
    without autocast; the plain head otherwise). Exact, so every training run uses it."""
    for module in _unwrap(model).modules():
        if isinstance(module, VisionLanguageModel):
            module.head_loss = head_loss
    return model


def apply_cpu_kernels(model: nn.Module) -> nn.Module:
    """The forms inductor compiles faster on CPU, installed on every module they apply to."""
    for module in _unwrap(model).modules():
        if isinstance(module, ViTAttention):
            module.sdpa = vit_attention
        elif isinstance(module, GroupedQueryAttention):
            module.sdpa = causal_attention
        elif isinstance(module, ViTMLP):
            module.act = gelu_sigmoid
        elif isinstance(module, LanguageModel):
            module.token_embedding.forward = functools.partial(_embedding_eager_backward, module.token_embedding)
        elif isinstance(module, VisionLanguageModel):
            module.finish_rows = _finish_rows
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)   # DistributedDataParallel keeps the model in .module


def _embedding_eager_backward(embedding: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """The embedding lookup, outside torch.compile where its backward runs: inductor's CPU backward
    of an embedding zero-fills the [V, D] gradient and scatters into it on one thread, ATen's
    runs on every thread. Inference keeps it in the graph (no graph break in a compiled decode step)."""
    if torch.is_grad_enabled() and embedding.weight.requires_grad:
        return _eager_embedding(ids, embedding.weight)
    return nn.Embedding.forward(embedding, ids)


@torch.compiler.disable
def _eager_embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, weight)


def _finish_rows(decoder: LanguageModel, rows: torch.Tensor) -> torch.Tensor:
    """`decoder.finish(rows)`, compiled on CPU (see `_compiled_finish`)."""
    return _compiled_finish()(decoder, rows) if rows.is_cpu else decoder.finish(rows)


@functools.cache
def _compiled_finish():
    """`LanguageModel.finish` (the last MLP and the final norm of the supervised rows) compiled for
    CPU and any number of rows (dynamic shapes): its norms and SwiGLU fused instead of ~20 eager
    kernels forward and backward. The model's compiled forward runs the tail eagerly (the rows are
    selected by data), so this is its own compiled graph. Built on first use."""
    return torch.compile(LanguageModel.finish, dynamic=True, options=CPU_OPTIONS)
