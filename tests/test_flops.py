"""The analytic sizes in nanovlm.models.flops against independent counts: parameters of the
built model, and FLOPs counted by torch.utils.flop_counter while the tiny model runs."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nanovlm.models.flops import decode_flops_per_token, model_sizes, param_counts, vlm_flops
from nanovlm.bench.harness import synthetic_batch
from nanovlm.config import preset
from nanovlm.models import VisionLanguageModel


def _tiny(**overrides):
    return preset("tiny", **overrides)[0].validate()


def _counted(fn) -> int:
    # The counter has no formula for CPU's fused SDPA kernel; the math backend runs attention
    # as two bmm calls it does count.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("overrides", [{}, {"lm_tie_weights": False, "vit_img_size": 64, "mp_pixel_shuffle_factor": 4}])
def test_param_counts_equal_the_built_model_per_component(overrides):
    cfg = _tiny(**overrides)
    model = VisionLanguageModel(cfg)
    counts = param_counts(cfg)
    assert counts["vision_encoder"] == sum(p.numel() for p in model.vision_encoder.parameters())
    assert counts["MP"] == sum(p.numel() for p in model.MP.parameters())
    assert counts["decoder"] == sum(p.numel() for p in model.decoder.parameters())  # tied head once
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_forward_flops_match_flop_counter_within_5_percent():
    cfg = _tiny()
    model = VisionLanguageModel(cfg).eval()
    batch = synthetic_batch(cfg, batch_size=2, text_tokens=20, n_images=1)
    counted = _counted(lambda: model(batch.input_ids, images=batch.images))
    expected = 2 * vlm_flops(cfg, batch.seq_len, n_images=1, backward=False)
    assert counted == pytest.approx(expected, rel=0.05)


def test_training_flops_match_flop_counter_within_5_percent():
    cfg = _tiny()
    model = VisionLanguageModel(cfg).train()
    batch = synthetic_batch(cfg, batch_size=2, text_tokens=20, n_images=1)

    def step():
        _, loss = model(batch.input_ids, images=batch.images, targets=batch.targets)
        loss.backward()

    counted = _counted(step)
    expected = 2 * vlm_flops(cfg, batch.seq_len, n_images=1, backward=True)
    assert counted == pytest.approx(expected, rel=0.05)


def test_decode_flops_match_one_cached_step():
    cfg = _tiny()
    model = VisionLanguageModel(cfg).eval()
    context = 30
    cache = model.decoder.new_kv_cache(1, context + 1)
    with torch.no_grad():
        model.decoder(torch.randint(0, 100, (1, context)), kv_cache=cache)
        counted = _counted(lambda: model.decoder.head(model.decoder(torch.tensor([[5]]), kv_cache=cache)))
    assert counted == pytest.approx(decode_flops_per_token(cfg, context), rel=0.05)


def test_image_tokens_and_sizes_follow_the_shuffle_factor():
    # 64 px / 8 px patches: an 8x8 grid, which both factors divide (the tiny preset's 6x6 grid is not divisible by 4)
    sizes2 = model_sizes(_tiny(vit_img_size=64), seq_len=64)
    sizes4 = model_sizes(_tiny(vit_img_size=64, mp_pixel_shuffle_factor=4), seq_len=64)
    assert (sizes2.image_tokens_per_image, sizes4.image_tokens_per_image) == (16, 4)
    assert sizes4.projector_flops_per_image == sizes2.projector_flops_per_image  # 4x width, 1/4 tokens
    assert sizes2.train_flops_per_sample == pytest.approx(3 * sizes2.forward_flops_per_sample)
    assert sizes2.activation_memory_mb_per_sample > 0
