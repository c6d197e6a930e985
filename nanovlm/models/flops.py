"""Analytic sizes of a VLM from its config alone: parameters per component, FLOPs per sample,
per token and per image, image tokens per image, and an activation-memory estimate.

Nothing here builds weights, so `nanovlm validate` can size a 460M model in milliseconds, and
the training loop can compute MFU as `vlm_flops(cfg, T, n_images) * samples / second / peak`.

Conventions (the ones nanoGPT and torchtitan use):
- a matmul [m, k] @ [k, n] costs 2*m*n*k FLOPs (one multiply and one add per term);
- attention over T queries and S keys with model width d costs 2*T*S*d for Q K^T and another
  2*T*S*d for softmax(.) V, summed over heads; we count the full T x S score matrix even
  when it is causal, as SDPA's math and flash kernels on CPU do (and as
  `torch.utils.flop_counter` counts it);
- backward costs twice the forward matmuls (gradients for inputs and for weights), so a
  training step is 3x forward;
- norms, activations, softmax, RoPE, embedding lookups and the loss are not counted
  (they are O(T*d), a few percent at most).
"""

from __future__ import annotations

from dataclasses import dataclass

from nanovlm.config import VLMConfig


# ==================================================================== parameters

def vision_encoder_params(cfg: VLMConfig) -> int:
    d, i, p = cfg.vit_hidden_dim, cfg.vit_inter_dim, cfg.vit_patch_size
    n_pos = cfg.vit_num_patches + (1 if cfg.vit_cls_flag else 0)
    patch_embed = 3 * p * p * d + d            # Conv2d(3, d, kernel=p, stride=p) with bias
    position = n_pos * d                       # learned position embeddings
    cls = d if cfg.vit_cls_flag else 0
    block = (
        2 * d                                  # LayerNorm 1 (weight, bias)
        + 3 * d * d + 3 * d                    # fused q, k, v with bias
        + d * d + d                            # output projection with bias
        + 2 * d                                # LayerNorm 2
        + d * i + i + i * d + d                # MLP fc1, fc2 with biases
    )
    final_norm = 2 * d
    return patch_embed + position + cls + cfg.vit_n_blocks * block + final_norm


def projector_params(cfg: VLMConfig) -> int:
    # pixel shuffle concatenates s*s neighbouring patches, then one linear layer without bias
    return cfg.vit_hidden_dim * cfg.mp_pixel_shuffle_factor ** 2 * cfg.lm_hidden_dim


def decoder_params(cfg: VLMConfig) -> int:
    d, i, v = cfg.lm_hidden_dim, cfg.lm_inter_dim, cfg.lm_vocab_size
    kv = cfg.lm_n_kv_heads * cfg.lm_head_dim   # width of k and v (grouped-query attention)
    embedding = v * d
    block = (
        d                                      # RMSNorm before attention
        + d * d + 2 * d * kv + d * d           # q, k, v, o projections (no bias)
        + d                                    # RMSNorm before MLP
        + 3 * d * i                            # SwiGLU: gate, up, down (no bias)
    )
    final_norm = d
    head = 0 if cfg.lm_tie_weights else v * d  # tied: the head reuses the embedding matrix
    return embedding + cfg.lm_n_blocks * block + final_norm + head


def param_counts(cfg: VLMConfig) -> dict[str, int]:
    """Parameters per component; tied embeddings are counted once (in `decoder`)."""
    counts = {
        "vision_encoder": vision_encoder_params(cfg),
        "MP": projector_params(cfg),
        "decoder": decoder_params(cfg),
    }
    counts["total"] = sum(counts.values())
    return counts


# ==================================================================== forward FLOPs

def vision_flops_per_image(cfg: VLMConfig) -> float:
    """Forward FLOPs of the ViT on one image of N = (img/patch)^2 (+1 CLS) tokens."""
    d, i, p = cfg.vit_hidden_dim, cfg.vit_inter_dim, cfg.vit_patch_size
    n = cfg.vit_num_patches + (1 if cfg.vit_cls_flag else 0)
    patch_embed = 2 * cfg.vit_num_patches * (3 * p * p) * d   # the conv is a [N, 3p^2] @ [3p^2, d] matmul
    per_block = (
        2 * n * d * (3 * d)                    # q, k, v
        + 2 * n * n * d                        # Q K^T
        + 2 * n * n * d                        # softmax(.) V
        + 2 * n * d * d                        # output projection
        + 2 * 2 * n * d * i                    # MLP: fc1 and fc2
    )
    return float(patch_embed + cfg.vit_n_blocks * per_block)


def projector_flops_per_image(cfg: VLMConfig) -> float:
    """Forward FLOPs of the projector: [tokens, d_vit * s^2] @ [d_vit * s^2, d_lm]."""
    tokens = cfg.mp_image_token_length
    return float(2 * tokens * cfg.vit_hidden_dim * cfg.mp_pixel_shuffle_factor ** 2 * cfg.lm_hidden_dim)


def decoder_flops(cfg: VLMConfig, n_tokens: int, n_context: int | None = None) -> float:
    """Forward FLOPs of the decoder for `n_tokens` new positions attending to `n_context`
    keys (default: the same positions, i.e. prefill or training). Includes the LM head on
    every position (the training forward returns logits for all of them)."""
    d, i, v = cfg.lm_hidden_dim, cfg.lm_inter_dim, cfg.lm_vocab_size
    kv = cfg.lm_n_kv_heads * cfg.lm_head_dim
    t = n_tokens
    s = n_tokens if n_context is None else n_context
    per_block = (
        2 * t * d * d                          # q
        + 2 * t * d * (2 * kv)                 # k, v
        + 2 * t * s * d                        # Q K^T (all query heads; GQA shares k/v, not FLOPs)
        + 2 * t * s * d                        # softmax(.) V
        + 2 * t * d * d                        # o
        + 3 * 2 * t * d * i                    # SwiGLU: gate, up, down
    )
    head = 2 * t * d * v
    return float(cfg.lm_n_blocks * per_block + head)


def vlm_flops(cfg: VLMConfig, n_text_tokens: int, n_images: int, backward: bool = True) -> float:
    """FLOPs of one sample: `n_images` images through ViT and projector, and a decoder
    sequence of `n_text_tokens` positions (image tokens included). backward=True -> one
    training step: forward + backward = 3x forward."""
    forward = (n_images * (vision_flops_per_image(cfg) + projector_flops_per_image(cfg))
               + decoder_flops(cfg, n_text_tokens))
    return 3.0 * forward if backward else forward


def decode_flops_per_token(cfg: VLMConfig, context: int) -> float:
    """Forward FLOPs of generating one token with a KV cache holding `context` positions."""
    return decoder_flops(cfg, 1, n_context=context + 1)


# ==================================================================== memory

def activation_memory_bytes(cfg: VLMConfig, n_text_tokens: int, n_images: int,
                            bytes_per_element: int = 4, attention_scores: bool = True) -> float:
    """Rough estimate of the activations one training sample keeps for backward.

    Per decoder position and block: norm inputs and outputs (4d), q and rotated k (d + kv),
    v (kv), attention output (d), SwiGLU gate, up, silu(gate) and their product (4i)
    -> 6d + 2kv + 4i elements; per ViT token and block: LN in/out (4d), q, k, v (3d),
    attention output (d), fc1 output and GELU output (2i) -> 8d + 2i. With
    `attention_scores` (math attention, the CPU path) add the softmax probabilities
    heads * T^2 per block; flash attention does not keep them. Plus the logits and their
    float32 softmax for the loss (2 * T * V). The real figure depends on the kernels.
    """
    d, i, v = cfg.lm_hidden_dim, cfg.lm_inter_dim, cfg.lm_vocab_size
    kv = cfg.lm_n_kv_heads * cfg.lm_head_dim
    t = n_text_tokens
    lm = cfg.lm_n_blocks * t * (6 * d + 2 * kv + 4 * i)
    if attention_scores:
        lm += cfg.lm_n_blocks * cfg.lm_n_heads * t * t
    lm += 2 * t * v
    dv, iv = cfg.vit_hidden_dim, cfg.vit_inter_dim
    n = cfg.vit_num_patches + (1 if cfg.vit_cls_flag else 0)
    vit = cfg.vit_n_blocks * n * (8 * dv + 2 * iv)
    if attention_scores:
        vit += cfg.vit_n_blocks * cfg.vit_n_heads * n * n
    return float((lm + n_images * vit) * bytes_per_element)


# ==================================================================== summary

@dataclass
class ModelSizes:
    """Everything `nanovlm validate` prints for a config and a sequence length."""
    params: dict[str, int]
    image_tokens_per_image: int
    seq_len: int
    n_images: int
    vision_flops_per_image: float
    projector_flops_per_image: float
    decoder_flops_per_token: float        # forward, averaged over a seq_len prefill
    train_flops_per_sample: float         # forward + backward
    forward_flops_per_sample: float
    decode_flops_per_token: float         # one generated token at the end of seq_len context
    activation_memory_mb_per_sample: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def model_sizes(cfg: VLMConfig, seq_len: int | None = None, n_images: int = 1,
                bytes_per_element: int = 4) -> ModelSizes:
    """Sizes for one sample of `seq_len` decoder positions (default `lm_max_length`)."""
    t = cfg.lm_max_length if seq_len is None else seq_len
    return ModelSizes(
        params=param_counts(cfg),
        image_tokens_per_image=cfg.mp_image_token_length,
        seq_len=t,
        n_images=n_images,
        vision_flops_per_image=vision_flops_per_image(cfg),
        projector_flops_per_image=projector_flops_per_image(cfg),
        decoder_flops_per_token=decoder_flops(cfg, t) / t,
        train_flops_per_sample=vlm_flops(cfg, t, n_images, backward=True),
        forward_flops_per_sample=vlm_flops(cfg, t, n_images, backward=False),
        decode_flops_per_token=decode_flops_per_token(cfg, t),
        activation_memory_mb_per_sample=activation_memory_bytes(cfg, t, n_images, bytes_per_element) / 2**20,
    )
