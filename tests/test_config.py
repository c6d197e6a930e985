"""Config validation and strict parsing: every error names the field (and the value) at fault."""

import logging

import pytest

from nanovlm.config import (ConfigError, TrainConfig, VLMConfig, apply_overrides, configs_from_dict,
                            configs_to_dict, image_split_tokens, nanovlm_extra_tokens, owner_of, parse_override,
                            preset)


@pytest.fixture()
def vlm():
    return preset("tiny")[0]


@pytest.fixture()
def train():
    return preset("tiny")[1]


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_presets_are_valid():
    for name in ("tiny", "nanovlm-222m", "nanovlm-460m"):
        vlm, train = preset(name)
        vlm.validate()
        train.validate()


# ---------------------------------------------------------------- VLMConfig.validate

POSITIVE_VLM = ["vit_hidden_dim", "vit_inter_dim", "vit_patch_size", "vit_img_size", "vit_n_heads", "vit_n_blocks",
                "lm_hidden_dim", "lm_inter_dim", "lm_n_heads", "lm_n_kv_heads", "lm_n_blocks", "lm_base_vocab_size",
                "lm_vocab_size", "lm_max_length", "lm_max_position_embeddings", "mp_pixel_shuffle_factor",
                "mp_image_token_length", "vit_ln_eps", "lm_rms_eps", "lm_re_base", "lm_attn_scaling"]


@pytest.mark.parametrize("name", POSITIVE_VLM)
def test_non_positive_size_names_the_field(vlm, name):
    assert f"{name}=0" in _error(vlm.replace(**{name: 0}).validate)


def test_negative_extra_token_amount_names_the_field(vlm):
    assert "extra_token_amount=-1" in _error(vlm.replace(extra_token_amount=-1).validate)


@pytest.mark.parametrize("name,value", [("vit_dropout", 1.0), ("lm_dropout", -0.1)])
def test_dropout_outside_0_1_names_the_field(vlm, name, value):
    assert f"{name}={value}" in _error(vlm.replace(**{name: value}).validate)


@pytest.mark.parametrize("changes,fields", [
    (dict(vit_hidden_dim=130), ["vit_hidden_dim=130", "vit_n_heads=4"]),
    (dict(lm_hidden_dim=130), ["lm_hidden_dim=130", "lm_n_heads=4"]),
    (dict(lm_hidden_dim=12), ["lm_hidden_dim / lm_n_heads = 3", "odd"]),
    (dict(lm_n_kv_heads=3), ["lm_n_heads=4", "lm_n_kv_heads=3"]),
    (dict(vit_img_size=60), ["vit_img_size=60", "vit_patch_size=8"]),
    (dict(vit_img_size=72, mp_image_token_length=16), ["mp_pixel_shuffle_factor=2", "9x9"]),
    (dict(vit_img_size=64, mp_image_token_length=15), ["mp_image_token_length=15", "mp_image_token_length=16"]),
    (dict(extra_token_amount=0), ["extra_token_amount=0", "vlm_extra_tokens"]),
    (dict(lm_vocab_size=512), ["lm_vocab_size=512", "lm_base_vocab_size", "extra_token_amount"]),
    (dict(vlm_extra_tokens={"global_image_token": "<g>"}), ["vlm_extra_tokens", "image_token"]),
    (dict(vlm_image_token_id=513), ["vlm_image_token_id=513", "lm_vocab_size=513"]),
    (dict(vit_img_size=64, mp_image_token_length=16, lm_max_length=16), ["lm_max_length=16", "mp_image_token_length=16"]),
    (dict(lm_max_length=1024), ["lm_max_length=1024", "lm_max_position_embeddings=512"]),
])
def test_impossible_model_is_rejected_naming_the_fields(vlm, changes, fields):
    message = _error(vlm.replace(**changes).validate)
    for text in fields:
        assert text in message


def test_every_problem_is_reported_at_once(vlm):
    message = _error(vlm.replace(vit_hidden_dim=130, lm_n_kv_heads=3).validate)
    assert "vit_hidden_dim=130" in message and "lm_n_kv_heads=3" in message


def test_validate_checks_field_types(vlm):
    vlm.lm_n_blocks = "4"   # assigned around from_dict/replace
    assert "VLMConfig.lm_n_blocks" in _error(vlm.validate)


def test_explicit_image_token_id_needs_no_extra_rows(vlm):
    # An imported SmolVLM: the image token is already in the base vocabulary.
    cfg = vlm.replace(extra_token_amount=0, lm_vocab_size=512, vlm_image_token_id=100).validate()
    assert cfg.image_token_id == 100


def test_image_token_id_defaults_to_the_row_after_the_base_vocabulary(vlm):
    assert vlm.image_token_id == 512
    two = vlm.replace(vlm_extra_tokens={"global_image_token": "<g>", "image_token": "<i>"}, extra_token_amount=2,
                      lm_vocab_size=514)
    assert two.validate().image_token_id == 513


# ---------------------------------------------------------------- TrainConfig.validate

POSITIVE_TRAIN = ["batch_size", "gradient_accumulation_steps", "max_training_steps", "eval_interval", "eval_samples",
                  "log_interval", "checkpoint_interval", "num_workers", "report_interval", "checkpoints_to_keep",
                  "shapes_max_objects", "shapes_train_size", "shapes_eval_size", "max_new_tokens_eval",
                  "cpus_per_worker", "max_sample_length", "max_images_per_knapsack"]
NON_NEGATIVE_TRAIN = ["lr_mp", "lr_vision_backbone", "lr_language_backbone", "weight_decay", "max_grad_norm",
                      "max_failures", "dataloader_workers"]


@pytest.mark.parametrize("name", POSITIVE_TRAIN)
def test_train_non_positive_names_the_field(train, name):
    assert f"{name}=0" in _error(train.replace(**{name: 0}).validate)


@pytest.mark.parametrize("name", NON_NEGATIVE_TRAIN)
def test_train_negative_names_the_field(train, name):
    assert f"{name}=-1" in _error(train.replace(**{name: -1}).validate)


@pytest.mark.parametrize("name", ["warmup_ratio", "min_lr_ratio", "val_ratio"])
def test_train_ratio_outside_0_1_names_the_field(train, name):
    assert f"{name}=1.5" in _error(train.replace(**{name: 1.5}).validate)


@pytest.mark.parametrize("name,value", [("dtype", "fp16"), ("device", "tpu")])
def test_train_choice_fields_name_the_value_and_the_choices(train, name, value):
    message = _error(train.replace(**{name: value}).validate)
    assert f"{name}={value!r}" in message and "'auto'" in message


def test_train_peak_flops_must_be_positive(train):
    assert "peak_flops=0.0" in _error(train.replace(peak_flops=0).validate)


def test_train_all_learning_rates_zero_is_rejected(train):
    message = _error(train.replace(lr_mp=0, lr_vision_backbone=0, lr_language_backbone=0).validate)
    for name in ("lr_mp", "lr_vision_backbone", "lr_language_backbone"):
        assert name in message



def test_worker_resources_parse_into_ray_custom_resources(train):
    assert train.replace(worker_resources="").custom_worker_resources() == {}
    assert train.replace(worker_resources="slot=1, fast_disk=0.5").custom_worker_resources() == {
        "slot": 1.0, "fast_disk": 0.5}


@pytest.mark.parametrize("value", ["slot", "slot=0", "slot=x", "=1", "GPU=1", "CPU=2"])
def test_worker_resources_name_the_item_that_is_not_a_custom_resource(train, value):
    message = _error(train.replace(worker_resources=value).validate)
    assert f"worker_resources={value!r}" in message and "NAME=AMOUNT" in message

# ---------------------------------------------------------------- strict parsing

def test_unknown_field_is_named_with_a_suggestion():
    message = _error(VLMConfig.from_dict, {"lm_n_blokcs": 4})
    assert "'lm_n_blokcs'" in message and "did you mean 'lm_n_blocks'" in message
    message = _error(TrainConfig.from_dict, {"batch_sise": 4})
    assert "'batch_sise'" in message and "did you mean 'batch_size'" in message


@pytest.mark.parametrize("name,value,expected", [
    ("lm_n_blocks", "four", "int"),
    ("lm_n_blocks", 2.5, "int"),
    ("lm_n_blocks", True, "int"),
    ("lm_tie_weights", "yes", "bool"),
    ("lm_re_base", "big", "float"),
    ("vit_model_type", 3, "str"),
    ("vlm_extra_tokens", {"image_token": 5}, "dict[str, str]"),
    ("vlm_image_token_id", "x", "int or None"),
])
def test_wrong_type_names_field_value_and_expected_type(name, value, expected):
    message = _error(VLMConfig.from_dict, {name: value})
    assert f"VLMConfig.{name}" in message and repr(value) in message and expected in message


def test_none_for_a_required_field_names_it():
    assert "TrainConfig.batch_size must be int, got None" in _error(TrainConfig.from_dict, {"batch_size": None})


def test_ints_are_accepted_for_floats_and_none_for_optionals():
    assert VLMConfig.from_dict({"lm_re_base": 10000, "vlm_image_token_id": None}).lm_re_base == 10000.0


def test_from_dict_needs_a_dict():
    assert "VLMConfig" in _error(VLMConfig.from_dict, ["lm_n_blocks", 4])


def test_legacy_checkpoint_fields_are_dropped_with_a_warning_when_not_strict(caplog):
    data = {"lm_n_blocks": 2, "lm_use_tokens": False, "lm_eos_token_id": 0, "max_img_size": 1792,
            "resize_to_max_side_len": True}
    with caplog.at_level(logging.WARNING, logger="nanovlm.config"):
        cfg = VLMConfig.from_dict(data, strict=False)
    assert (cfg.lm_n_blocks, cfg.max_img_size, cfg.resize_to_max_side_len) == (2, 1792, True)
    for name in ("lm_use_tokens", "lm_eos_token_id"):
        assert name in caplog.text


# ---------------------------------------------------------------- the image pipeline's fields

def test_a_config_without_max_img_size_does_not_split_images():
    # nanoVLM before image splitting (nanoVLM-222M) wrote neither field: one square per image.
    cfg = VLMConfig.from_dict({"vit_img_size": 224, "lm_use_tokens": False}, strict=False).validate()
    assert (cfg.max_img_size, cfg.splits_images, cfg.resize_to_max_side_len) == (224, False, False)


def test_pixel_range_follows_who_wrote_the_config():
    # nanoVLM's processor gives [0, 1]; nanovlm-ray's before this field gave (x - 0.5) / 0.5, and
    # its config.json always holds vlm_image_token_id, which nanoVLM's never does.
    nanovlm = VLMConfig.from_dict({"lm_use_tokens": False}, strict=False)
    ours_before = VLMConfig.from_dict({"vlm_image_token_id": None})
    assert (nanovlm.vit_img_mean, nanovlm.vit_img_std) == (0.0, 1.0)
    assert (ours_before.vit_img_mean, ours_before.vit_img_std) == (0.5, 0.5)
    assert VLMConfig.from_dict(preset("nanovlm-460m")[0].to_dict()).vit_img_mean == 0.0


def test_nanovlm_460m_follows_the_current_nanovlm_defaults():
    cfg = preset("nanovlm-460m")[0]
    assert (cfg.vit_img_size, cfg.max_img_size, cfg.resize_to_max_side_len, cfg.splits_images) == (512, 2048, True, True)
    assert (cfg.mp_pixel_shuffle_factor, cfg.mp_image_token_length, cfg.lm_hidden_dim, cfg.lm_n_blocks) == (4, 64, 960, 32)
    assert cfg.extra_token_amount == 66 and cfg.lm_vocab_size == 49152 + 66 and cfg.image_token_id == 49152
    tokens = list(cfg.vlm_extra_tokens.items())
    assert tokens[:3] == [("image_token", "<|image|>"), ("global_image_token", "<|global_image|>"),
                          ("r1c1", "<row_1_col_1>")]
    assert tokens[-1] == ("r8c8", "<row_8_col_8>")


def test_tiny_keeps_one_tile_per_image():
    cfg = preset("tiny")[0]
    assert (cfg.max_img_size, cfg.splits_images, cfg.vit_img_mean, cfg.vit_img_std) == (48, False, 0.5, 0.5)
    assert list(cfg.vlm_extra_tokens) == ["image_token"] and cfg.lm_vocab_size == 513


@pytest.mark.parametrize("changes,fields", [
    (dict(max_img_size=40), ["max_img_size=40", "multiple of vit_img_size=48"]),
    (dict(max_img_size=100), ["max_img_size=100", "multiple of vit_img_size=48"]),
    (dict(max_img_size=96), ["2x2 tiles", "r1c1, r1c2, r2c1", "image_split_tokens(2)"]),
    (dict(max_img_size=48 * 8, vlm_extra_tokens=nanovlm_extra_tokens(), extra_token_amount=66, lm_vocab_size=578,
          lm_max_length=256), ["lm_max_length=256", "max_img_size=384"]),   # 8x8 tiles + a global view: 65 x 10
    (dict(vit_img_std=0.0), ["vit_img_std=0.0"]),
])
def test_impossible_image_pipeline_is_rejected_naming_the_fields(vlm, changes, fields):
    message = _error(vlm.replace(**changes).validate)
    for text in fields:
        assert text in message


def test_splitting_without_a_global_token_is_valid(vlm):
    # nanoVLM between image splitting and the global view: r{i}c{j} tokens only.
    tokens = {"image_token": "<|image|>", **{k: v for k, v in image_split_tokens(2).items() if k != "global_image_token"}}
    vlm.replace(max_img_size=96, vlm_extra_tokens=tokens, extra_token_amount=5, lm_vocab_size=517).validate()


def test_overrides_move_max_img_size_and_the_extra_tokens_vocabulary(vlm, train):
    moved, _ = apply_overrides(vlm, train, ["vit_img_size=64"])
    assert moved.max_img_size == 64
    split, _ = apply_overrides(vlm, train, {"max_img_size": 96, "vlm_extra_tokens": nanovlm_extra_tokens()})
    assert (split.extra_token_amount, split.lm_vocab_size) == (66, 512 + 66)
    split.validate()


def test_legacy_fields_are_errors_in_strict_mode():
    assert "'lm_use_tokens'" in _error(VLMConfig.from_dict, {"lm_use_tokens": False})


def test_unknown_non_legacy_field_is_an_error_even_when_not_strict():
    assert "'lm_flux_capacitor'" in _error(VLMConfig.from_dict, {"lm_flux_capacitor": 1}, strict=False)


def test_from_json_names_a_missing_or_broken_file(tmp_path):
    assert str(tmp_path / "nope.json") in _error(VLMConfig.from_json, tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert str(broken) in _error(VLMConfig.from_json, broken)


def test_json_round_trip(vlm, train, tmp_path):
    vlm.to_json(tmp_path / "vlm.json")
    assert VLMConfig.from_json(tmp_path / "vlm.json") == vlm
    assert configs_from_dict(configs_to_dict(vlm, train)) == (vlm, train)


def test_configs_from_dict_names_missing_and_unknown_sections(vlm, train):
    assert "'train'" in _error(configs_from_dict, {"vlm": vlm.to_dict()})
    message = _error(configs_from_dict, {"vlm": vlm.to_dict(), "train": train.to_dict(), "extra": {}})
    assert "extra" in message


def test_replace_names_unknown_fields_and_wrong_types(vlm):
    assert "'lm_n_blokcs'" in _error(vlm.replace, lm_n_blokcs=2)
    assert "VLMConfig.lm_n_blocks" in _error(vlm.replace, lm_n_blocks="2")


# ---------------------------------------------------------------- key=value overrides

def test_override_strings_are_parsed_by_the_field_type():
    assert parse_override("lm_n_blocks=4") == ("lm_n_blocks", 4)
    assert parse_override("vlm.lm_tie_weights=false") == ("lm_tie_weights", False)
    assert parse_override("train.lr_mp=1e-3") == ("lr_mp", 1e-3)
    assert parse_override("vlm_image_token_id=none") == ("vlm_image_token_id", None)
    assert parse_override('vlm_extra_tokens={"image_token": "<i>"}') == ("vlm_extra_tokens", {"image_token": "<i>"})


def test_override_without_equals_sign_is_named():
    assert "'lm_n_blocks'" in _error(parse_override, "lm_n_blocks")


def test_override_of_unknown_field_suggests_the_closest():
    message = _error(parse_override, "lm_n_blokcs=4")
    assert "'lm_n_blokcs'" in message and "'lm_n_blocks'" in message


@pytest.mark.parametrize("text,field", [
    ("lm_n_blocks=abc", "VLMConfig.lm_n_blocks='abc'"),
    ("lm_tie_weights=maybe", "VLMConfig.lm_tie_weights='maybe'"),
    ("lr_mp=fast", "TrainConfig.lr_mp='fast'"),
    ("vlm_extra_tokens={bad", "VLMConfig.vlm_extra_tokens"),
])
def test_override_with_an_unparsable_value_names_field_and_value(text, field):
    assert field in _error(parse_override, text)


def test_override_dict_with_unknown_field_is_named(vlm, train):
    assert "'batch_sise'" in _error(apply_overrides, vlm, train, {"batch_sise": 2})


def test_overrides_recompute_derived_sizes(vlm, train):
    new_vlm, _ = apply_overrides(vlm, train, ["vit_img_size=128", "lm_base_vocab_size=1000"])
    assert new_vlm.mp_image_token_length == 64 and new_vlm.lm_vocab_size == 1001
    new_vlm.validate()


def test_unknown_preset_is_named_with_a_suggestion():
    message = _error(preset, "tinyy")
    assert "'tinyy'" in message and "'tiny'" in message


def test_owner_of_unknown_field_is_named():
    assert "'nonsense_field'" in _error(owner_of, "nonsense_field")
