"""The CPU decode step as one C++ call (`fused_decode.cpp`), for `generate(compile=True)` on CPU.

Batch-1 decoding reads every decoder weight once per token (memory-bound), and between those
reads runs ~25 small ops per block, each starting with cold caches after a weight read. The C++
step keeps the matrix products in ATen (MKL) and does RMSNorm, RoPE, the cache write, attention
over the cache and SwiGLU as loops (docs/benchmarks.md has the measurements).

It computes what the decoder's forward computes with a `generation.KVCache` for one token per row
(tests/test_generate.py holds it to that): it writes this token's keys and values into the
cache's `k`/`v` buffers at slot `length`, attends over slots [0, length] where `key_mask` allows,
and takes RoPE tables precomputed for every step.

The extension is built on first use with `torch.utils.cpp_extension` (needs a C++ compiler and
ninja, which `pip install -e '.[cpu-fast]'` installs; ~25 s, once per machine and source version,
cached in TORCH_EXTENSIONS_DIR). Where it cannot be built, `extension()` says so once and returns
None, and callers fall back to `torch.compile`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_decode.cpp")
NAME = "nanovlm_fused_decode"
INSTALL_HINT = "pip install -e '.[cpu-fast]'"
STALE_LOCK_S = 600   # a build takes ~25 s; a lock this old was left by a process killed mid-build
_extension = None
_build_failed = False


def extension():
    """The built module (`FusedDecoder`), or None where it cannot be built (logged once)."""
    global _extension, _build_failed
    if _extension is None and not _build_failed:
        try:
            from torch.utils.cpp_extension import load
            _put_ninja_on_path()
            _clear_stale_build_lock()
            logger.info("Loading the fused CPU decode step (compiled on first use per machine: ~25 s)...")
            _extension = load(name=NAME, sources=[str(SOURCE)], extra_cflags=["-O3"])
        except Exception as exc:   # no compiler, no ninja, no headers: the torch.compile path still works
            _build_failed = True
            logger.warning("The fused CPU decode step could not be built (%s: %s); decoding falls back to "
                           "torch.compile. It needs ninja and a C++ compiler: %s installs ninja.",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", INSTALL_HINT)
    return _extension


def _clear_stale_build_lock() -> None:
    """torch's builder waits, without a timeout, for the build directory's `lock` file to go;
    a process killed while building (a Tune trial stopped early, a Ray worker restarted) leaves
    it behind, and every later build would hang on it. Remove such a lock."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        lock = Path(_get_build_directory(NAME, verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (ImportError, OSError):   # no lock (the usual case), or torch moved its helper
        return
    if age > STALE_LOCK_S:
        logger.warning("Removing %s, left %.0f s ago by a build that did not finish.", lock, age)
        lock.unlink(missing_ok=True)


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` package (the `cpu-fast` extra) ships one,
    whose directory is not on PATH when the venv's python runs without activating the venv."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def supports(decoder: torch.nn.Module) -> bool:
    """Contiguous float32 weights on CPU: what the C++ step is written for."""
    return all(p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
               for p in decoder.parameters())


def fused_decoder(decoder: torch.nn.Module):
    """A `FusedDecoder` over `decoder`'s own weight tensors (no copies), or None where the
    extension is unavailable or the weights are not float32 on CPU."""
    if not supports(decoder):
        return None
    ext = extension()
    if ext is None:
        return None
    blocks = []
    for block in decoder.blocks:
        blocks += [block.norm1.weight, block.attn.qkv_proj.weight, block.attn.out_proj.weight,
                   block.norm2.weight, block.mlp.gate_up_proj.weight, block.mlp.down_proj.weight]
    cfg = decoder.cfg
    return ext.FusedDecoder(decoder.token_embedding.weight.detach(), [w.detach() for w in blocks],
                            decoder.norm.weight.detach(), cfg.lm_n_heads, cfg.lm_n_kv_heads, cfg.lm_rms_eps)
