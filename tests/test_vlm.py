"""VisionLanguageModel.forward: image placeholders, per-sample image lists, loss, and the projector."""

import logging

import pytest
import torch
import torch.nn.functional as F

from nanovlm.config import VLMConfig
from nanovlm.accel import apply_training_kernels, compile_for_training, kernels
from nanovlm.accel.kernels import linear_cross_entropy
from nanovlm.models import ModalityProjector, VisionLanguageModel, pixel_shuffle
from toolchain import needs_cxx

TINY = dict(vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=4, vit_n_blocks=2, vit_img_size=32, vit_patch_size=8,
            lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=4, lm_n_kv_heads=2, lm_n_blocks=2,
            lm_base_vocab_size=100, extra_token_amount=1, lm_vocab_size=101, lm_max_length=64,
            lm_max_position_embeddings=128, mp_pixel_shuffle_factor=2, mp_image_token_length=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VisionLanguageModel(VLMConfig(**TINY)).eval()


def _ids(image_counts, text_len=5):
    """One row per entry: text, then 4 placeholders per image, then text (all rows the same length)."""
    img = 100  # lm_base_vocab_size + index of 'image_token'
    longest = max(image_counts)
    rows = []
    for n in image_counts:
        filler = [7] * (4 * (longest - n))
        rows.append(filler + [1, 2] + [img] * (4 * n) + list(range(3, 3 + text_len)))
    return torch.tensor(rows)


def test_pixel_shuffle_places_patch_i_j_of_each_block_at_features_i_s_plus_j():
    s, side, D = 2, 4, 3
    x = torch.randn(1, side * side, D)
    out = pixel_shuffle(x, s)
    assert out.shape == (1, (side // s) ** 2, s * s * D)
    grid = x.view(side, side, D)
    for block_row in range(side // s):
        for block_col in range(side // s):
            token = out[0, block_row * (side // s) + block_col]
            for i in range(s):
                for j in range(s):
                    expected = grid[block_row * s + i, block_col * s + j]
                    assert torch.equal(token[(i * s + j) * D:(i * s + j + 1) * D], expected)


def test_modality_projector_is_a_bias_free_linear_after_pixel_shuffle():
    mp = ModalityProjector(VLMConfig(**TINY))
    assert mp.proj.bias is None and mp.proj.weight.shape == (32, 32 * 4)
    x = torch.randn(2, 16, 32)
    assert torch.allclose(mp(x), pixel_shuffle(x, 2) @ mp.proj.weight.T)


def test_image_embeddings_replace_the_placeholders_in_order(model):
    ids = _ids([2])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        embeds = model.embed(ids, images)
        image_embeds = model.MP(model.vision_encoder(images)).reshape(-1, 32)
        text = model.decoder.token_embedding(ids)
    is_image = ids[0] == model.image_token_id
    assert torch.equal(embeds[0, is_image], image_embeds)
    assert torch.equal(embeds[0, ~is_image], text[0, ~is_image])


def test_per_sample_image_lists_equal_the_stacked_tensor(model):
    ids = _ids([1, 2, 0])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        stacked, _ = model(ids, images=images)
        listed, _ = model(ids, images=[images[:1], images[1:], images[3:]])
    assert torch.equal(stacked, listed)


def test_placeholder_count_mismatch_is_an_error(model):
    ids = _ids([2])
    with pytest.raises(ValueError, match=r"8 image placeholder tokens .* 1 image\(s\)"):
        model(ids, images=torch.randn(1, 3, 32, 32))


def test_per_sample_mismatch_names_the_sample(model):
    ids = _ids([1, 1])
    with pytest.raises(ValueError, match="Sample 1 has 4 image placeholder tokens"):
        model(ids, images=[torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)])


def test_placeholders_without_images_are_an_error(model):
    with pytest.raises(ValueError, match="0 image"):
        model(_ids([1]))


def test_text_only_forward_returns_vocabulary_logits(model):
    logits, loss = model(torch.randint(0, 100, (2, 6)))
    assert logits.shape == (2, 6, 101) and loss is None


def test_loss_is_cross_entropy_over_targets_ignoring_minus_100(model):
    ids = _ids([1, 1])
    targets = torch.full_like(ids, -100)
    targets[:, -3:] = torch.randint(0, 100, (2, 3))
    images = torch.randn(2, 3, 32, 32)
    logits, loss = model(ids, images=images, targets=targets)
    kept = targets != -100
    expected = F.cross_entropy(logits[kept], targets[kept])
    assert torch.allclose(loss, expected, atol=1e-6)


def _answer_only_batch():
    """A fresh TINY model and a 2-sample batch whose targets supervise only the last 4 and 2 tokens."""
    torch.manual_seed(0)
    model = VisionLanguageModel(VLMConfig(**TINY))
    ids = _ids([1, 1])
    targets = torch.full_like(ids, -100)
    targets[0, -4:] = torch.randint(0, 100, (4,))
    targets[1, -2:] = torch.randint(0, 100, (2,))
    return model, dict(input_ids=ids, images=torch.randn(2, 3, 32, 32), targets=targets)


def _loss_and_grads(model, forward, batch, return_logits):
    """(logits, loss, {name: grad}) of one forward + backward of `forward` (model or a compiled model)."""
    model.zero_grad()
    logits, loss = forward(**batch, return_logits=return_logits)
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_training_loss_without_logits_equals_the_full_loss_and_its_gradients():
    # return_logits=False applies the last block's MLP, the final norm and the head to the
    # supervised positions only: same loss, same grads.
    model, batch = _answer_only_batch()
    logits, full, full_grads = _loss_and_grads(model, model, batch, return_logits=True)
    assert logits is not None
    logits, lean, lean_grads = _loss_and_grads(model, model, batch, return_logits=False)
    assert logits is None
    assert torch.allclose(full, lean, atol=1e-6)
    for name, grad in full_grads.items():
        assert torch.allclose(grad, lean_grads[name], atol=1e-6), name


@needs_cxx
def test_compiled_training_loss_keeps_the_head_on_supervised_positions(monkeypatch):
    # Under torch.compile the head-and-loss part runs eagerly (a graph break), so the head still
    # sees only the supervised rows; loss and gradients equal eager ones.
    model, batch = _answer_only_batch()
    apply_training_kernels(model)   # as the training loop does, eager or compiled
    head_rows = []

    def spy(hidden, weight, targets):
        head_rows.append(hidden.shape[0])
        return linear_cross_entropy(hidden, weight, targets)

    monkeypatch.setattr(kernels, "linear_cross_entropy", spy)
    _, eager, eager_grads = _loss_and_grads(model, model, batch, return_logits=False)
    _, compiled, compiled_grads = _loss_and_grads(model, compile_for_training(model, torch.device("cpu")), batch,
                                                  return_logits=False)
    assert head_rows == [6, 6]
    assert torch.allclose(eager, compiled, atol=1e-5)
    for name, grad in eager_grads.items():
        assert torch.allclose(grad, compiled_grads[name], atol=1e-5), name


@needs_cxx
def test_compiled_training_follows_the_number_of_supervised_positions():
    # The compiled tail (last MLP and norm on the supervised rows) takes any row count: a second
    # batch with more supervised positions gives the eager loss and gradients too.
    model, batch = _answer_only_batch()
    compiled = compile_for_training(model, torch.device("cpu"))
    for answer in (3, 7):
        batch["targets"] = torch.full_like(batch["input_ids"], -100)
        batch["targets"][:, -answer:] = torch.randint(0, 100, (2, answer))
        _, eager, eager_grads = _loss_and_grads(model, model, batch, return_logits=False)
        _, loss, grads = _loss_and_grads(model, compiled, batch, return_logits=False)
        assert torch.allclose(eager, loss, atol=1e-5), answer
        for name, grad in eager_grads.items():
            assert torch.allclose(grad, grads[name], atol=1e-5), (answer, name)


def test_compiled_training_with_a_mask_prints_no_graph_break_warning(caplog):
    # The all-real-tokens check is read on the host (one graph break); Dynamo must not print its
    # multi-line data-dependent-branch warning into every compiled training log.
    torch._dynamo.reset()
    model, batch = _answer_only_batch()
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with caplog.at_level(logging.WARNING):
        _, loss = compile_for_training(model, torch.device("cpu"))(**batch, return_logits=False)
        loss.backward()
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("torch")]
    assert not any("Graph break" in message for message in warned), warned


@needs_cxx
def test_compiled_cpu_training_traces_the_accel_kernels(monkeypatch):
    # compile_for_training on CPU installs nanovlm.accel's forms, and the compiled forward traces
    # them: the written-out attentions, GELU as x * sigmoid(2u), the compiled tail.
    from nanovlm.accel import compile as accel_compile

    torch._dynamo.reset()
    model, batch = _answer_only_batch()
    traced = []

    def spy(module, name):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            traced.append(name)
            return fn(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    for name in ("vit_attention", "causal_attention", "gelu_sigmoid", "_finish_rows"):
        spy(accel_compile, name)
    spy(kernels, "grouped_causal_attention")   # what causal_attention picks for a short unpadded batch
    _, loss = compile_for_training(model, torch.device("cpu"))(**batch, return_logits=False)
    loss.backward()
    assert set(traced) == {"vit_attention", "causal_attention", "grouped_causal_attention", "gelu_sigmoid",
                           "_finish_rows"}


def test_linear_cross_entropy_equals_linear_then_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    expected = F.cross_entropy(F.linear(hidden, weight), targets)
    grads = torch.autograd.grad(expected, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets)
    assert torch.allclose(loss, expected, atol=1e-6)
    for ours, ref in zip(torch.autograd.grad(loss, (hidden, weight)), grads):
        assert torch.allclose(ours, ref, atol=1e-6)


def test_bfloat16_autocast_training_loss_takes_the_plain_head(monkeypatch):
    # linear_cross_entropy is float32 only; under autocast the loss goes through head + F.cross_entropy.
    model, batch = _answer_only_batch()
    apply_training_kernels(model)
    monkeypatch.setattr(kernels, "linear_cross_entropy", None)   # would fail if called
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(**batch, return_logits=False)
    loss.backward()
    assert torch.isfinite(loss) and model.decoder.head.weight.grad is not None


def test_left_padding_does_not_change_the_real_rows(model):
    ids = _ids([1, 1])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:1]], dim=1)
    mask = torch.ones_like(padded)
    mask[0, :3] = 0
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        alone, _ = model(ids[:1], images=images)
        with_pad, _ = model(padded, images=images, attention_mask=mask)
    assert (with_pad[0, 3:] - alone[0]).abs().max().item() <= 1e-5


def test_gradients_reach_vision_projector_and_decoder():
    torch.manual_seed(0)
    model = VisionLanguageModel(VLMConfig(**TINY))
    ids = _ids([1])
    _, loss = model(ids, images=torch.randn(1, 3, 32, 32), targets=ids)
    loss.backward()
    for name in ("vision_encoder.patch_embedding.conv.weight", "MP.proj.weight", "decoder.blocks.0.attn.qkv_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
