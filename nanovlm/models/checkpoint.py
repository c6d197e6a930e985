"""Reading and writing `model.safetensors` with errors that name the file and the tensor, and
the state-dict hooks that keep nanoVLM's checkpoint keys for fused weights.

safetensors' own loader reports a truncated file as "incomplete metadata" and a wrong shape
without the file; here every failure says which file, which tensor, and what was expected.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A weights file is missing, damaged, or does not fit the model."""


def save_weights(model: nn.Module, path: str | Path) -> None:
    """`model.state_dict()` as safetensors. Tied tensors (the same memory under two keys) are
    stored once, under the first key in sorted order, the other key recorded in the metadata
    (what safetensors' `save_model` does). Keys that are row views of a fused weight (the
    decoder's q/k/v and gate/up) are stored as copies: safetensors refuses partial views."""
    state = model.state_dict()
    metadata = {"format": "pt"}
    tied: dict[tuple, list[str]] = {}
    for key, tensor in state.items():
        ident = (tensor.device, tensor.dtype, tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        tied.setdefault(ident, []).append(key)
    for names in tied.values():
        keep, *others = sorted(names)
        for other in others:
            metadata[other] = keep
            del state[other]
    out = {}
    for key, tensor in state.items():
        whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        out[key] = tensor if whole else tensor.contiguous().clone()
    save_file(out, str(path), metadata=metadata)


def read_header(path: str | Path) -> dict[str, dict]:
    """The tensor table of a safetensors file {name: {"dtype", "shape", "data_offsets"}},
    after checking that every tensor's bytes are present."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Weights file {path} does not exist.")
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"Weights file {path} is truncated: {size} bytes, no safetensors header.")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise CheckpointError(f"Weights file {path} is truncated or not a safetensors file: the header "
                                  f"claims {header_len} bytes but the file has {size}.")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"Weights file {path} has a damaged safetensors header: {exc}") from exc
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        if end > data_size:
            raise CheckpointError(
                f"Weights file {path} is truncated: tensor {name!r} {info['dtype']}{info['shape']} needs "
                f"bytes [{begin}, {end}) of the data section but only {data_size} are present. "
                "Re-download or re-save the checkpoint.")
    return header


def load_weights(model: nn.Module, path: str | Path, aliases: dict[str, str] | None = None,
                 optional: tuple[str, ...] = ()) -> None:
    """Copy every tensor of `model.state_dict()` from the file at `path`, in place.

    `aliases` maps a model key to another key that may hold it (tied weights saved once).
    Keys ending with a suffix in `optional` keep the model's value when missing (derived buffers).
    Missing keys and shape mismatches raise `CheckpointError`; extra keys are logged.
    """
    path = Path(path)
    header = read_header(path)
    aliases = aliases or {}
    state = model.state_dict()
    sources: dict[str, str] = {}
    missing = []
    for key, tensor in state.items():
        source = key if key in header else aliases.get(key)
        if source is None or source not in header:
            if key.endswith(optional):
                logger.warning("%s has no %r; keeping the value computed from the config.", path, key)
                continue
            missing.append(key)
            continue
        shape = tuple(header[source]["shape"])
        if shape != tuple(tensor.shape):
            raise CheckpointError(
                f"Weights file {path}: tensor {source!r} has shape {list(shape)} but the model's {key!r} "
                f"is {list(tensor.shape)}. The checkpoint was written for a different config "
                "(check config.json next to it).")
        sources[key] = source
    if missing:
        shown = ", ".join(repr(k) for k in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(f"Weights file {path} lacks {len(missing)} tensor(s) the model needs: {shown}.")
    used = set(sources.values())
    extra = [k for k in header if k not in used]
    if extra:
        logger.warning("%s holds %d tensor(s) the model does not use: %s", path, len(extra), extra[:8])
    with safe_open(str(path), framework="pt", device="cpu") as f, torch.no_grad():
        for key, source in sources.items():
            try:
                value = f.get_tensor(source)
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"Weights file {path}: cannot read tensor {source!r}: {exc}") from exc
            state[key].copy_(value)


def register_split_hooks(module: nn.Module, fused: str, parts: Sequence[tuple[str, int]]) -> None:
    """Store `module.<fused>.weight` (rows = the parts, in order) under one key per part.

    parts: (name, rows) pairs, e.g. (("q_proj", D), ("k_proj", kv), ("v_proj", kv)). Saving
    replaces `<fused>.weight` by `<name>.weight` row views (same storage, same key order as
    separate projections would have); loading concatenates them back."""
    names = [name for name, _ in parts]
    sizes = [rows for _, rows in parts]

    def split_on_save(mod, state_dict, prefix, local_metadata):
        key = f"{prefix}{fused}.weight"
        if key not in state_dict:
            return
        # This module's keys are the last ones written; keep the parts where the fused key was.
        later = [k for k in state_dict if k.startswith(prefix)]
        later = later[later.index(key) + 1:]
        weight = state_dict.pop(key)
        for name, piece in zip(names, weight.split(sizes, dim=0)):
            state_dict[f"{prefix}{name}.weight"] = piece
        for k in later:
            state_dict[k] = state_dict.pop(k)

    def concat_on_load(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        keys = [f"{prefix}{name}.weight" for name in names]
        present = [k for k in keys if k in state_dict]
        if not present:
            return                      # a fused key (or nothing) is given: the default loading handles it
        if len(present) < len(keys):
            if strict:
                error_msgs.append(f"{prefix}{fused}.weight is stored as {keys}; only {present} are given.")
            return
        pieces = [state_dict[k] for k in keys]
        expected = [(rows, mod.get_submodule(fused).in_features) for rows in sizes]
        if [tuple(t.shape) for t in pieces] != expected:
            error_msgs.append(f"{prefix}{fused}: {keys} have shapes {[list(t.shape) for t in pieces]}, "
                              f"the model expects {[list(e) for e in expected]} (a checkpoint of another config?).")
            return
        for k in keys:
            del state_dict[k]
        state_dict[f"{prefix}{fused}.weight"] = torch.cat(pieces, dim=0)

    module.register_state_dict_post_hook(split_on_save)
    module.register_load_state_dict_pre_hook(concat_on_load)
