"""SigLIP-style vision transformer: conv patch embedding, learned positions, pre-LN blocks.

Parameter names match published nanoVLM checkpoints (`patch_embedding.conv`,
`patch_embedding.position_embedding`, `blocks.{i}.attn.qkv_proj`, `blocks.{i}.ln1`, ...), so a
checkpoint's `vision_encoder.*` keys load directly. Numerically it equals transformers'
`SiglipVisionModel.last_hidden_state` (see tests/test_vit.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.config import VLMConfig


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        d = cfg.vit_hidden_dim
        self.cls_flag = cfg.vit_cls_flag
        self.patch_size, self.img_size = cfg.vit_patch_size, cfg.vit_img_size
        self.conv = nn.Conv2d(3, d, kernel_size=cfg.vit_patch_size, stride=cfg.vit_patch_size, bias=True)
        n_positions = cfg.vit_num_patches + (1 if self.cls_flag else 0)
        if self.cls_flag:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # Stored as [1, N, D] (nanoVLM's layout); SigLIP keeps an nn.Embedding of [N, D].
        self.position_embedding = nn.Parameter(torch.randn(1, n_positions, d) / math.sqrt(d))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, C, H, W = images.shape
        p, size = self.patch_size, self.img_size
        if (C, H, W) != (3, size, size):
            raise ValueError(f"images are [{B}, {C}, {H}, {W}]; this ViT takes [batch, 3, {size}, {size}] "
                             f"(vit_img_size={size}). Resize them with the model's image processor.")
        # The stride-p convolution as one matmul over flattened patches: the same sums (patch
        # pixels in the conv weight's (channel, row, column) order), and faster than the
        # convolution forward and backward on CPU.
        n = size // p
        patches = images.reshape(B, C, n, p, n, p).permute(0, 2, 4, 1, 3, 5).reshape(B, n * n, C * p * p)
        x = F.linear(patches, self.conv.weight.reshape(self.conv.out_channels, -1), self.conv.bias)  # [B, N, D]
        if self.cls_flag:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embedding


class ViTAttention(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.n_heads = cfg.vit_n_heads
        self.head_dim = cfg.vit_hidden_dim // cfg.vit_n_heads
        self.dropout = cfg.vit_dropout
        # q, k, v fused into one matmul: rows [0:D] = q, [D:2D] = k, [2D:3D] = v.
        self.qkv_proj = nn.Linear(cfg.vit_hidden_dim, 3 * cfg.vit_hidden_dim, bias=True)
        self.out_proj = nn.Linear(cfg.vit_hidden_dim, cfg.vit_hidden_dim, bias=True)
        # softmax(q k^T / sqrt(hd)) v with SDPA's signature; nanovlm.accel may replace it (same maths).
        self.sdpa = F.scaled_dot_product_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # split, not a permute and unbind: their backward is a stack, which inductor (CPU) wrote as
        # one more copy of the gradient; a split's is a cat into the gradient's columns.
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)      # each [B, H, T, hd]
                   for t in self.qkv_proj(x).split(D, dim=-1))
        y = self.sdpa(q, k, v, dropout_p=self.dropout if self.training else 0.0)   # [B, H, T, hd]
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class ViTMLP(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.vit_hidden_dim, cfg.vit_inter_dim)
        self.fc2 = nn.Linear(cfg.vit_inter_dim, cfg.vit_hidden_dim)
        # nanovlm.accel may replace it with another form of the same function.
        self.act = gelu_tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (SigLIP's `gelu_pytorch_tanh`):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


class ViTBlock(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.attn = ViTAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.mlp = ViTMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """images [B, 3, H, W] -> patch features [B, N, D] (N = (H / patch)^2, CLS token dropped)."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_flag = cfg.vit_cls_flag
        self.patch_embedding = ViTPatchEmbeddings(cfg)
        self.blocks = nn.ModuleList([ViTBlock(cfg) for _ in range(cfg.vit_n_blocks)])
        self.layer_norm = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(images)
        for block in self.blocks:
            x = block(x)
        x = self.layer_norm(x)
        # The projector needs the square patch grid; a CLS token (if any) only feeds attention.
        return x[:, 1:] if self.cls_flag else x


def _init_weights(module: nn.Module) -> None:
    # SigLIP's initialisation (what transformers uses for a fresh SiglipVisionModel): LeCun
    # normal for the patch conv, Xavier-uniform for linear layers, zero biases.
    if isinstance(module, nn.Conv2d):
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        nn.init.trunc_normal_(module.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
