"""Faster forms of the model's maths, installed by `nanovlm.accel.compile` (never picked inside a
model's forward). Each computes what the plain op it replaces computes; tests hold them to it.

The attentions take SDPA's signature and layout ([B, heads, T, head_dim]) and fall back to SDPA
outside the cases they are written for; inductor fuses the layout changes around them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.models.vision_language_model import head_cross_entropy

# Up to this many patches the ViT's attention is written out on CPU: SDPA's fixed costs dominate
# short sequences there, compiled forward and backward.
VIT_MATH_MAX_LEN = 256
# Up to this many positions causal attention without padding is written out on CPU; beyond it,
# flash SDPA, which skips the masked half, is faster.
CAUSAL_MATH_MAX_LEN = 128

_TWO_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)


def vit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  dropout_p: float = 0.0, is_causal: bool = False, enable_gqa: bool = False) -> torch.Tensor:
    """SDPA for the ViT: softmax(q k^T / sqrt(hd)) v written out for unmasked CPU sequences of up
    to VIT_MATH_MAX_LEN; q, k, v [B, H, T, hd] -> [B, H, T, hd]."""
    if attn_mask is None and not is_causal and not enable_gqa and q.is_cpu and q.shape[2] <= VIT_MATH_MAX_LEN:
        weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1)   # [B, H, T, T]
        return F.dropout(weights, dropout_p) @ v if dropout_p > 0.0 else weights @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          enable_gqa=enable_gqa)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                     dropout_p: float = 0.0, is_causal: bool = False, enable_gqa: bool = False) -> torch.Tensor:
    """SDPA for the decoder: `grouped_causal_attention` for causal, unmasked self-attention (as many
    keys as queries: no cache before them) of up to CAUSAL_MATH_MAX_LEN positions on CPU."""
    if is_causal and attn_mask is None and q.is_cpu and q.shape[2] == k.shape[2] <= CAUSAL_MATH_MAX_LEN:
        return grouped_causal_attention(q, k, v, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          enable_gqa=enable_gqa)


def grouped_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(hd)) v written out, q [B, H, T, hd], k and v [B, Hkv, T, hd] ->
    [B, H, T, hd]. The query heads of each KV group (h = kv * G + g) are stacked along the
    sequence axis, so each KV head is read once and the products are [G T, hd] x [hd, T] per KV
    head: compiled on CPU, faster than flash SDPA up to ~128 positions."""
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    qg = q.reshape(B, Hkv, G * T, hd)
    scores = (qg * hd ** -0.5) @ k.transpose(-1, -2)                             # [B, Hkv, G T, T]
    row_position = torch.arange(G * T, device=q.device) % T
    future = torch.arange(T, device=q.device)[None, :] > row_position[:, None]
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    if dropout > 0.0:
        weights = F.dropout(weights, dropout)
    return (weights @ v).view(B, H, T, hd)                                     # [B, Hkv, G T, hd] -> [B, H, T, hd]


def gelu_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, as x * sigmoid(2u) = 0.5 x (1 + tanh(u)) for
    u = sqrt(2/pi) (x + 0.044715 x^3): inductor's CPU code for this form is faster than for tanh
    (outputs within 5e-7 of F.gelu(x, approximate="tanh"))."""
    return x * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits `hidden @ weight^T` against `targets`. Backward turns the
    saved log-probabilities into softmax - one_hot in place, where F.cross_entropy allocates and
    fills a [N, V] gradient for the NLL and another for log_softmax's backward; the loss is the
    same bit for bit. Its weight gradient is a fresh tensor, so autograd adds a tied embedding's
    gradient to it in place. Backward runs once (the log-probabilities are consumed)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = hidden @ weight.t()                                              # [N, V]
        # On CPU in place (each row is read for its max and sum before it is written): a second
        # [N, V] buffer per step cost glibc's heap thousands of page faults.
        log_probs = torch.log_softmax(logits, 1, out=logits) if logits.is_cpu else torch.log_softmax(logits, 1)
        ctx.save_for_backward(hidden, weight, targets, log_probs)
        return -log_probs.gather(1, targets[:, None]).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, targets, log_probs = ctx.saved_tensors
        probs = log_probs.exp_()                                                  # softmax, in place
        probs[torch.arange(len(targets), device=probs.device), targets] -= 1.0
        probs.mul_(grad / len(targets))
        grad_hidden = probs @ weight if ctx.needs_input_grad[0] else None
        grad_weight = probs.t() @ hidden if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight), targets), float32, in fewer memory passes:
    hidden [N, D], weight [V, D], targets [N] (all supervised) -> mean loss."""
    return _LinearCrossEntropy.apply(hidden, weight, targets)


def head_loss(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """The model's `head_cross_entropy`, as `linear_cross_entropy` where that applies: float32
    activations, a head without bias, no autocast."""
    if hidden.dtype == torch.float32 and head.bias is None and not torch.is_autocast_enabled(hidden.device.type):
        return linear_cross_entropy(hidden, head.weight, targets)
    return head_cross_entropy(hidden, head, targets)
