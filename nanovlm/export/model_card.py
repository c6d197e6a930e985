"""The model card (`README.md`) of a checkpoint directory: what the model is, what it was trained
on, how well it did, its full config, how to load it, and its licence. The Hub reads the
front matter (library, licence, task); everything else is for people."""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from nanovlm.config import TrainConfig, VLMConfig
from nanovlm.models.flops import param_counts

NANOVLM_USAGE = """\
With nanovlm-ray installed (`pip install -e .` in its repository), from this directory or its Hub repo id:

```bash
nanovlm generate --checkpoint <this directory> --image photo.png --prompt "What is in the image?" --greedy
```

```python
from PIL import Image
from nanovlm.inference import Answerer

answer = Answerer("<this directory>")
print(answer([Image.open("photo.png")], "What is in the image?", greedy=True))
```

For transformers (Idefics3, SmolVLM's architecture): `nanovlm export --checkpoint <this directory>
--format transformers --output <new directory>` (docs/export.md)."""

LICENCE = """\
Apache-2.0 (the licence of nanovlm-ray and of nanoVLM). Pretrained backbones, if any (see
`vit_model_type` and `lm_model_type` in the config), and the training data keep their own licences."""


def model_card(cfg: VLMConfig, *, train_cfg: Optional[TrainConfig] = None,
               metrics: Optional[dict[str, Any]] = None, step: Optional[int] = None, library: str = "nanovlm",
               usage: str = NANOVLM_USAGE, notes: Sequence[str] = ()) -> str:
    """Markdown of the model card; `notes` are listed under "Limitations"."""
    n_params = param_counts(cfg)["total"]
    sections = [
        _front_matter(library),
        f"# {cfg.hf_repo_name}\n\nA vision-language model of nanoVLM's design ({n_params / 1e6:.2f}M parameters): a "
        "SigLIP vision encoder, a pixel-shuffle projector and a Llama decoder. It answers questions about images.",
        "## Architecture\n\n" + _architecture(cfg),
        "## Training data\n\n" + _data(train_cfg, step),
        "## Metrics\n\n" + _metrics(metrics, step),
        "## How to load\n\n" + usage,
    ]
    if notes:
        sections.append("## Limitations\n\n" + "\n".join(f"- {note}" for note in notes))
    sections.append("## Config\n\n`config.json` (`VLMConfig`):\n\n```json\n" + json.dumps(cfg.to_dict(), indent=2)
                    + "\n```")
    sections.append("## Licence\n\n" + LICENCE)
    return "\n\n".join(sections) + "\n"


def _front_matter(library: str) -> str:
    return (f"---\nlibrary_name: {library}\nlicense: apache-2.0\npipeline_tag: image-text-to-text\ntags:\n"
            "  - vision-language\n  - multimodal\n  - nanovlm\n---")


def _architecture(cfg: VLMConfig) -> str:
    extra = cfg.lm_vocab_size - cfg.lm_base_vocab_size
    images = (f"split into tiles of {cfg.vit_img_size} px, long side up to {cfg.max_img_size} px"
              + (", with a global view" if "global_image_token" in cfg.vlm_extra_tokens else "")
              if cfg.splits_images else f"one {cfg.vit_img_size} px tile per image")
    rows = [
        ("vision encoder", f"ViT (SigLIP): {cfg.vit_n_blocks} blocks, width {cfg.vit_hidden_dim}, {cfg.vit_n_heads} "
                           f"heads, patch {cfg.vit_patch_size}"),
        ("projector", f"pixel shuffle x{cfg.mp_pixel_shuffle_factor}, {cfg.mp_image_token_length} tokens per tile"),
        ("language model", f"Llama: {cfg.lm_n_blocks} blocks, width {cfg.lm_hidden_dim}, {cfg.lm_n_heads} heads "
                           f"({cfg.lm_n_kv_heads} key/value), vocabulary {cfg.lm_vocab_size} ({extra} added for the "
                           f"image tokens), {'tied' if cfg.lm_tie_weights else 'separate'} LM head"),
        ("images", f"{images}; pixels (x / 255 - {cfg.vit_img_mean}) / {cfg.vit_img_std}"),
        ("tokenizer", f"`{cfg.lm_tokenizer}` with the VLM's tokens, in this directory"),
    ]
    return "| part | |\n| --- | --- |\n" + "\n".join(f"| {name} | {text} |" for name, text in rows)


def _data(train_cfg: Optional[TrainConfig], step: Optional[int]) -> str:
    if train_cfg is None:
        return "Not recorded: this directory was written outside a training run."
    dataset = train_cfg.train_dataset_path
    if dataset == "shapes":
        dataset = (f"`shapes` (nanovlm's built-in synthetic dataset: up to {train_cfg.shapes_max_objects} "
                   f"object(s) per image, questions: {train_cfg.shapes_question_types})")
    else:
        dataset = f"`{dataset}` (subsets: {train_cfg.train_dataset_name})"
    steps = f"{step} of {train_cfg.max_training_steps}" if step is not None else str(train_cfg.max_training_steps)
    return (f"- dataset: {dataset}\n- steps: {steps}, batch size {train_cfg.batch_size} x "
            f"{train_cfg.gradient_accumulation_steps} accumulation x {train_cfg.num_workers} worker(s)\n"
            f"- learning rates: projector {train_cfg.lr_mp}, vision {train_cfg.lr_vision_backbone}, "
            f"language {train_cfg.lr_language_backbone}\n"
            "- the run's full `TrainConfig` is `train_config.json` in a training checkpoint")


def _metrics(metrics: Optional[dict[str, Any]], step: Optional[int]) -> str:
    numbers = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not numbers:
        return "None recorded."
    where = f" at step {step}" if step is not None else ""
    lines = [f"| metric{where} | value |", "| --- | --- |"]
    lines += [f"| {key} | {value:.4g} |" for key, value in sorted(numbers.items())]
    return "\n".join(lines)
