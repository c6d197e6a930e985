"""`nanovlm validate`: check a config and print its sizes (parameters per component, image
tokens, FLOPs per token / image / sample, activation memory) without building any weights."""

from __future__ import annotations

import argparse
import json

from nanovlm.commands.common import add_config_arguments, configs_from_args
from nanovlm.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--seq-len", type=int, default=None,
                        help="decoder positions per sample, image tokens included (default: lm_max_length)")
    parser.add_argument("--images", type=int, default=1,
                        help="images per sample through the ViT, i.e. tiles and global views when images are "
                             "split (default: 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _tiles(vlm) -> str:
    if not vlm.splits_images:
        return f"1 (no splitting: max_img_size = vit_img_size = {vlm.vit_img_size})"
    side = vlm.max_grid_side
    view = " + a global view" if "global_image_token" in vlm.vlm_extra_tokens else ""
    return f"up to {side}x{side} of {vlm.vit_img_size} px{view} (max_img_size={vlm.max_img_size})"


def run(args: argparse.Namespace) -> int:
    from nanovlm.models.flops import model_sizes

    vlm, train = configs_from_args(args)
    if args.seq_len is not None and args.seq_len <= 0:
        raise ConfigError(f"--seq-len={args.seq_len} must be positive.")
    sizes = model_sizes(vlm, seq_len=args.seq_len, n_images=args.images)
    if args.json:
        print(json.dumps(sizes.as_dict(), indent=2))
        return 0
    p = sizes.params
    batch = train.batch_size
    rows = [
        ("parameters: vision_encoder", _human(p["vision_encoder"])),
        ("parameters: MP (projector)", _human(p["MP"])),
        ("parameters: decoder (tied head counted once)" if vlm.lm_tie_weights else "parameters: decoder",
         _human(p["decoder"])),
        ("parameters: total", f"{_human(p['total'])} ({p['total']:,})"),
        ("tiles per image", _tiles(vlm)),
        ("image tokens per tile", str(sizes.image_tokens_per_image)),
        ("sequence length / tiles per sample", f"{sizes.seq_len} / {sizes.n_images}"),
        ("FLOPs per tile (ViT + projector, forward)",
         _human(sizes.vision_flops_per_image + sizes.projector_flops_per_image, "FLOP")),
        ("FLOPs per decoder token (forward, prefill avg)", _human(sizes.decoder_flops_per_token, "FLOP")),
        ("FLOPs per sample (forward)", _human(sizes.forward_flops_per_sample, "FLOP")),
        ("FLOPs per sample (training, 3x forward)", _human(sizes.train_flops_per_sample, "FLOP")),
        (f"FLOPs per training step (batch_size={batch})", _human(batch * sizes.train_flops_per_sample, "FLOP")),
        ("FLOPs per generated token (full context)", _human(sizes.decode_flops_per_token, "FLOP")),
        ("activation memory per sample (fp32, estimate)", f"{sizes.activation_memory_mb_per_sample:.1f} MiB"),
        (f"activation memory per step (batch_size={batch})",
         f"{batch * sizes.activation_memory_mb_per_sample:.1f} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    print("config is valid")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0
