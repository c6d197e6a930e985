"""`nanovlm push`: upload a checkpoint to the Hugging Face Hub (docs/export.md).

    nanovlm push --checkpoint runs/tiny --repo me/tiny-shapes [--export transformers] [--private]

Uploads what `nanovlm export` writes (`--export nanovlm` by default: config, weights, tokenizer,
image processor settings, model card; never the training state). The token comes from
`HF_TOKEN` or `hf auth login`. Prints the repo's URL.
"""

from __future__ import annotations

import argparse
import sys

from nanovlm.export.hub import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="model directory, training checkpoint, or a training run's output directory")
    parser.add_argument("--repo", required=True, metavar="ID", help="Hub model repo, owner/name (created if needed)")
    parser.add_argument("--export", default="nanovlm", choices=FORMATS, dest="export_format",
                        help="what to upload: the nanovlm directory (default) or the transformers (Idefics3) export")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer name or directory, for a checkpoint that does not carry its own")
    parser.add_argument("--message", default=None, help="commit message")


def run(args: argparse.Namespace) -> int:
    from nanovlm.export.hub import push_checkpoint

    repo_id, notes = push_checkpoint(args.checkpoint, args.repo, export_format=args.export_format,
                                     tokenizer=args.tokenizer, private=args.private, commit_message=args.message)
    for note in notes:
        print(f"nanovlm push: warning: {note}", file=sys.stderr)
    print(f"https://huggingface.co/{repo_id}")
    return 0
