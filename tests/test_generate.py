"""VisionLanguageModel.generate: KV-cached decoding equals recomputation, batching with left padding
equals one-by-one, EOS stops, and sampling respects temperature / top-k / top-p."""

import logging

import pytest
import torch

from nanovlm.accel import fused_decode
from nanovlm.config import VLMConfig
from nanovlm.models import VisionLanguageModel, sample_next_token
from nanovlm.models.generation import decode
from toolchain import HAS_CXX, needs_cpu_fast, needs_cxx

TINY = dict(vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=4, vit_n_blocks=2, vit_img_size=32, vit_patch_size=8,
            lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=4, lm_n_kv_heads=2, lm_n_blocks=2,
            lm_base_vocab_size=100, extra_token_amount=1, lm_vocab_size=101, lm_max_length=64,
            lm_max_position_embeddings=128, mp_pixel_shuffle_factor=2, mp_image_token_length=4)
IMG = 100


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = VisionLanguageModel(VLMConfig(**TINY, lm_tie_weights=False)).eval()
    with torch.no_grad():
        # Larger weights than the N(0, 0.02) init: sharp logits (no near-ties for greedy choices)
        # and varied continuations instead of one repeated token.
        for p in m.decoder.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
        m.decoder.token_embedding.weight.normal_(0.0, 1.0)
    return m


def _prompt(text_len, seed):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 100, (text_len,), generator=g).tolist()
    return torch.tensor([text[:1] + [IMG] * 4 + text[1:]])


def _recompute_greedy(model, ids, images, n):
    """Reference: no cache, the whole sequence through forward() for every new token."""
    seq = ids
    for _ in range(n):
        logits, _ = model(seq, images=images)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, ids.shape[1]:]


def test_kv_cached_greedy_decoding_equals_full_recomputation(model):
    ids = _prompt(6, seed=1)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = _recompute_greedy(model, ids, images, 8)
    got = model.generate(ids, images=images, max_new_tokens=8, greedy=True)
    assert got.shape == (1, 8)
    assert torch.equal(got, expected)


def test_batched_left_padded_generation_equals_one_by_one(model):
    prompts = [_prompt(n, seed=n) for n in (3, 7, 5)]
    images = torch.randn(3, 3, 32, 32)
    width = max(p.shape[1] for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1]:] = p[0]
        mask[row, width - p.shape[1]:] = 1
    batched = model.generate(ids, images=images, attention_mask=mask, max_new_tokens=10, greedy=True)
    for row, p in enumerate(prompts):
        alone = model.generate(p, images=images[row:row + 1], max_new_tokens=10, greedy=True)
        assert torch.equal(batched[row], alone[0]), f"row {row}"


def test_generation_stops_when_every_row_has_emitted_eos(model):
    ids = torch.cat([_prompt(4, seed=11), _prompt(4, seed=12)])
    images = torch.randn(2, 3, 32, 32)
    free = model.generate(ids, images=images, max_new_tokens=30, greedy=True)
    common = set(free[0].tolist()) & set(free[1].tolist())
    assert common, "pick prompts whose free continuations share a token"
    first_of = lambda tok: [int((free[r] == tok).nonzero()[0]) for r in range(2)]  # noqa: E731
    eos = min(common, key=lambda tok: max(first_of(tok)))
    first = first_of(eos)
    assert first[0] != first[1]   # one row finishes before the other

    calls = []
    hook = model.decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = model.generate(ids, images=images, max_new_tokens=30, greedy=True, eos_token_id=eos,
                             eos_check_interval=1)
    finally:
        hook.remove()
    for r in range(2):
        assert torch.equal(out[r, :first[r] + 1], free[r, :first[r] + 1])   # same tokens up to and including EOS
        assert (out[r, first[r]:] == eos).all()                               # then padded with EOS
    assert len(calls) == max(first) + 1      # prefill + one decode step per token before the last EOS
    assert out.shape == (2, 30)


def test_without_eos_every_requested_token_is_generated(model):
    ids = _prompt(5, seed=21)
    calls = []
    hook = model.decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = model.generate(ids, images=torch.zeros(1, 3, 32, 32), max_new_tokens=8, greedy=True)
    finally:
        hook.remove()
    assert out.shape == (1, 8) and len(calls) == 8   # prefill + 7 decode steps


def test_generate_requires_left_padding(model):
    ids = _prompt(3, seed=0)
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, images=torch.randn(1, 3, 32, 32), attention_mask=mask, max_new_tokens=2)


def test_text_only_generation_and_zero_new_tokens(model):
    ids = torch.randint(0, 100, (2, 4))
    assert model.generate(ids, max_new_tokens=0).shape == (2, 0)
    assert model.generate(ids, max_new_tokens=3, greedy=True).shape == (2, 3)


def test_top_k_one_and_tiny_top_p_sample_the_argmax():
    logits = torch.randn(4, 50)
    best = logits.argmax(-1)
    assert torch.equal(sample_next_token(logits, top_k=1, temperature=2.0), best)
    assert torch.equal(sample_next_token(logits, top_p=1e-6), best)
    assert torch.equal(sample_next_token(logits, greedy=True, top_k=5), best)


def test_top_k_samples_stay_in_the_k_most_likely_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 30).expand(2000, -1)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    assert set(sample_next_token(logits, top_k=3).tolist()) <= allowed


def test_top_p_keeps_the_smallest_set_reaching_p():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, -1)
    samples = sample_next_token(logits, top_p=0.7)
    assert set(samples.tolist()) == {0, 1}                 # 0.5 < 0.7 <= 0.5 + 0.3
    assert abs((samples == 0).float().mean().item() - 0.5 / 0.8) < 0.05


def test_low_temperature_concentrates_on_the_argmax():
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 0.5, 0.0]]).expand(2000, -1)
    hot = (sample_next_token(logits, temperature=1.0) == 0).float().mean()
    cold = (sample_next_token(logits, temperature=0.05) == 0).float().mean()
    assert cold > 0.99 and hot < 0.7


def test_seeded_sampling_is_reproducible(model):
    ids = _prompt(4, seed=3)
    images = torch.randn(1, 3, 32, 32)
    torch.manual_seed(5)
    a = model.generate(ids, images=images, max_new_tokens=6, top_k=20, top_p=0.9, temperature=0.8)
    torch.manual_seed(5)
    b = model.generate(ids, images=images, max_new_tokens=6, top_k=20, top_p=0.9, temperature=0.8)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- `nanovlm generate`

def test_generate_command_prints_the_greedy_answer(tmp_path, capsys):
    from PIL import Image

    from nanovlm.cli import main
    from nanovlm.config import preset
    from nanovlm.data.processors import get_tokenizer, image_processor_for

    # 64 px pinned: 8x8 patch grid, 16 image tokens (the reference below spells both out)
    cfg = preset("tiny", vit_img_size=64, lm_tie_weights=False, vit_n_blocks=1, lm_n_blocks=1)[0]
    assert (cfg.vit_img_size, cfg.mp_image_token_length) == (64, 16)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path / "ckpt")
    Image.new("RGB", (80, 60), (200, 30, 30)).save(tmp_path / "red.png")

    # Reference, built from the documented contract: chat template, one user turn opened by
    # mp_image_token_length image placeholders, greedy decoding until <|im_end|>.
    tok = get_tokenizer(cfg.lm_tokenizer, cfg.vlm_extra_tokens, cfg.lm_chat_template)
    text = tok.apply_chat_template([{"role": "user", "content": tok.image_token * 16 + "what colour?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    pixels, grid = image_processor_for(cfg)(Image.open(tmp_path / "red.png"))   # tiny: one tile, no splitting
    assert pixels.shape == (1, 3, 64, 64) and grid == (1, 1)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    out = model.generate(ids, images=pixels, max_new_tokens=6, greedy=True, eos_token_id=stop)[0].tolist()
    expected = tok.decode(out[:out.index(stop)] if stop in out else out, skip_special_tokens=True).strip()
    assert expected

    command = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--image", str(tmp_path / "red.png"),
               "--prompt", "what colour?", "--max-new-tokens", "6", "--greedy"]
    assert main(command) == 0
    assert capsys.readouterr().out.strip() == expected
    if HAS_CXX:   # --compile: the fused C++ step on CPU, the same answer
        assert main(command + ["--compile"]) == 0
        assert capsys.readouterr().out.strip() == expected


def test_generate_command_takes_a_training_run_directory_as_its_latest_checkpoint(tmp_path):
    from nanovlm.commands.generate import _model_directory
    from nanovlm.training.checkpointing import TRAIN_STATE_FILE

    run = tmp_path / "run"
    for step in (500, 1000):
        (run / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
        (run / "checkpoints" / f"step_{step:06d}" / TRAIN_STATE_FILE).touch()
    assert _model_directory(str(run)) == str(run / "checkpoints" / "step_001000")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert _model_directory(str(tmp_path / "model")) == str(tmp_path / "model")   # a model directory as given
    assert _model_directory("owner/name") == "owner/name"                          # a Hub repo id as given


def test_generate_command_reports_a_missing_image(tmp_path, capsys):
    from nanovlm.cli import main

    rc = main(["generate", "--checkpoint", str(tmp_path), "--image", str(tmp_path / "nope.png"), "--prompt", "hi"])
    assert rc == 2
    assert "nope.png" in capsys.readouterr().err


def _two_prefilled_caches(dec, static: bool = False):
    """Two KV caches holding the same left-padded 2-row prompt: a `KVCache` for the eager step, and
    one (a `StaticKVCache` if `static`) for the step compared with it."""
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    caches = [dec.new_kv_cache(2, 16), dec.new_kv_cache(2, 16, static=static)]
    for cache in caches:
        dec(ids, attention_mask=mask, kv_cache=cache)
    return caches


def _rope_tables(dec, cache, n_steps):
    """cos, signed sin [B, n_steps, head_dim] of the next n_steps positions: the fused step's tables."""
    positions = cache.next_position[:, None] + torch.arange(n_steps)
    return (t[:, :, 0].contiguous() for t in dec.rotary_embd(positions, torch.float32))


def test_static_cache_decode_step_equals_the_eager_cached_step(model):
    # The compile-friendly cache (whole buffer read, later slots masked, index_copy_ writes) gives
    # what the eager cache gives, on a left-padded batch; compiled in the generation tests below.
    dec = model.decoder
    with torch.no_grad():
        caches = _two_prefilled_caches(dec, static=True)
        token = torch.tensor([9, 10])
        for step in range(4):
            expected = decode(dec, token, caches[0])
            got = decode(dec, token, caches[1])
            assert (got - expected).abs().max().item() <= 1e-5, f"step {step}"
            token = dec.head(expected).argmax(-1)
    assert int(caches[1].length) == caches[0].length == 9
    assert (caches[1].k[:, :, :, :9] - caches[0].k[:, :, :, :9]).abs().max().item() <= 1e-5


@needs_cpu_fast
def test_fused_cpu_decode_step_equals_the_eager_cached_step(model):
    # The C++ step (fused_decode.cpp) against the decoder's forward over a KVCache, on a left-padded
    # batch: the same hidden states and the same keys/values written to the cache, step after step.
    dec = model.decoder
    fused = fused_decode.fused_decoder(dec)
    assert fused is not None
    with torch.no_grad():
        caches = _two_prefilled_caches(dec)
        cos, sin = _rope_tables(dec, caches[1], 4)
        token = torch.tensor([9, 10])
        for step in range(4):
            expected = decode(dec, token, caches[0])
            got = fused.step(token, caches[1].k, caches[1].v, caches[1].key_mask, caches[1].length, cos, sin, step)
            caches[1].length += 1
            assert (got - expected).abs().max().item() <= 1e-5, f"step {step}"
            assert (caches[1].k - caches[0].k).abs().max().item() <= 1e-5
            assert (caches[1].v - caches[0].v).abs().max().item() <= 1e-5
            token = dec.head(expected).argmax(-1)


def test_fused_cpu_decode_step_refuses_a_full_cache_and_bad_tokens(model):
    dec = model.decoder
    fused = fused_decode.fused_decoder(dec)
    if fused is None:
        pytest.skip("no C++ toolchain")
    cache = dec.new_kv_cache(1, 4)
    cos, sin = _rope_tables(dec, cache, 1)
    with pytest.raises(RuntimeError, match="KV cache holds 4 positions"):
        fused.step(torch.tensor([1]), cache.k, cache.v, None, 4, cos, sin, 0)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        fused.step(torch.tensor([10_000]), cache.k, cache.v, None, 0, cos, sin, 0)


def test_fused_decode_is_only_for_float32_cpu_weights(model):
    import copy

    assert fused_decode.supports(model.decoder)
    assert not fused_decode.supports(copy.deepcopy(model.decoder).to(torch.bfloat16))
    assert fused_decode.fused_decoder(copy.deepcopy(model.decoder).to(torch.bfloat16)) is None


def test_a_build_lock_left_by_a_killed_build_is_removed(monkeypatch, tmp_path):
    # torch's builder would wait forever on it; a recent lock (a build in progress) stays.
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / fused_decode.NAME / "lock"
    lock.parent.mkdir()
    lock.touch()
    fused_decode._clear_stale_build_lock()
    assert lock.exists()
    old = time.time() - fused_decode.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    fused_decode._clear_stale_build_lock()
    assert not lock.exists()


def test_the_ninja_package_goes_on_path_where_no_ninja_is(monkeypatch):
    # torch's extension builder runs `ninja` from PATH; a venv's python run without activating
    # the venv would not find the one the `ninja` package (the cpu-fast extra) installed.
    import os

    ninja = pytest.importorskip("ninja")
    monkeypatch.setattr(fused_decode.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nowhere")
    fused_decode._put_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep) == [ninja.BIN_DIR, "/nowhere"]


def _cannot_build(monkeypatch):
    """As on a machine without ninja: building the extension fails (and has not been tried yet)."""
    import torch.utils.cpp_extension

    def no_ninja(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_ninja)
    monkeypatch.setattr(fused_decode, "_extension", None)
    monkeypatch.setattr(fused_decode, "_build_failed", False)


def test_fused_decode_falls_back_when_it_cannot_be_built(monkeypatch, caplog):
    _cannot_build(monkeypatch)
    assert fused_decode.extension() is None
    assert "falls back to torch.compile" in caplog.text
    assert "Ninja is required" in caplog.text
    assert "pip install -e '.[cpu-fast]'" in caplog.text


def _left_padded_batch():
    prompts = [_prompt(n, seed=n) for n in (3, 6)]
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 10 - p.shape[1]:] = p[0]
        mask[row, 10 - p.shape[1]:] = 1
    return dict(input_ids=ids, images=torch.randn(2, 3, 32, 32), attention_mask=mask, max_new_tokens=6, greedy=True)


@needs_cpu_fast
def test_compiled_generation_with_the_fused_step_equals_eager_generation(model):
    batch = _left_padded_batch()
    assert fused_decode.fused_decoder(model.decoder) is not None
    assert torch.equal(model.generate(**batch, compile=True), model.generate(**batch))


@needs_cxx
def test_without_the_extension_compiled_generation_falls_back_says_so_once_and_equals_eager(
        model, monkeypatch, caplog):
    # torch.compile of the decode step over a static cache, twice (the second call reuses both).
    _cannot_build(monkeypatch)
    batch = _left_padded_batch()
    eager = model.generate(**batch)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert torch.equal(model.generate(**batch, compile=True), eager)
    said = [r for r in caplog.records if "cpu-fast" in r.getMessage()]
    assert len(said) == 1
