"""The decoder equals transformers' LlamaForCausalLM (GQA, tied and untied), with padding and a KV cache."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nanovlm.config import VLMConfig
from nanovlm.models import VisionLanguageModel
from nanovlm.models.hf_import import TensorFile, copy_into, lm_fields, lm_tensors

VOCAB = 96


def _llama(tmp_path, tied: bool, n_heads=6, n_kv_heads=2):
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_attention_heads=n_heads,
                         num_key_value_heads=n_kv_heads, num_hidden_layers=2, rms_norm_eps=1e-5, rope_theta=5000.0,
                         max_position_embeddings=128, tie_word_embeddings=tied)
    model = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: perturb every parameter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    return model, hf_cfg


def _ours(tmp_path, hf_cfg, tied: bool) -> VisionLanguageModel:
    """A VLM whose decoder holds the Llama weights (plus one extra vocabulary row)."""
    cfg = VLMConfig(vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=4, vit_n_blocks=1, vit_img_size=32,
                    vit_patch_size=8, mp_image_token_length=4, **lm_fields(hf_cfg, "llama"),
                    lm_base_vocab_size=VOCAB, extra_token_amount=1, lm_vocab_size=VOCAB + 1, lm_tie_weights=tied,
                    lm_max_length=64)
    model = VisionLanguageModel(cfg).eval()
    src = TensorFile(tmp_path)
    copy_into(model.decoder, lm_tensors(src, "model.", cfg.lm_n_blocks, cfg.lm_vocab_size, tied), "llama",
              skip=("rotary_embd.inv_freq", "head.weight"))
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_text_only_logits_match_llama_for_causal_lm(tmp_path, tied):
    reference, hf_cfg = _llama(tmp_path, tied)
    assert hf_cfg.num_attention_heads // hf_cfg.num_key_value_heads == 3
    ours = _ours(tmp_path, hf_cfg, tied)
    assert (ours.decoder.head.weight is ours.decoder.token_embedding.weight) == tied
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got, loss = ours(ids)
    assert loss is None
    assert (got[..., :VOCAB] - expected).abs().max().item() <= 1e-4


def test_left_padded_rows_match_llama_with_positions_from_the_mask(tmp_path):
    reference, hf_cfg = _llama(tmp_path, tied=False)
    ours = _ours(tmp_path, hf_cfg, tied=False)
    ids = torch.randint(0, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate passes
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got, _ = ours(ids, attention_mask=mask)
        alone, _ = ours(ids[:1, 4:])
    real = mask.bool()
    assert (got[..., :VOCAB][real] - expected[real]).abs().max().item() <= 1e-4
    assert (got[0, 4:] - alone[0]).abs().max().item() <= 1e-5
    assert torch.isfinite(got).all()


def test_kv_cache_prefill_and_decode_equal_one_full_forward(tmp_path):
    _, hf_cfg = _llama(tmp_path, tied=True)
    decoder = _ours(tmp_path, hf_cfg, tied=True).decoder
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = decoder(ids, attention_mask=mask)
        cache = decoder.new_kv_cache(2, 16)
        prefix = decoder(ids[:, :6], attention_mask=mask[:, :6], kv_cache=cache)
        steps = [decoder(ids[:, t:t + 1], kv_cache=cache) for t in range(6, 9)]
    assert cache.length == 9
    cached = torch.cat([prefix, *steps], dim=1)
    real = mask.bool()
    assert (cached[real] - full[real]).abs().max().item() <= 1e-5


def test_kv_cache_is_preallocated_and_written_in_place(tmp_path):
    _, hf_cfg = _llama(tmp_path, tied=True)
    decoder = _ours(tmp_path, hf_cfg, tied=True).decoder
    cache = decoder.new_kv_cache(1, 8)
    storage = cache.k.data_ptr()
    with torch.no_grad():
        decoder(torch.randint(0, VOCAB, (1, 3)), kv_cache=cache)
        decoder(torch.randint(0, VOCAB, (1, 1)), kv_cache=cache)
    assert cache.k.shape == (2, 1, 2, 8, 8)  # [layers, B, kv heads, max_len, head_dim]
    assert cache.k.data_ptr() == storage
    assert cache.k[:, :, :, :4].abs().sum() > 0 and cache.k[:, :, :, 4:].abs().sum() == 0
    with pytest.raises(ValueError, match="KV cache holds 8 positions"):
        decoder(torch.randint(0, VOCAB, (1, 5)), kv_cache=cache)


def test_decoder_accepts_embeddings_as_well_as_ids(tmp_path):
    _, hf_cfg = _llama(tmp_path, tied=True)
    decoder = _ours(tmp_path, hf_cfg, tied=True).decoder
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        assert torch.equal(decoder(ids), decoder(decoder.token_embedding(ids)))


def test_deferring_the_last_mlp_then_finishing_any_rows_equals_the_full_forward(tmp_path):
    _, hf_cfg = _llama(tmp_path, tied=True)
    decoder = _ours(tmp_path, hf_cfg, tied=True).decoder
    ids = torch.randint(0, VOCAB, (2, 7))
    rows = torch.tensor([[0, 0, 1, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        full = decoder(ids)
        attended = decoder(ids, defer_last_mlp=True)
        assert torch.allclose(decoder.finish(attended[rows]), full[rows], atol=1e-6)
        with pytest.raises(ValueError, match="defer_last_mlp"):
            decoder(ids, kv_cache=decoder.new_kv_cache(2, 8), defer_last_mlp=True)


def test_rope_inv_freq_is_a_saved_buffer():
    cfg = VLMConfig(lm_hidden_dim=32, lm_n_heads=4, lm_n_kv_heads=2, lm_inter_dim=64, lm_n_blocks=1,
                    lm_re_base=10000)
    model = VisionLanguageModel(cfg.replace(vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=4, vit_n_blocks=1))
    inv_freq = model.state_dict()["decoder.rotary_embd.inv_freq"]
    assert torch.allclose(inv_freq, 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))


@pytest.mark.parametrize("n_heads,n_kv_heads", [(6, 2), (4, 4)])
def test_grouped_causal_attention_equals_causal_sdpa_and_its_gradients(n_heads, n_kv_heads):
    # The written-out causal attention nanovlm.accel installs for compiled CPU training.
    from nanovlm.accel.kernels import grouped_causal_attention

    torch.manual_seed(0)
    B, T, hd = 3, 11, 8
    q, k, v = (torch.randn(B, h, T, hd, dtype=torch.float64, requires_grad=True)
               for h in (n_heads, n_kv_heads, n_kv_heads))
    ours = grouped_causal_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_heads != n_kv_heads)
    assert torch.allclose(ours, ref, atol=1e-12)
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(ours_grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-12)
