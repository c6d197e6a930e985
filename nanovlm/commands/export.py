"""`nanovlm export`: a checkpoint in a format other tools load (docs/export.md).

    nanovlm export --checkpoint runs/tiny --format transformers --output tiny-hf
    nanovlm export --checkpoint runs/tiny/checkpoints/step_003000 --format nanovlm --output tiny-release

`transformers`: an Idefics3 (SmolVLM) directory for `AutoModelForImageTextToText` and
`AutoProcessor`; what its processor cannot reproduce of this model's pipeline is printed as
warnings (and listed in the directory's model card). `nanovlm`: the model's self-contained
directory without the training state. Prints the output directory.
"""

from __future__ import annotations

import argparse
import sys

from nanovlm.export.hub import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="model directory, training checkpoint, or a training run's output directory (its "
                             "latest checkpoint); ours or one written by nanoVLM's code")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="export_format",
                        help="transformers: Idefics3 (SmolVLM) directory; nanovlm: self-contained model directory")
    parser.add_argument("--output", required=True, help="a new (or empty) directory")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer name or directory, for a checkpoint that does not carry its own")


def run(args: argparse.Namespace) -> int:
    from nanovlm.export.hub import export

    for note in export(args.checkpoint, args.output, args.export_format, args.tokenizer):
        print(f"nanovlm export: warning: {note}", file=sys.stderr)
    print(args.output)
    return 0
