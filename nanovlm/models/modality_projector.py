"""Pixel shuffle + linear projection from ViT features to language-model embeddings."""

from __future__ import annotations

import torch
import torch.nn as nn

from nanovlm.config import VLMConfig


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, N, D] patch features on a square grid -> [B, N / s^2, s^2 * D].

    Each output token concatenates an s x s block of neighbouring patches; the patch at row i,
    column j inside the block lands at features (i*s + j)*D + c. Output tokens are in row-major
    order of the blocks. This is the order Idefics3/SmolVLM and nanoVLM use.
    """
    B, N, D = x.shape
    side = int(round(N ** 0.5))
    if side * side != N or side % factor:
        raise ValueError(f"pixel_shuffle needs a square patch grid divisible by factor={factor}; "
                         f"got {N} patches ({side}x{side} would be square).")
    g = side // factor
    x = x.view(B, g, factor, g, factor, D)        # [B, block row, i, block col, j, D]
    x = x.permute(0, 1, 3, 2, 4, 5)               # [B, block row, block col, i, j, D]
    return x.reshape(B, g * g, factor * factor * D)


class ModalityProjector(nn.Module):
    """[B, N, vit_hidden_dim] -> [B, mp_image_token_length, lm_hidden_dim]."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.factor = cfg.mp_pixel_shuffle_factor
        self.proj = nn.Linear(cfg.vit_hidden_dim * self.factor ** 2, cfg.lm_hidden_dim, bias=False)
        nn.init.normal_(self.proj.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(x, self.factor))
