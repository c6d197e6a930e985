"""Llama/SmolLM2-style decoder: RMSNorm, rotary embeddings (rotate-half), grouped-query
attention, SwiGLU MLP, optional tied embeddings.

State-dict keys match published nanoVLM checkpoints (`token_embedding`, `blocks.{i}.attn.q_proj`,
`blocks.{i}.mlp.gate_proj`, `blocks.{i}.norm1`, `norm`, `head`, `rotary_embd.inv_freq`).
Numerically it equals transformers' `LlamaForCausalLM` (tests/test_language_model.py).

q/k/v live in one `attn.qkv_proj` weight ([q | k | v] rows) and gate/up in one
`mlp.gate_up_proj` ([gate | up]): one matmul each instead of three and two. The checkpoint keys
stay per projection (`checkpoint.register_split_hooks`).

Padding is on the left. As in transformers' `generate`, position ids count real tokens only
(`cumsum(attention_mask) - 1`), so a padded row computes exactly what it would alone. A KV cache
(`generation.KVCache`) makes the same forward serve prefill and decoding.

Packed rows (several samples one after another, docs/data.md, Packing) come with `sample_ids` [B, T]:
positions restart at 0 where each sample starts, and a block-diagonal causal mask lets every
token attend only to earlier tokens of its own sample, so each sample computes what it would alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.config import VLMConfig
from nanovlm.models.checkpoint import register_split_hooks


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
        rotate_half(x) * sin == swap_halves(x) * sin_signed."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()   # [B, T, hd/2]
        cos = (freqs.cos() * self.attention_scaling).repeat(1, 1, 2)
        sin = freqs.sin() * self.attention_scaling
        sin_signed = torch.cat([-sin, sin], dim=-1)
        return cos.to(dtype)[:, :, None], sin_signed.to(dtype)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1]."""
    swapped = torch.roll(x, x.shape[-1] // 2, dims=-1)   # [x2, x1]: one kernel (cat of two slices took two)
    return torch.addcmul(x * cos, swapped, sin_signed)


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
        # Attention with SDPA's signature; nanovlm.accel may replace it (same maths).
        self.sdpa = F.scaled_dot_product_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache=None, layer: int = 0) -> torch.Tensor:
        B, T, D = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        # q and k are adjacent columns: rotate them together, as H + Hkv heads. split, not slicing:
        # the backward of a split is a cat, which inductor (CPU) writes part by part into the
        # gradient; two slices became one kernel testing every element against all three parts.
        qk, v = self.qkv_proj(x).split([(H + Hkv) * hd, Hkv * hd], dim=-1)   # [B, T, (H + Hkv) hd], [B, T, Hkv hd]
        qk = apply_rotary(qk.view(B, T, H + Hkv, hd), cos, sin)
        q, k = qk.split([H, Hkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, Hkv, hd).transpose(1, 2)   # [B, H | Hkv, T, hd]
        if cache is not None:
            k, v = cache.update(layer, k, v)                                 # [B, Hkv, L, hd]: every cached key
        # enable_gqa: each KV head serves its n_groups query heads without being copied.
        y = self.sdpa(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                      is_causal=is_causal, enable_gqa=self.n_groups > 1)   # [B, H, T, hd]
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.inter_dim = cfg.lm_inter_dim
        # Rows [0:inter] = gate_proj, [inter:] = up_proj (separate keys in the state dict).
        self.gate_up_proj = nn.Linear(cfg.lm_hidden_dim, 2 * cfg.lm_inter_dim, bias=False)
        self.down_proj = nn.Linear(cfg.lm_inter_dim, cfg.lm_hidden_dim, bias=False)
        register_split_hooks(self, "gate_up_proj", [("gate_proj", cfg.lm_inter_dim), ("up_proj", cfg.lm_inter_dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter_dim, dim=-1)       # each [..., inter]
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
    positions it needs while generating or training).
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

    def new_kv_cache(self, batch_size: int, max_len: int, static: bool = False):
        """An empty `generation.KVCache` (or `StaticKVCache`) for `max_len` positions of every block."""
        from nanovlm.models.generation import KVCache, StaticKVCache   # generation builds on this module

        weight = self.token_embedding.weight
        cache = StaticKVCache if static else KVCache
        return cache(len(self.blocks), batch_size, self.cfg.lm_n_kv_heads, max_len,
                     self.cfg.lm_hidden_dim // self.cfg.lm_n_heads, weight.dtype, weight.device)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache=None, defer_last_mlp: bool = False,
                sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: ids [B, T] or embeddings [B, T, D]. attention_mask [B, T] (1 = real token, padding on
        the left); with a cache it may also cover the cached positions ([B, cached + T]). Give
        None rather than all ones: no mask lets SDPA take its causal (flash) path.
        position_ids default to counting real tokens, after those in the cache.

        sample_ids [B, T] (packed rows, no cache): which sample of its row each token belongs to
        (constant along a sample; padding an id of its own). Tokens then attend only within their
        sample (`packed_causal_mask`) and position_ids default to restarting at each sample.

        kv_cache: the new keys and values are stored in it, and every query attends to all it holds.

        defer_last_mlp=True (training, no cache) stops after the last block's attention and
        returns that residual stream [B, T, D]; `finish(rows)` completes any rows of it. The last
        MLP and the final norm are position-wise, so a loss that reads a few positions runs them
        only there (the attention before them needs every position, as keys and values)."""
        if not torch.is_floating_point(x):
            x = self.token_embedding(x)                                     # [B, T, D]
        B, T, _ = x.shape
        if kv_cache is None:
            for name, given in (("attention_mask", attention_mask), ("sample_ids", sample_ids)):
                if given is not None and given.shape != (B, T):
                    raise ValueError(f"{name} has shape {tuple(given.shape)}; expected [B, T] = [{B}, {T}].")
            key_mask = None if attention_mask is None else attention_mask.bool()
            if sample_ids is None:
                mask, is_causal = causal_mask(key_mask, T, 0, x.device)
                positions = count_positions(attention_mask, B, T, x.device)
            else:
                mask, is_causal = packed_causal_mask(sample_ids, key_mask), False
                positions = sample_positions(sample_ids)
        else:
            if defer_last_mlp or sample_ids is not None:
                raise ValueError("defer_last_mlp and sample_ids are for training forwards; they cannot fill a "
                                 "KV cache.")
            positions, mask, is_causal = kv_cache.append(attention_mask, T)   # reserves T slots per block
        cos, sin = self.rotary_embd(positions if position_ids is None else position_ids, x.dtype)

        if defer_last_mlp:
            for block in self.blocks[:-1]:
                x = block(x, cos, sin, mask, is_causal)
            return self.blocks[-1].attend(x, cos, sin, mask, is_causal)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, is_causal, kv_cache, i)
        return self.norm(x)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Rows [..., D] of `forward(..., defer_last_mlp=True)` -> their final hidden states."""
        return self.norm(self.blocks[-1].feed_forward(x))


def count_positions(attention_mask: torch.Tensor | None, B: int, T: int, device,
                    start: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE positions [B, T] of T new tokens, counting real tokens only, after `start` [B] earlier
    ones (none if None). attention_mask: [B, >= T], its last T columns the new tokens, or None."""
    if attention_mask is None:
        positions = torch.arange(T, device=device).expand(B, T)
    else:
        positions = (attention_mask[:, -T:].long().cumsum(-1) - 1).clamp(min=0)   # 0 at each row's first real token
    return positions if start is None else start[:, None] + positions


def causal_mask(key_mask: torch.Tensor | None, T: int, past: int, device) -> tuple[torch.Tensor | None, bool]:
    """Boolean SDPA mask [B, 1, T, past + T] (True = attend), or None with is_causal.

    Query t (absolute position past + t) sees keys j <= past + t that are real tokens
    (key_mask [B, past + T]), and always itself: a padding query then attends to one key instead
    of none, which would give NaN rows that leak through 0 * NaN into later layers."""
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


def sample_positions(sample_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions [B, T] of packed rows: 0 at the first token of each sample, counting up
    within it. sample_ids [B, T] is constant along a sample and changes where the next starts."""
    index = torch.arange(sample_ids.shape[1], device=sample_ids.device).expand_as(sample_ids)
    starts = torch.ones_like(sample_ids, dtype=torch.bool)
    starts[:, 1:] = sample_ids[:, 1:] != sample_ids[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values                 # where each token's sample starts
    return index - first


def packed_causal_mask(sample_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Block-diagonal causal SDPA mask [B, 1, T, T] (True = attend) of packed rows: query t sees
    key j <= t of the same sample (sample_ids [B, T]) that is a real token (key_mask [B, T] or
    None), and always itself (see `causal_mask`). nanoVLM packs under one causal mask, so its
    later samples attend to the earlier ones; this mask keeps them apart."""
    T = sample_ids.shape[1]
    keys = torch.arange(T, device=sample_ids.device)
    causal = keys[None, :] <= keys[:, None]                                     # [T, T]
    mask = causal[None, None] & (sample_ids[:, None, :, None] == sample_ids[:, None, None, :])
    if key_mask is not None:
        mask = (mask & key_mask[:, None, None, :]) | (keys[None, :] == keys[:, None])[None, None]
    return mask


def _init_weights(module: nn.Module) -> None:
    # Llama's initialisation: N(0, 0.02) for every projection and the embedding.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
