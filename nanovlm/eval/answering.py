"""Batched answers for evaluation: questions of different lengths and image counts in one
left-padded `generate` call, each row stopping at its own end of turn.

A question is (text, [PIL images]). Pixels and prompts go through the functions training and
`nanovlm generate` use (`process_images`, `ConversationEncoder.prompt_ids`: the chat template of
one user turn that opens with the image string), so a batch's answers are the answers each
question gets alone: the decoder attends only to each row's real tokens and counts positions
from the attention mask (tests/test_eval.py holds batched greedy answers equal to batch-1 ones).

    answerer = BatchAnswerer.from_checkpoint("runs/demo")
    answerer.answer([("What colour is the shape?", [image])], max_new_tokens=8)   # -> ["red"]
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Sequence

import torch

from nanovlm.data.collate import left_pad
from nanovlm.data.processors import image_processor_for, process_images
from nanovlm.data.prompts import ConversationEncoder

logger = logging.getLogger(__name__)

Question = tuple[str, Sequence[Any]]   # (text, PIL images)


class BatchAnswerer:
    """Greedy answers of `model` (a VisionLanguageModel) through `tokenizer` (its `get_tokenizer`)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, device: torch.device | str | None = None,
                 autocast: Callable[[], Any] = contextlib.nullcontext, stop_token_id: int | None = None,
                 compile: bool = False):
        from nanovlm.inference import stop_token

        self.model, self.tokenizer = model, tokenizer
        self.cfg = model.cfg
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.autocast, self.compile = autocast, compile
        self.processor = image_processor_for(self.cfg)
        self.encoder = ConversationEncoder(tokenizer, self.cfg.mp_image_token_length)
        self.stop = stop_token_id if stop_token_id is not None else stop_token(tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop
        self._warned_long = False

    @classmethod
    def from_checkpoint(cls, checkpoint: str, *, tokenizer: str | None = None, device: str = "auto",
                        compile: bool = False) -> "BatchAnswerer":
        """A model directory, a training checkpoint, a run's output directory (its latest
        checkpoint) or a Hub id, with its tokenizer, as `nanovlm generate` finds them."""
        model, tok = load_checkpoint(checkpoint, tokenizer=tokenizer, device=device)
        return cls(model, tok, compile=compile)

    def prompt(self, text: str, images: Sequence[Any]) -> tuple[list[int], torch.Tensor]:
        """(prompt ids, tiles [N, 3, tile, tile]) of one question."""
        pixels, grids = process_images(self.processor, [image for image in images])
        return list(self.encoder.prompt_ids(text, grids)), pixels

    @torch.no_grad()
    def answer(self, questions: Sequence[Question], max_new_tokens: int,
               until: Sequence[str] = ()) -> list[str]:
        """The decoded answers, in order: up to the end-of-turn token, then cut before the first
        of the `until` strings (lmms-eval's stop sequences), stripped of surrounding whitespace."""
        if not questions:
            return []
        prompts = [self.prompt(text, images) for text, images in questions]
        longest = max(len(ids) for ids, _ in prompts) + max_new_tokens
        if longest > self.cfg.lm_max_position_embeddings and not self._warned_long:
            self._warned_long = True
            logger.warning("A prompt of %d tokens plus %d new ones exceeds lm_max_position_embeddings=%d.",
                           longest - max_new_tokens, max_new_tokens, self.cfg.lm_max_position_embeddings)
        input_ids, attention_mask = left_pad([torch.tensor(ids, dtype=torch.long) for ids, _ in prompts], self.pad)
        images = [pixels.to(self.device) for _, pixels in prompts]                     # one [n_i, 3, H, W] per row
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                out = self.model.generate(input_ids.to(self.device), images, attention_mask.to(self.device),
                                          max_new_tokens=max_new_tokens, greedy=True, eos_token_id=self.stop,
                                          compile=self.compile)
        finally:
            self.model.train(was_training)
        return [self._decode(row, until) for row in out.tolist()]

    def _decode(self, ids: list[int], until: Sequence[str]) -> str:
        if self.stop in ids:
            ids = ids[:ids.index(self.stop)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text.strip()


def load_checkpoint(checkpoint: str, *, tokenizer: str | None = None, device: str = "auto"):
    """(model in eval mode on `device`, its tokenizer) for a checkpoint as `nanovlm generate` takes it:
    a model directory, a training checkpoint, a run's output directory (its latest checkpoint) or
    a Hub id."""
    from nanovlm.export.checkpoint_files import checkpoint_tokenizer, model_directory
    from nanovlm.models import VisionLanguageModel
    from nanovlm.models.vision_language_model import local_model_dir

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    directory = local_model_dir(model_directory(checkpoint))
    model = VisionLanguageModel.from_pretrained(directory).to(device).eval()
    return model, checkpoint_tokenizer(directory, model.cfg, tokenizer)
