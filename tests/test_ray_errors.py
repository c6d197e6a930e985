"""Bad input to a Ray training run fails in the driver with a clear message, before any worker starts."""

import shutil
import socket
import tempfile

import pytest

from nanovlm.cli import main
from nanovlm.config import preset
from nanovlm.distributed import ClusterResourceError, check_cluster_resources, run_training


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_ray_started_by_accident():
    import ray

    was_running = ray.is_initialized()
    yield
    if not was_running:
        assert not ray.is_initialized(), "a bad-input path started Ray"


def test_unknown_set_field_names_the_field_and_a_suggestion(capsys):
    assert main(["train", "--preset", "tiny", "--set", "lm_n_blokcs=4"]) == 2
    err = capsys.readouterr().err
    assert "lm_n_blokcs" in err and "did you mean 'lm_n_blocks'" in err


def test_impossible_shapes_name_the_fields_and_a_valid_choice(capsys):
    assert main(["train", "--preset", "tiny", "--set", "vit_img_size=64", "--set", "vit_patch_size=7"]) == 2
    err = capsys.readouterr().err
    assert "vit_img_size=64 is not divisible by vit_patch_size=7" in err


@pytest.mark.parametrize("workers", ["1", "2"])  # one process, Ray Train
def test_unreachable_tracking_uri_fails_before_training_or_ray_starts(monkeypatch, capsys, workers):
    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["train", "--preset", "tiny", "--num-workers", workers]) == 2
    err = capsys.readouterr().err
    assert uri in err and "unreachable" in err and len(err.strip().splitlines()) == 1


def test_gpu_flag_with_a_cpu_device_is_refused(capsys):
    assert main(["train", "--preset", "tiny", "--gpu", "--set", "device=cpu"]) == 2
    assert "use_gpu=True but device='cpu'" in capsys.readouterr().err


def test_resource_check_explains_how_many_workers_fit():
    _, train = preset("tiny", num_workers=3, cpus_per_worker=1.0)
    with pytest.raises(ClusterResourceError, match=r"needs 3 CPUs but the cluster has 2.*--num-workers 2"):
        check_cluster_resources(train, {"CPU": 2.0})


def test_resource_check_counts_one_gpu_per_worker():
    _, train = preset("tiny", num_workers=2, use_gpu=True)
    with pytest.raises(ClusterResourceError, match="needs 2 GPUs"):
        check_cluster_resources(train, {"CPU": 16.0, "GPU": 1.0})
    check_cluster_resources(train, {"CPU": 16.0, "GPU": 2.0})  # fits: no error


def test_resource_check_is_skipped_on_autoscaling_clusters(monkeypatch):
    monkeypatch.setenv("NANOVLM_AUTOSCALING", "1")
    _, train = preset("tiny", num_workers=64)
    check_cluster_resources(train, {"CPU": 2.0})


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_more_workers_than_the_cluster_has_cpus_fails_without_hanging(tmp_path):
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: socket paths are length-limited
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir)
    try:
        vlm, train = preset("tiny", num_workers=8, storage_path=str(tmp_path / "results"),
                            output_dir=str(tmp_path / "out"))
        with pytest.raises(ClusterResourceError, match="needs 8 CPUs but the cluster has 2"):
            run_training(vlm, train, track=False)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
