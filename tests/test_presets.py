"""The nanoVLM presets train: a shrunken `nanovlm-460m` (its splitting and packing kept) takes a
few steps on CPU."""

import math

from PIL import Image

from nanovlm.config import preset
from nanovlm.data import image_processor_for
from nanovlm.training import TrainHooks, train

# nanovlm-460m with small widths and depths; kept: images split into tiles (the long side resized
# to max_img_size, 4x the tile side, plus a global view), pixel shuffle 4, nanoVLM's 66 extra
# tokens, packing on (TrainConfig's default).
SHRUNKEN = dict(
    vit_img_size=64, vit_patch_size=8, max_img_size=256, vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=2,
    vit_n_blocks=1, lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=2, lm_n_kv_heads=1, lm_n_blocks=1,
    lm_max_length=512, lm_tokenizer="shapes-bpe-512", lm_base_vocab_size=512, vlm_load_backbone_weights=False,
    batch_size=2, max_training_steps=3, shapes_train_size=32, shapes_eval_size=4, eval_samples=4,
    max_new_tokens_eval=2, eval_interval=1000, checkpoint_interval=1000, log_interval=1000, peak_flops=1e12)


class Recorder(TrainHooks):
    def __init__(self):
        self.metrics = []

    def on_step(self, step, metrics):
        self.metrics.append(metrics)


def test_a_shrunken_nanovlm_460m_trains_with_splitting_and_packing(tmp_path):
    vlm, train_cfg = preset("nanovlm-460m", **SHRUNKEN, output_dir=str(tmp_path))
    assert train_cfg.packing and vlm.max_img_size == 4 * vlm.vit_img_size and vlm.resize_to_max_side_len
    assert vlm.mp_image_token_length == 4 and len(vlm.vlm_extra_tokens) == 66
    hooks = Recorder()
    summary = train(vlm, train_cfg, hooks=hooks)
    assert summary["steps"] == 3 and math.isfinite(summary["train_loss"])
    # A square shapes image, its long side resized to 256 px: 4x4 tiles of 64 px and a global view.
    # Rows are packed: several samples per row, so little of each row is padding.
    tiles, grid = image_processor_for(vlm)(Image.new("RGB", (64, 64)))
    assert grid == (4, 4) and tiles.shape == (17, 3, 64, 64)
    # Rows are packed: more samples than rows (batch_size=2) in a step, little of it padding.
    for m in hooks.metrics:
        samples = round(m["samples_per_second"] * m["step_time"])
        assert samples > train_cfg.batch_size and 0.0 <= m["padding_fraction"] < 0.5
        # images_per_second counts what the ViT encodes: 16 tiles and a global view per shapes image
        assert round(m["images_per_second"] * m["step_time"]) == 17 * samples
