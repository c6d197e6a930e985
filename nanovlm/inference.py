"""A checkpoint loaded once, answering questions about images: what `nanovlm generate` runs and
what the MLflow model (`nanovlm.export.mlflow_model`) serves.

Images and prompt go through the functions training uses (docs/data.md): the model's image
processor (tiles, global view) and the chat template of one user turn that opens with the image
string; decoding stops at the end-of-turn token of the chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch


class Answerer:
    """`Answerer(checkpoint)(images, prompt) -> str`. `checkpoint`: a model directory (one that
    carries its tokenizer, or with `tokenizer` given) or a Hub repo id."""

    def __init__(self, checkpoint: str | Path, tokenizer: Optional[str] = None, device: str = "auto"):
        from nanovlm.data.processors import image_processor_for
        from nanovlm.data.prompts import ConversationEncoder
        from nanovlm.export.checkpoint_files import checkpoint_tokenizer
        from nanovlm.models import VisionLanguageModel
        from nanovlm.models.vision_language_model import local_model_dir

        checkpoint = local_model_dir(checkpoint)   # a Hub repo: downloaded once, its own tokenizer used
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = VisionLanguageModel.from_pretrained(checkpoint).to(self.device).eval()
        cfg = self.model.cfg
        self.tokenizer = checkpoint_tokenizer(checkpoint, cfg, tokenizer)
        self.image_processor = image_processor_for(cfg)
        self.encoder = ConversationEncoder(self.tokenizer, cfg.mp_image_token_length)
        self.stop_token = stop_token(self.tokenizer)

    @torch.inference_mode()
    def __call__(self, images: Sequence, prompt: str, max_new_tokens: int = 32, greedy: bool = False,
                 temperature: float = 0.5, top_k: Optional[int] = 50, top_p: Optional[float] = 0.9,
                 compile: bool = False) -> str:
        """The decoded answer to `prompt` about `images` (PIL images, all before the prompt)."""
        from nanovlm.data.processors import process_images

        pixels, grids = process_images(self.image_processor, list(images))   # [N tiles, 3, H, W]
        input_ids = torch.tensor([self.encoder.prompt_ids(prompt, grids)], device=self.device)
        out = self.model.generate(input_ids, images=pixels.to(self.device), max_new_tokens=max_new_tokens,
                                  greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                                  eos_token_id=self.stop_token, compile=compile)[0].tolist()
        if self.stop_token is not None and self.stop_token in out:
            out = out[:out.index(self.stop_token)]
        return self.tokenizer.decode(out, skip_special_tokens=True).strip()


def stop_token(tokenizer) -> Optional[int]:
    """The end-of-turn token the chat template closes answers with, else EOS."""
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        return end_of_turn
    return tokenizer.eos_token_id
