"""`nanovlm generate`: answer a prompt about an image with a checkpoint.

    nanovlm generate --checkpoint runs/tiny/checkpoints/step_001500 --image photo.png \\
        --prompt "What colour is the shape?" [--max-new-tokens 32] [--greedy] [--compile]

The checkpoint is a directory written by `save_pretrained`, a training checkpoint, a training
run's output directory (its latest checkpoint), or a Hub repo id; it carries its tokenizer
(nanovlm.export.checkpoint_files). `nanovlm.inference.Answerer` does the work: images and prompt
go through the functions training uses (docs/data.md). Prints the answer on stdout.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from nanovlm.export.checkpoint_files import model_directory as _model_directory

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="model directory (config.json + model.safetensors), a training run's output "
                             "directory (its latest checkpoint), or a Hub repo id")
    parser.add_argument("--image", required=True, action="append",
                        help="image file (repeat for several images; all go before the prompt)")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer name or directory (default: the checkpoint's own, its training "
                             "config's tokenizer_path, else VLMConfig.lm_tokenizer)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--compile", action="store_true",
                        help="decode with a compiled step: on CPU the fused C++ step (built once per machine, "
                             "~25 s; needs the cpu-fast extra, else torch.compile), on GPU torch.compile with "
                             "CUDA graphs")


def run(args: argparse.Namespace) -> int:
    print(answer(args.checkpoint, args.image, args.prompt, max_new_tokens=args.max_new_tokens,
                 greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 seed=args.seed, tokenizer=args.tokenizer, device=args.device, compile=args.compile))
    return 0


def answer(checkpoint: str, images: list[str] | str, prompt: str, max_new_tokens: int = 32, greedy: bool = False,
           temperature: float = 0.5, top_k: int | None = 50, top_p: float | None = 0.9, seed: int = 0,
           tokenizer: str | None = None, device: str = "auto", compile: bool = False) -> str:
    """The decoded answer of the model in `checkpoint` to `prompt` about `images`."""
    import torch

    from nanovlm.inference import Answerer

    images = [_read_image(path) for path in ([images] if isinstance(images, str) else images)]
    torch.manual_seed(seed)
    answerer = Answerer(_model_directory(checkpoint), tokenizer=tokenizer, device=device)
    return answerer(images, prompt, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                    top_k=top_k, top_p=top_p, compile=compile)


def _read_image(path: str):
    """The decoded image at `path`; a missing or unreadable file fails here, before the model loads."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"--image {path} does not exist.")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError) as exc:  # PIL's error for a file it cannot identify, or a damaged one
        raise UnidentifiedImageError(f"--image {path} is not an image PIL can read ({exc}); give a PNG, JPEG "
                                     "or another image file.") from None
    return image
