"""Every command answers bad input with one line on stderr that names the file or field and the
fix (exit status 2), and anything unexpected with one line and the path of a log file holding
the traceback (exit status 1); `nanovlm --debug` prints the traceback. Bad input fails before
the work: before training, before Ray starts."""

import json
import shutil
import sys
import time
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from nanovlm.cli import main
from nanovlm.config import preset
from nanovlm.sweep.results import TrialRecord, why_no_trial_trained
from training_configs import TINY_SETTINGS, set_arguments


@pytest.fixture(autouse=True)
def no_ray_started():
    yield
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), "bad input started Ray"


@pytest.fixture(autouse=True)
def no_progress_bars():
    """`datasets` draws progress bars on stderr (log lines go to pytest's capture): off, so that
    stderr holds only what the command prints."""
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def _write_inputs(root: Path) -> None:
    """One bad input of every kind, next to the good files they spoil."""
    (root / "bad.json").write_text('{"vlm": {},\n "train": {,}}\n')
    (root / "number.json").write_text("42\n")
    (root / "list.json").write_text("[1, 2]\n")
    (root / "a_file").write_text("not a directory\n")
    (root / "not_an_image.png").write_text("hello\n")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "red.png")

    folder = root / "folder"   # an imagefolder whose metadata.jsonl line 3 is malformed
    folder.mkdir()
    lines = []
    for i in range(4):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"img{i}.png")
        lines.append(json.dumps({"file_name": f"img{i}.png", "texts": [{"user": "Colour?", "assistant": f"c{i}"}]}))
    lines[2] = '{"file_name": "img2.png", "texts": [oops'
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    datasets.Dataset.from_list([{"images": [Image.new("RGB", (16, 16))], "texts": []}] * 3).save_to_disk(
        str(root / "no_usable_rows"))

    from nanovlm.models import VisionLanguageModel
    VisionLanguageModel(preset("tiny", **TINY_SETTINGS)[0]).save_pretrained(root / "checkpoint")
    shutil.copytree(root / "checkpoint", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(root / "checkpoint", root / "bad_config")
    (root / "bad_config" / "config.json").write_text('{"vit_hidden_dim": 32,\n  oops}\n')
    shutil.copytree(root / "checkpoint", root / "unknown_field")
    config = json.loads((root / "checkpoint" / "config.json").read_text())
    (root / "unknown_field" / "config.json").write_text(json.dumps({**config, "lm_n_blokcs": 2}))

    space = {"name": "all_invalid", "preset": "tiny", "overrides": {"max_training_steps": 4},
             # the tiny preset's 6x6 patch grid: neither 4 nor 5 divides it
             "space": {"mp_pixel_shuffle_factor": {"grid": [4, 5]}, "lr_mp": {"choice": [1e-3, 2e-3]}}}
    (root / "all_invalid.yaml").write_text(yaml.safe_dump(space))
    (root / "bad_grid.yaml").write_text("name: x\naxes: [1, 2\n")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    _write_inputs(root)
    return root


TRAIN = [*set_arguments(), "--max-steps", "1", "--no-tracking", "--output", "{root}/out"]
GENERATE = ["generate", "--prompt", "what colour?", "--max-new-tokens", "2"]
# case -> (arguments, what the one line must name); {root} is the inputs directory
CASES = {
    "config-invalid-json": (["train", "--config", "{root}/bad.json"], ["{root}/bad.json", "line 2, column 12"]),
    "config-holds-a-number": (["validate", "--config", "{root}/number.json"],
                              ["{root}/number.json", "got a number (42)", "'vlm' and 'train'"]),
    "config-holds-a-list": (["config", "--config", "{root}/list.json"], ["{root}/list.json", "got a list"]),
    "config-missing": (["train", "--config", "{root}/nope.json"], ["{root}/nope.json", "does not exist"]),
    "metadata-jsonl-bad-line": (["train", "--dataset", "{root}/folder", *TRAIN],
                                ["{root}/folder/metadata.jsonl line 3 is not valid JSON", "file_name"]),
    "dataset-without-usable-rows": (["train", "--dataset", "{root}/no_usable_rows", "--set", "val_ratio=0", *TRAIN],
                                    ["no_usable_rows", "0 usable", "3 no_usable_turns", "row 0", "texts=[{'user'"]),
    "dataset-neither-local-nor-on-hub": (["train", "--dataset", "nobody/no-such-dataset", *TRAIN],
                                         ["nobody/no-such-dataset", "Hub"]),
    "image-not-an-image": ([*GENERATE, "--checkpoint", "{root}/checkpoint", "--image", "{root}/not_an_image.png"],
                           ["--image {root}/not_an_image.png is not an image"]),
    "image-missing": ([*GENERATE, "--checkpoint", "{root}/checkpoint", "--image", "{root}/nope.png"],
                      ["--image {root}/nope.png does not exist"]),
    "weights-truncated": ([*GENERATE, "--checkpoint", "{root}/truncated", "--image", "{root}/red.png"],
                          ["{root}/truncated/model.safetensors is truncated", "re-save"]),
    "checkpoint-config-invalid-json": ([*GENERATE, "--checkpoint", "{root}/bad_config", "--image", "{root}/red.png"],
                                       ["{root}/bad_config/config.json is not valid JSON", "line 2, column 3"]),
    "checkpoint-config-unknown-field": (
        [*GENERATE, "--checkpoint", "{root}/unknown_field", "--image", "{root}/red.png"],
        ["{root}/unknown_field/config.json", "'lm_n_blokcs'", "'lm_n_blocks'"]),
    "output-is-a-file": (["train", *TRAIN, "--output", "{root}/a_file"],
                         ["output_dir='{root}/a_file'", "is a file", "--output"]),
    "output-under-a-file-on-ray": (["train", *TRAIN, "--num-workers", "2", "--output", "{root}/a_file/run"],
                                   ["output_dir='{root}/a_file/run'", "{root}/a_file is a file"]),
    "sweep-every-trial-invalid": (["sweep", "{root}/all_invalid.yaml", "--storage-path", "{root}/sweeps"],
                                  ["all_invalid.yaml", "every trial would be invalid", "mp_pixel_shuffle_factor=4"]),
    "validate-bad-flag": (["validate", "--seq-len", "0"], ["--seq-len=0 must be positive"]),
    "bench-grid-invalid-yaml": (["bench", "grid", "{root}/bad_grid.yaml"], ["{root}/bad_grid.yaml", "line 2"]),
    "dashboard-store-under-a-file": (["dashboard", "--backend-store-uri", "sqlite:///{root}/a_file/mlflow.db"],
                                     ["{root}/a_file"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_file_or_field(case, inputs, capsys):
    arguments, named = CASES[case]
    assert main([a.replace("{root}", str(inputs)) for a in arguments]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for text in named:
        assert text.replace("{root}", str(inputs)) in err, err
    assert not (inputs / "sweeps").exists() and not (inputs / "out").exists()   # failed before the work


@pytest.mark.parametrize("route", ["one process", "ray train"])
def test_an_output_path_that_is_a_file_fails_before_training(route, inputs, monkeypatch, capsys):
    import nanovlm.distributed.cluster
    import nanovlm.training.tracked

    def must_not_run(*args, **kwargs):
        raise AssertionError("training started despite an unwritable output_dir")

    monkeypatch.setattr(nanovlm.training.tracked, "train", must_not_run)
    monkeypatch.setattr(nanovlm.distributed.cluster, "ensure_ray", must_not_run)
    workers = ["--num-workers", "2"] if route == "ray train" else []
    start = time.perf_counter()
    assert main(["train", "--preset", "tiny", "--output", str(inputs / "a_file"), *workers]) == 2
    assert time.perf_counter() - start < 10
    assert f"output_dir='{inputs / 'a_file'}' cannot be written" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_with_the_path_of_its_traceback(monkeypatch, tmp_path, capsys):
    import nanovlm.commands.config

    def broken(args):
        raise RuntimeError("something nobody planned for\nsecond line")

    monkeypatch.setenv("NANOVLM_HOME", str(tmp_path))
    monkeypatch.setattr(nanovlm.commands.config, "run", broken)
    assert main(["config"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "unexpected error: RuntimeError: something nobody planned for" in err
    [log] = (tmp_path / "logs").glob("nanovlm-config-*.log")
    assert str(log) in err
    assert "Traceback" in log.read_text() and "second line" in log.read_text()

    assert main(["--debug", "config"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err and err.strip().splitlines()[-1].startswith("nanovlm config:")


def _outcome(tmp_path, statuses):
    from nanovlm.sweep.results import write_results
    from nanovlm.sweep.runner import SweepOutcome
    from nanovlm.sweep.space import parse_space

    spec = parse_space({"preset": "tiny", "space": {"lr_mp": {"loguniform": [1e-4, 1e-2]}}})
    records = [TrialRecord(f"t{i}", {"lr_mp": 1e-3}, status, reason) for i, (status, reason) in enumerate(statuses)]
    return SweepOutcome(tmp_path, "parent", "sqlite:///x.db", records, write_results(records, spec, tmp_path),
                        best=None)


@pytest.mark.parametrize("statuses, code", [
    ([("invalid", "Invalid VLMConfig:\n  lm_n_heads=5 does not divide"), ("invalid", "Invalid VLMConfig: x")], 2),
    ([("invalid", "Invalid VLMConfig: x"), ("failed", "NonFiniteLossError: loss=nan")], 1),
])
def test_a_sweep_in_which_no_trial_trained_exits_non_zero_with_the_reasons(statuses, code, tmp_path, monkeypatch,
                                                                            capsys):
    import nanovlm.sweep.runner

    space = tmp_path / "space.yaml"   # lr_mp is continuous: which trials are invalid is only known per trial
    space.write_text(yaml.safe_dump({"preset": "tiny", "space": {"lr_mp": {"loguniform": [1e-4, 1e-2]}}}))
    monkeypatch.setattr(nanovlm.sweep.runner, "run_sweep", lambda *args, **kwargs: _outcome(tmp_path, statuses))
    assert main(["sweep", str(space)]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "none of the 2 trials trained" in err, err
    assert all(" ".join(reason.split()) in err for _, reason in statuses)


def test_no_trial_trained_is_none_once_one_trial_trained():
    records = [TrialRecord("a", {}, "invalid", "x"), TrialRecord("b", {}, "early-stopped")]
    assert why_no_trial_trained(records) is None
    assert why_no_trial_trained(records[:1]) == "none of the 1 trials trained: a invalid: x"


def test_parquet_image_paths_are_read_relative_to_the_file_or_as_absolute(tmp_path):
    from nanovlm.data import build_datasets, get_tokenizer, image_processor_for

    (tmp_path / "images").mkdir()
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (20, 20), colour).save(tmp_path / "images" / f"{i}.png")
    paths = ["images/0.png", str(tmp_path / "images" / "1.png"), "images/2.png", "images/missing.png"]
    pd.DataFrame({"images": [[p] for p in paths],
                  "texts": [[{"user": "Colour?", "assistant": f"a{i}"}] for i in range(4)]}
                 ).to_parquet(tmp_path / "rows.parquet")

    vlm, train = preset("tiny", **TINY_SETTINGS)
    tokenizer = get_tokenizer(vlm.lm_tokenizer, vlm.vlm_extra_tokens, vlm.lm_chat_template)
    for source in (tmp_path / "rows.parquet", tmp_path):   # the file, or its directory (images beside it)
        ds = build_datasets(vlm, train.replace(train_dataset_path=str(source), val_ratio=0.0), tokenizer).train
        assert len(ds) == 3 and ds.skipped["missing_image"] == 1
        assert f"{tmp_path / 'images' / 'missing.png'}" in ds.skip_details["missing_image"]
        processor = image_processor_for(vlm)
        by_answer = {ds[k]["answer"]: ds[k]["images"] for k in range(len(ds))}
        for i, colour in enumerate(colours):
            tiles, _ = processor(Image.new("RGB", (20, 20), colour))     # one tile (tiny does not split)
            assert torch.equal(by_answer[f"a{i}"][0], tiles[0])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_dataset_error_in_ray_workers_is_the_same_one_line(inputs, tmp_path, capsys):
    import tempfile

    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: socket paths are length-limited
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir)
    try:
        code = main(["train", "--dataset", str(inputs / "no_usable_rows"), "--num-workers", "2", *set_arguments(),
                     "--set", "cpus_per_worker=0.5", "--set", "val_ratio=0", "--set", f"storage_path={tmp_path}",
                     "--max-steps", "1", "--no-tracking", "--output", str(tmp_path / "out")])
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert code == 2
    # Ray forwards its workers' own logs (tracebacks included) to this stderr; the command adds one line
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nanovlm train:")]
    assert len(ours) == 1 and "no_usable_rows' has 0 usable training rows for 2 worker(s)" in ours[0], ours
