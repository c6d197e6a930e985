"""Configs shared by the training-loop tests (imported by test modules; not a test itself)."""

from nanovlm.config import preset

# A ~50k-parameter model on 32 px shapes: a few steps take seconds on one core.
TINY_SETTINGS = dict(
    vit_img_size=32, vit_patch_size=8, vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=2, vit_n_blocks=1,
    lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=2, lm_n_kv_heads=1, lm_n_blocks=1,
    batch_size=4, shapes_train_size=64, shapes_eval_size=8, eval_samples=4, max_new_tokens_eval=3,
    eval_interval=1000, checkpoint_interval=1000, log_interval=1000, peak_flops=1e12, warmup_ratio=0.2)


def tiny_configs(output_dir, **changes):
    """The `tiny` preset with `TINY_SETTINGS`, writing to `output_dir`."""
    return preset("tiny", **{**TINY_SETTINGS, "output_dir": str(output_dir), **changes})


def set_arguments(**changes) -> list[str]:
    """`TINY_SETTINGS` and `changes` as the CLI's `--set field=value` arguments."""
    return [arg for k, v in {**TINY_SETTINGS, **changes}.items() for arg in ("--set", f"{k}={v}")]
