"""Llama/SmolLM2-style decoder: RMSNorm, rotary embeddings (rotate-half), grouped-query
attention, SwiGLU MLP, optional tied embeddings, and a preallocated KV cache.

State-dict keys match published nanoVLM checkpoints (`token_embedding`, `blocks.{i}.attn.q_proj`,
`blocks.{i}.mlp.gate_proj`, `blocks.{i}.norm1`, `norm`, `head`, `rotary_embd.inv_freq`).
Numerically it equals transformers' `LlamaForCausalLM` (tests/test_language_model.py).

For speed, q/k/v live in one `attn.qkv_proj` weight ([q | k | v] rows) and gate/up in one
`mlp.gate_up_proj` ([gate | up]): one matmul each instead of three and two. State-dict hooks keep
the checkpoint keys per projection: `state_dict()` holds `q_proj`/`k_proj`/`v_proj` (and
`gate_proj`/`up_proj`) as row views of the fused weight, so writing into them in place (as
`checkpoint.load_weights` and `hf_import.copy_into` do) fills the fused weight, and
`load_state_dict` concatenates them back.

Padding is on the left. As in transformers' `generate`, position ids count real tokens only
(`cumsum(attention_mask) - 1`), so a padded row computes exactly what it would alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.config import VLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight, fused by torch.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE: theta_i = base^(-2i / head_dim)."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        head_dim = cfg.lm_hidden_dim // cfg.lm_n_heads
        inv_freq = 1.0 / (cfg.lm_re_base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        # Persistent: nanoVLM checkpoints carry `decoder.rotary_embd.inv_freq`.
        self.register_buffer("inv_freq", inv_freq, persistent=True)
        self.attention_scaling = cfg.lm_attn_scaling

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, signed sin, each [B, T, 1, head_dim] (float32 math, then `dtype`;
        the 1 broadcasts over heads of activations laid out [B, T, heads, head_dim]).

        The sign of rotate-half is folded into the sine table, sin_signed = [-sin, sin], so that
        rotate_half(x) * sin == swap_halves(x) * sin_signed (fewer kernels per decode step)."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()   # [B, T, hd/2]
        cos = (freqs.cos() * self.attention_scaling).repeat(1, 1, 2)
        sin = freqs.sin() * self.attention_scaling
        sin_signed = torch.cat([-sin, sin], dim=-1)
        return cos.to(dtype)[:, :, None], sin_signed.to(dtype)[:, :, None]


def _as(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The norm gain in x's dtype: under autocast `addmm` returns bfloat16 activations, and
    rms_norm with a float32 gain falls back from its fused kernel to a slow composite."""
    return weight if weight.dtype == x.dtype else weight.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1]."""
    swapped = torch.roll(x, x.shape[-1] // 2, dims=-1)   # [x2, x1]: one kernel (cat of two slices took two)
    return torch.addcmul(x * cos, swapped, sin_signed)


class KVCache:
    """Keys and values of every layer, preallocated: [n_layers, B, n_kv_heads, max_len, head_dim].

    Each forward writes its new keys/values at [length, length + T) and advances `length`;
    nothing is concatenated. `key_mask` [B, max_len] (True = real token) exists only when the
    prompt had padding; `next_position` [B] is each row's next RoPE position (device tensor,
    so decoding never syncs with the host).
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.key_mask: torch.Tensor | None = None
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)


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


# Up to this many positions, causal attention without padding runs written out under torch.compile
# on CPU (`grouped_causal_attention`); beyond it, flash SDPA, which skips the masked half.
CAUSAL_MATH_ATTENTION_MAX_LEN = 128


def grouped_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(hd)) v written out, q [B, T, H, hd], k and v [B, T, Hkv, hd] ->
    [B, T, H * hd]. The query heads of each KV group are stacked along the sequence axis, so each
    KV head is read once and the products are [n_groups * T, hd] x [hd, T] per KV head. For
    torch.compile on CPU: at [8, 64 positions, 6 heads, 2 KV heads, 64] forward and backward took
    1.45 ms against 2.04 for flash SDPA compiled at 2 threads (2.40 vs 2.68 at 1; 3.9 vs 4.9 ms
    at 128 positions; slower from 256, where SDPA's skipping of the masked half pays)."""
    B, T, H, hd = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    qg = q.reshape(B, T, Hkv, G, hd).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, hd)
    scores = (qg * hd ** -0.5) @ k.permute(0, 2, 3, 1)                          # [B, Hkv, G T, T]
    row_position = torch.arange(G * T, device=q.device) % T
    future = torch.arange(T, device=q.device)[None, :] > row_position[:, None]
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    if dropout > 0.0:
        weights = F.dropout(weights, dropout)
    y = weights @ v.transpose(1, 2)                                             # [B, Hkv, G T, hd]
    return y.view(B, Hkv, G, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, H * hd)


class GroupedQueryAttention(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.n_heads = cfg.lm_n_heads
        self.n_kv_heads = cfg.lm_n_kv_heads
        self.n_groups = self.n_heads // self.n_kv_heads
        self.head_dim = cfg.lm_hidden_dim // cfg.lm_n_heads
        self.dropout = cfg.lm_dropout
        d, kv = cfg.lm_hidden_dim, self.n_kv_heads * self.head_dim
        # Rows [0:d] = q_proj, [d:d+kv] = k_proj, [d+kv:] = v_proj (separate keys in the state dict).
        self.qkv_proj = nn.Linear(d, d + 2 * kv, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)
        register_split_hooks(self, "qkv_proj", [("q_proj", d), ("k_proj", kv), ("v_proj", kv)])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, D = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)                                                   # [B, T, (H + 2 Hkv) hd]
        # q and k are adjacent columns: rotate them together, as H + Hkv heads.
        # split, not slicing: the backward of a split is a cat, which inductor (CPU) builds by
        # writing each part into its columns of the gradient; the backward of two slices became
        # one masked kernel that tested every element against all three parts (perf, 27M compare
        # step: 8.9 -> 4.1 ms of CPU time for that kernel).
        qk, v = qkv.split([(H + Hkv) * hd, Hkv * hd], dim=-1)
        qk = apply_rotary(qk.view(B, T, H + Hkv, hd), cos, sin)
        q, k = qk.split([H, Hkv], dim=2)
        v = v.view(B, T, Hkv, hd)
        dropout = self.dropout if self.training else 0.0
        if (cache is None and mask is None and is_causal and x.device.type == "cpu"
                and T <= CAUSAL_MATH_ATTENTION_MAX_LEN and torch.compiler.is_compiling()):
            return self.out_proj(grouped_causal_attention(q, k, v, dropout))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)       # [B, H | Hkv, T, hd]

        if cache is not None:
            start, end = cache.length, cache.length + T
            cache.k[layer, :, :, start:end] = k
            cache.v[layer, :, :, start:end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]               # [B, Hkv, L, hd]

        if T == 1 and self.n_groups > 1:
            # Decode step: fold the query heads of each KV group into the "sequence" axis, so
            # every KV head is read once instead of being copied n_groups times. Query head
            # h = kv * n_groups + g, the same grouping as repeat_interleave.
            qg = q.view(B, self.n_kv_heads, self.n_groups, self.head_dim)
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            # enable_gqa reads each KV head for its n_groups query heads without copying it
            # (measured faster than repeat_interleave on CPU and on an H100, masked or causal).
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                               enable_gqa=self.n_groups > 1)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D) if T > 1 else y.reshape(B, 1, D))


class SwiGLU(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.inter_dim = cfg.lm_inter_dim
        # Rows [0:inter] = gate_proj, [inter:] = up_proj (separate keys in the state dict).
        self.gate_up_proj = nn.Linear(cfg.lm_hidden_dim, 2 * cfg.lm_inter_dim, bias=False)
        self.down_proj = nn.Linear(cfg.lm_inter_dim, cfg.lm_hidden_dim, bias=False)
        register_split_hooks(self, "gate_up_proj", [("gate_proj", cfg.lm_inter_dim), ("up_proj", cfg.lm_inter_dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter_dim, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LanguageModelBlock(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        self.attn = GroupedQueryAttention(cfg)
        self.norm2 = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, layer=0):
        return self.feed_forward(self.attend(x, cos, sin, mask, is_causal, cache, layer))

    def attend(self, x, cos, sin, mask, is_causal, cache=None, layer=0):
        """The attention half of the block, with its residual: x + attn(norm1(x))."""
        return x + self.attn(self.norm1(x), cos, sin, mask, is_causal, cache, layer)

    def feed_forward(self, x):
        """The MLP half, with its residual: x + mlp(norm2(x)). Position-wise, so any rows of
        [..., D] (e.g. only the supervised positions of a batch) give those rows' outputs."""
        return x + self.mlp(self.norm2(x))


class LanguageModel(nn.Module):
    """Token ids [B, T] or embeddings [B, T, D] -> final hidden states [B, T, D].

    `head` turns hidden states into vocabulary logits; the VLM applies it (only to the
    positions it needs while generating).
    """

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.lm_vocab_size, cfg.lm_hidden_dim)
        self.rotary_embd = RotaryEmbedding(cfg)
        self.blocks = nn.ModuleList([LanguageModelBlock(cfg) for _ in range(cfg.lm_n_blocks)])
        self.norm = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        self.head = nn.Linear(cfg.lm_hidden_dim, cfg.lm_vocab_size, bias=False)
        self.apply(_init_weights)
        if cfg.lm_tie_weights:
            self.head.weight = self.token_embedding.weight

    def new_kv_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> KVCache:
        weight = self.token_embedding.weight
        return KVCache(len(self.blocks), batch_size, self.cfg.lm_n_kv_heads, max_len,
                       self.cfg.lm_hidden_dim // self.cfg.lm_n_heads,
                       dtype or weight.dtype, device or weight.device)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, defer_last_mlp: bool = False,
                ) -> torch.Tensor:
        """x: ids [B, T] or embeddings [B, T, D]. attention_mask [B, T] (1 = real token, padding on
        the left); with a cache it may also cover the cached positions ([B, length + T]).
        position_ids default to counting real tokens (cumsum of the mask) or continuing the cache.

        defer_last_mlp=True (training, no cache) stops after the last block's attention and
        returns that residual stream [B, T, D]; `finish(rows)` completes any rows of it. The last
        MLP and the final norm are position-wise, so a loss that reads a few positions runs them
        only there (the attention before them needs every position, as keys and values).

        Decoding: with `rope` = this step's (cos, sin) slices of `decode_rope`, x is one token id
        per row [B] and the result is [B, D] (see `decode_step`)."""
        if rope is not None:
            return self.decode_step(x, kv_cache, *rope)
        if not torch.is_floating_point(x):
            x = self.token_embedding(x)
        B, T, _ = x.shape
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is not None and past == 0 and _no_padding(attention_mask):
            # No padding: drop the mask so SDPA can take its causal (flash) path. One host sync
            # per prefill / training forward, never inside the decode loop.
            attention_mask = None
        if kv_cache is not None and past + T > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} positions; {past} are used and {T} more were given.")

        key_mask = self._key_mask(attention_mask, B, T, past, kv_cache)       # [B, past + T] bool or None
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, B, T, past, kv_cache, x.device)
        mask, is_causal = _attention_mask(key_mask, T, past, x.device)
        cos, sin = self.rotary_embd(position_ids, x.dtype)

        if defer_last_mlp:
            if kv_cache is not None:
                raise ValueError("defer_last_mlp is for training forwards; it cannot fill a KV cache.")
            for block in self.blocks[:-1]:
                x = block(x, cos, sin, mask, is_causal)
            return self.blocks[-1].attend(x, cos, sin, mask, is_causal)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, is_causal, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
            kv_cache.next_position = position_ids[:, -1] + 1
        return self.norm(x)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Rows [..., D] of `forward(..., defer_last_mlp=True)` -> their final hidden states."""
        return self.norm(self.blocks[-1].feed_forward(x))

    # ------------------------------------------------------------------ decoding
    def decode_rope(self, kv_cache: KVCache, n_steps: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for the next `n_steps` single-token steps of every row, computed once per
        generation: cos, signed sin [B, n_steps, 1, head_dim] (same math as `rotary_embd`)."""
        positions = kv_cache.next_position[:, None] + torch.arange(n_steps, device=kv_cache.next_position.device)
        return self.rotary_embd(positions, dtype)                          # [B, n, 1, hd]

    def decode_step(self, token: torch.Tensor, kv_cache: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One generated token per row through every block: token [B] -> final hidden [B, D].

        The same computation as `forward(token[:, None], kv_cache=...)` (equal outputs), written
        for the decode loop's per-token cost on CPU and small GPUs: 2-D activations, weights used
        directly instead of module calls, the residual adds fused into `addmm`, no mask or
        position bookkeeping. cos, sin: this step's slice of `decode_rope`, [B, 1, head_dim]."""
        p = kv_cache.length
        if p + 1 > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} positions; all are used.")
        # Padded prompts: each row attends to its real tokens (and every generated one).
        mask = None if kv_cache.key_mask is None else kv_cache.key_mask[:, None, None, :p + 1]

        def store(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kv_cache.k[i, :, :, p] = k
            kv_cache.v[i, :, :, p] = v
            return kv_cache.k[i, :, :, :p + 1], kv_cache.v[i, :, :, :p + 1]

        hidden = self._decode_blocks(token, cos, sin, mask, store)
        kv_cache.length = p + 1
        return hidden

    def static_decode_step(self, token: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           key_mask: torch.Tensor | None, cos_table: torch.Tensor, sin_table: torch.Tensor,
                           position: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """`decode_step` with shapes that do not change from step to step, for `torch.compile`
        (and CUDA graphs on GPU): the step's cache slot `position` and its index `step` into the
        `decode_rope` tables are 0-dim device tensors, the new keys and values are written with
        `index_copy_`, and attention reads the whole preallocated cache with the slots after
        `position` masked out (they add exact zeros). k_cache, v_cache: KVCache.k / .v;
        key_mask: KVCache.key_mask or None; cos_table, sin_table: `decode_rope`'s [B, n, 1, hd]."""
        cos = cos_table.index_select(1, step.view(1))[:, 0]              # [B, 1, hd]
        sin = sin_table.index_select(1, step.view(1))[:, 0]
        slots = torch.arange(k_cache.shape[3], device=token.device)
        mask = (slots <= position)[None, None, None, :]                    # [1, 1, 1, max_len]
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :]
        where = position.view(1)

        def store(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            k_cache[i].index_copy_(2, where, k[:, :, None].to(k_cache.dtype))
            v_cache[i].index_copy_(2, where, v[:, :, None].to(v_cache.dtype))
            return k_cache[i], v_cache[i]

        return self._decode_blocks(token, cos, sin, mask, store)

    def _decode_blocks(self, token: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                       store) -> torch.Tensor:
        """The blocks of one decode step, token [B] -> final hidden [B, D]. `store(i, k, v)` puts
        block i's new keys and values ([B, Hkv, hd]) in the cache and returns the keys and values
        to attend to ([B, Hkv, L, hd]); `mask` says which of them each row may see."""
        B = token.shape[0]
        cfg = self.cfg
        D, H, Hkv = cfg.lm_hidden_dim, cfg.lm_n_heads, cfg.lm_n_kv_heads
        hd, eps = D // H, cfg.lm_rms_eps
        x = F.embedding(token, self.token_embedding.weight)               # [B, D]
        for i, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            h = F.rms_norm(x, (D,), _as(block.norm1.weight, x), eps)
            qkv = F.linear(h, attn.qkv_proj.weight)                          # [B, (H + 2 Hkv) hd]
            qk = qkv[:, :(H + Hkv) * hd].view(B, H + Hkv, hd)                 # q and k heads, rotated together
            qk = apply_rotary(qk, cos, sin)
            keys, values = store(i, qk[:, H:], qkv[:, (H + Hkv) * hd:].view(B, Hkv, hd))
            # Query heads of a KV group share its keys: [B, Hkv, n_groups, hd] against [B, Hkv, L, hd].
            y = F.scaled_dot_product_attention(qk[:, :H].reshape(B, Hkv, H // Hkv, hd), keys, values,
                                               attn_mask=mask)
            x = torch.addmm(x, y.reshape(B, D), attn.out_proj.weight.t())
            h = F.rms_norm(x, (D,), _as(block.norm2.weight, x), eps)
            gate, up = F.linear(h, mlp.gate_up_proj.weight).split(mlp.inter_dim, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, mlp.down_proj.weight.t())
        return F.rms_norm(x, (D,), _as(self.norm.weight, x), eps)

    @staticmethod
    def _key_mask(attention_mask, B, T, past, kv_cache) -> torch.Tensor | None:
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            if attention_mask.shape == (B, past + T):
                full = attention_mask
            elif attention_mask.shape == (B, T):
                prev = kv_cache.key_mask[:, :past] if kv_cache is not None and kv_cache.key_mask is not None \
                    else torch.ones(B, past, dtype=torch.bool, device=attention_mask.device)
                full = torch.cat([prev, attention_mask], dim=1)
            else:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                                 f"[B, T] = [{B}, {T}] or [B, cached + T] = [{B}, {past + T}].")
            if kv_cache is not None:
                if kv_cache.key_mask is None:
                    kv_cache.key_mask = torch.ones(B, kv_cache.max_len, dtype=torch.bool, device=full.device)
                kv_cache.key_mask[:, :past + T] = full
            return full
        if kv_cache is not None and kv_cache.key_mask is not None:
            return kv_cache.key_mask[:, :past + T]   # later positions were set to True when allocated
        return None

    @staticmethod
    def _position_ids(attention_mask, B, T, past, kv_cache, device) -> torch.Tensor:
        steps = torch.arange(T, device=device)
        if past > 0 and kv_cache is not None:
            return kv_cache.next_position[:, None] + steps                  # [B, T]
        if attention_mask is not None:
            mask = attention_mask[:, -T:].long()
            return (mask.cumsum(-1) - 1).clamp(min=0)                        # 0 at each row's first real token
        return steps.expand(B, T)


@torch.compiler.disable
def _no_padding(attention_mask: torch.Tensor) -> bool:
    """Whether every position is a real token. The answer picks the attention path, so it is
    read on the host; under torch.compile that is one graph break, taken here without Dynamo's
    multi-line warning about data-dependent branches."""
    return bool(attention_mask.all())


def _attention_mask(key_mask: torch.Tensor | None, T: int, past: int, device) -> tuple[torch.Tensor | None, bool]:
    """Boolean SDPA mask [B, 1, T, past + T] (True = attend), or None with is_causal.

    Query t (absolute position past + t) sees keys j <= past + t that are real tokens, and
    always itself: a padding query then attends to one key instead of none, which would give
    NaN rows that leak through 0 * NaN into later layers."""
    if key_mask is None:
        if T == 1:
            return None, False            # one new token sees the whole cache
        if past == 0:
            return None, True
    L = past + T
    keys = torch.arange(L, device=device)
    queries = past + torch.arange(T, device=device)
    causal = keys[None, :] <= queries[:, None]                              # [T, L]
    if key_mask is None:
        return causal[None, None], False
    mask = causal[None, None] & key_mask[:, None, None, :]
    mask = mask | (keys[None, :] == queries[:, None])[None, None]
    return mask, False


def _init_weights(module: nn.Module) -> None:
    # Llama's initialisation: N(0, 0.02) for every projection and the embedding.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
