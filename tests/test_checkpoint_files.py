"""Self-contained checkpoints: a training checkpoint copied alone answers through `nanovlm generate`
with nothing else, its model card renders the config and the metrics; `nanovlm push` uploads the
model (or its transformers export) and never the training state, tested up to the upload call."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from nanovlm.cli import main
from nanovlm.export.checkpoint_files import image_processor_settings
from nanovlm.inference import Answerer
from nanovlm.training import train
from nanovlm.training.checkpointing import load_train_state
from training_configs import perturb_weights, tiny_configs

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
PROMPT = "What colour is the shape?"
MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "image_processor.json", "README.md"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step training run of the tiny model (no MLflow): its output dir."""
    out = tmp_path_factory.mktemp("run") / "out"
    train(*tiny_configs(out, max_training_steps=STEPS))
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "red.png"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(path)
    return path


def test_a_checkpoint_copied_alone_answers_through_generate(run_dir, image, tmp_path):
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    assert MODEL_FILES <= {p.name for p in checkpoint.iterdir()}
    alone = tmp_path / "elsewhere" / "model"
    shutil.copytree(checkpoint, alone)
    perturb_weights(alone)   # two steps of training answer with <|im_end|> at once: make the answer words
    empty_cache = tmp_path / "empty-cache"
    empty_cache.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOVLM_CACHE": str(empty_cache),
           "NANOVLM_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "nanovlm.cli", "generate", "--checkpoint", str(alone), "--image",
                           str(image), "--prompt", PROMPT, "--greedy", "--max-new-tokens", "6"],
                          cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(empty_cache.iterdir()) == []          # no tokenizer was trained or cached to answer
    # the answer the model gives with the tokenizer it was trained with, named explicitly
    expected = Answerer(alone, tokenizer="shapes-bpe-512")([Image.open(image)], PROMPT, max_new_tokens=6, greedy=True)
    assert expected and done.stdout.strip() == expected


def test_the_model_card_renders_the_config_and_the_metrics(run_dir):
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    card = (checkpoint / "README.md").read_text()
    cfg = json.loads((checkpoint / "config.json").read_text())
    metrics = load_train_state(checkpoint)["extra"]["metrics"]
    assert card.startswith("---\nlibrary_name: nanovlm\nlicense: apache-2.0\n")
    assert json.dumps(cfg, indent=2) in card                                    # the whole config
    for key in ("loss", "val_loss", "val_accuracy"):
        assert f"| {key} | {metrics[key]:.4g} |" in card
    assert f"| metric at step {STEPS} | value |" in card
    assert f"steps: {STEPS} of {STEPS}" in card and "`shapes`" in card
    assert "nanovlm generate --checkpoint" in card and "Apache-2.0" in card
    assert f"{cfg['lm_n_blocks']} blocks, width {cfg['lm_hidden_dim']}" in card


def test_image_processor_settings_are_the_configs_pipeline(run_dir):
    from nanovlm.config import VLMConfig
    from nanovlm.data.processors import image_processor_for

    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    cfg = VLMConfig.from_json(checkpoint / "config.json")
    settings = json.loads((checkpoint / "image_processor.json").read_text())
    assert settings == image_processor_settings(cfg)
    ours = image_processor_for(cfg)
    assert (settings["max_img_size"], settings["splitted_image_size"], settings["resize_to_max_side_len"],
            settings["with_global_view"], settings["mean"], settings["std"]) == (
        ours.max_img_size, ours.tile_size, ours.resize_to_max_side_len, ours.with_global_view, ours.mean, ours.std)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """HfApi's repo creation and upload replaced: the upload copies the folder to a local target."""
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        shutil.copytree(kwargs["folder_path"], tmp_path / "uploaded")

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls, tmp_path / "uploaded"


def test_push_uploads_the_self_contained_model_and_not_the_training_state(run_dir, image, hub, capsys):
    calls, uploaded = hub
    assert main(["push", "--checkpoint", str(run_dir), "--repo", "someone/tiny-shapes", "--private"]) == 0
    assert capsys.readouterr().out.strip() == "https://huggingface.co/someone/tiny-shapes"
    assert calls["create_repo"] == {"repo_id": "someone/tiny-shapes", "repo_type": "model", "private": True,
                                    "exist_ok": True}
    upload = calls["upload_folder"]
    assert (upload["repo_id"], upload["repo_type"]) == ("someone/tiny-shapes", "model")
    assert {p.name for p in uploaded.iterdir()} == MODEL_FILES                  # no train_state.pt, no run record
    assert main(["generate", "--checkpoint", str(uploaded), "--image", str(image), "--prompt", PROMPT,
                 "--greedy", "--max-new-tokens", "4"]) == 0


def test_generate_from_a_hub_repo_id_uses_the_repos_own_tokenizer(run_dir, image, hub, monkeypatch, capsys):
    """The repo's files are its tokenizer: nothing is looked up under the config's `lm_tokenizer`."""
    import huggingface_hub

    import nanovlm.data.processors as processors

    _, uploaded = hub
    assert main(["push", "--checkpoint", str(run_dir), "--repo", "someone/tiny-shapes"]) == 0
    downloads = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kwargs: downloads.append(repo_id) or str(uploaded))
    sources = []
    load = processors.get_tokenizer
    monkeypatch.setattr(processors, "get_tokenizer", lambda source, *a: sources.append(source) or load(source, *a))
    capsys.readouterr()
    assert main(["generate", "--checkpoint", "someone/tiny-shapes", "--image", str(image), "--prompt", PROMPT,
                 "--greedy", "--max-new-tokens", "4"]) == 0
    expected = Answerer(uploaded)([Image.open(image)], PROMPT, max_new_tokens=4, greedy=True)
    assert capsys.readouterr().out.strip() == expected
    assert downloads == ["someone/tiny-shapes"] and sources[0] == str(uploaded)


def test_push_with_export_uploads_the_transformers_directory(run_dir, hub, capsys):
    calls, uploaded = hub
    assert main(["push", "--checkpoint", str(run_dir), "--repo", "someone/tiny-hf", "--export", "transformers"]) == 0
    assert "nanovlm push: warning: Prompt:" in capsys.readouterr().err
    assert calls["create_repo"]["private"] is False
    assert json.loads((uploaded / "config.json").read_text())["model_type"] == "idefics3"
    assert {"processor_config.json", "generation_config.json", "tokenizer.json", "README.md"} <= {
        p.name for p in uploaded.iterdir()}


def test_push_without_a_token_is_one_line_before_anything_is_written(run_dir, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", "--checkpoint", str(run_dir), "--repo", "someone/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No Hugging Face token" in err and "HF_TOKEN" in err


def test_push_takes_the_token_hf_auth_login_saved(run_dir, hub, monkeypatch, tmp_path):
    from huggingface_hub import constants, get_token

    calls, uploaded = hub
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    saved = tmp_path / "hf-home" / "token"
    saved.parent.mkdir()
    saved.write_text("hf_saved_token\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(saved))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(saved.parent / "stored_tokens"))
    assert get_token() == "hf_saved_token"
    assert main(["push", "--checkpoint", str(run_dir), "--repo", "someone/tiny-shapes"]) == 0
    assert calls["upload_folder"]["repo_id"] == "someone/tiny-shapes" and (uploaded / "model.safetensors").is_file()
