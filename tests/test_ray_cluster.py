"""What the project's own Ray clusters expose, DDP with a text-only rank, and a dead cluster's address.

One private cluster, started by `ensure_ray("local")` as every command starts one, runs three
things while a thread lists the listening sockets of this process and all its children: a
2-worker training run (`run_training`, the route of `nanovlm train --num-workers 2`) whose rank 0
sees only text-only rows, a one-trial sweep, and a benchmark grid point on Ray Tune. The training
run also answers the DDP question: the text-only rank must still take part in every gradient
all-reduce, and both ranks must follow one process trained on the global batch.

Last, a cluster started with `ray start` and killed leaves its address behind (its address
file, or RAY_ADDRESS): `nanovlm train --num-workers 2` must stop at once with one line.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from listeners import HAS_PROC_NET, ListenerWatch, not_loopback
from nanovlm import tracking
from nanovlm.config import preset
from nanovlm.distributed.cluster import free_loopback_port
from training_configs import tiny_sweep, train_on_global_batches

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
STEPS, BATCH, WORKERS = 4, 4, 2
ROWS = 32  # 16 per rank: rank 0 gets the even rows (text only), rank 1 the odd rows (one image each)

SWEEP = tiny_sweep("net", [0.001])
GRID = {
    "name": "net", "preset": "tiny", "overrides": {"lm_n_blocks": 1, "vit_n_blocks": 1},
    "grid": {"mp_pixel_shuffle_factor": [2]},
    "measure": {"inference": {"batch_size": 1, "prompt_tokens": 4, "new_tokens": 2}, "training": None,
                "warmup": 0, "repeats": 1},
    "resources": {"cpu": 1},
}


def write_text_only_on_rank0_dataset(path: Path) -> Path:
    """A saved DatasetDict of shapes rows: even train rows without their image, odd rows with it.
    Same questions throughout (2 supervised tokens each), so every rank's loss is a mean over
    the same number of tokens and the two ranks' mean is the loss of the global batch."""
    import datasets

    from nanovlm.data.shapes import ShapesRows

    img_size = preset("tiny")[0].vit_img_size
    features = datasets.Features({
        "images": datasets.List(datasets.Image()),
        "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string")}),
        "question_type": datasets.Value("string")})

    def rows(split, n, text_only_rows):
        shapes = ShapesRows(split, n, question_types="colour,shape", img_size=img_size)
        return [{"images": [] if i in text_only_rows else shapes[i]["images"], "texts": shapes[i]["texts"],
                 "question_type": shapes[i]["question_type"]} for i in range(n)]

    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(rows("train", ROWS, set(range(0, ROWS, 2))), features=features),
        "validation": datasets.Dataset.from_list(rows("validation", 8, set()), features=features),
    }).save_to_disk(str(path))
    return path


def configs(data: Path, tmp: Path):
    return preset("tiny", train_dataset_path=str(data), eval_samples=8, eval_interval=1000, batch_size=BATCH,
                  max_training_steps=STEPS, checkpoint_interval=STEPS, report_interval=2, log_interval=1,
                  num_workers=WORKERS, cpus_per_worker=0.5, storage_path=str(tmp / "ray_results"),
                  output_dir=str(tmp / "out"), experiment_name="text-only-rank", peak_flops=1e12)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_text_only_on_rank0_dataset(tmp_path_factory.mktemp("data") / "text_only_rank0")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Per-step losses, initial and final weights of one process trained on both ranks' batches at once."""
    from nanovlm.data import build_datasets, get_tokenizer

    vlm, train = configs(data, tmp_path_factory.mktemp("reference"))
    tokenizer = get_tokenizer(vlm.lm_tokenizer, vlm.vlm_extra_tokens, vlm.lm_chat_template)
    shards = [build_datasets(vlm, train, tokenizer, rank, WORKERS).train for rank in range(WORKERS)]
    images = [sum(len(shard[i]["images"]) for i in range(len(shard))) for shard in shards]
    assert images == [0, ROWS // 2]  # rank 0 text only, rank 1 one image per row
    return train_on_global_batches(vlm, train, WORKERS, STEPS)


@pytest.fixture(scope="module")
def runs(data, reference, tmp_path_factory):
    """The three workloads on one private cluster, and every listener seen while they ran."""
    import ray

    from nanovlm.bench.grid import parse_grid, run_grid
    from nanovlm.distributed import ensure_ray, run_training
    from nanovlm.sweep.runner import run_sweep
    from nanovlm.sweep.space import load_space

    root = tmp_path_factory.mktemp("cluster")
    store = f"sqlite:///{root / 'mlflow.db'}"
    tracking.check_tracking_store(store)
    saved = {k: os.environ.get(k) for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_API_SERVER_ADDRESS")}
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"  # cheap reports (see notes)
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: socket paths are length-limited
    watch = ListenerWatch().start()
    try:
        ensure_ray("local", num_cpus=2, temp_dir=temp_dir)
        vlm, train = configs(data, root / "train")
        training = run_training(vlm, train, run_name="text-only-rank", tracking_uri=store)
        (root / "space.yaml").write_text(yaml.safe_dump(SWEEP, sort_keys=False))
        sweep = run_sweep(load_space(root / "space.yaml"), storage_path=root / "sweeps", tracking_uri=store)
        grid = run_grid(parse_grid(GRID), root / "bench", executor="ray", tracking=False)
    finally:
        seen = watch.stop()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return SimpleNamespace(training=training, sweep=sweep, grid=grid, listeners=seen, store=store)


@pytest.mark.skipif(not HAS_PROC_NET, reason="reads Linux /proc")
def test_a_training_run_a_sweep_and_a_benchmark_grid_listen_on_loopback_only(runs):
    assert runs.training["steps"] == STEPS
    assert [r.status for r in runs.sweep.records] == ["completed"]
    assert [row["status"] for row in runs.grid.rows] == ["ok"]
    names = {name for _, _, _, name in runs.listeners}
    # the watch saw the workers of the runs, not just the cluster's own servers
    assert any(name.startswith("ray::RayTrainWorker") for name in names), names
    exposed = not_loopback(runs.listeners)
    assert exposed == [], "\n".join(exposed)


def test_ddp_with_a_text_only_rank_follows_one_process_on_the_global_batch(runs, reference):
    from nanovlm.models import VisionLanguageModel

    reference_losses, initial, final = reference
    history = tracking._client(runs.store).get_metric_history(runs.training["mlflow_run_id"], "loss")
    losses = {m.step: m.value for m in history}  # the mean over the two ranks at each step
    assert [losses[s] for s in range(1, STEPS + 1)] == pytest.approx(reference_losses, rel=1e-4, abs=1e-5)
    # Rank 0 saved the checkpoint and never saw an image: its ViT and projector moved only by the
    # gradients that rank 1's images sent through the all-reduce. Compared as updates: Adam turns
    # float rounding into a few elements off by a fraction of one step (lr).
    weights = VisionLanguageModel.from_pretrained(runs.training["ray_checkpoint"]).state_dict()
    assert weights.keys() == final.keys()
    for name in final:
        expected, moved = final[name] - initial[name], weights[name] - initial[name]
        assert float((moved - expected).norm()) <= 1e-3 * float(expected.norm()) + 1e-7, name
        if name.startswith(("vision_encoder.", "MP.")):
            assert float(moved.abs().max()) > 1e-4, f"{name} did not move on the text-only rank"


# ----------------------------------------------------------------------------- a dead cluster

@pytest.fixture(scope="module")
def dead_cluster(tmp_path_factory):
    """(GCS address, RAY_TMPDIR holding its address file) of a cluster started and then killed."""
    tmp = Path(tempfile.mkdtemp(prefix="rayd", dir="/tmp"))  # short: socket paths are length-limited
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": str(tmp)}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
         f"--port={free_loopback_port()}", "--include-dashboard=false", f"--temp-dir={tmp / 'ray'}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address_file = tmp / "ray" / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 120
        while not address_file.exists() or not address_file.read_text().strip():
            assert head.poll() is None and time.monotonic() < deadline, head.stdout.read()
            time.sleep(0.5)
        address = address_file.read_text().strip()
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the whole cluster dies at once; its address file stays
        head.wait()
    yield address, tmp
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("source", ["address file", "RAY_ADDRESS"])
def test_a_dead_cluster_address_fails_at_once_with_one_line(dead_cluster, source, tmp_path):
    address, ray_tmpdir = dead_cluster
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOVLM_HOME": str(tmp_path / "home"),
           "RAY_TMPDIR": str(ray_tmpdir)}
    env.pop("RAY_ADDRESS", None)
    if source == "RAY_ADDRESS":
        env.update(RAY_ADDRESS=address, RAY_TMPDIR=str(tmp_path))  # no address file there
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "nanovlm.cli", "train", "--preset", "tiny", "--num-workers", "2",
                           "--no-tracking", "--set", f"output_dir={tmp_path / 'out'}"],
                          env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert f"The Ray cluster at {address} (from " in lines[0] and "does not answer" in lines[0]
    assert ("ray start --head" in lines[0]) if source == "address file" else ("RAY_ADDRESS=local" in lines[0])
    assert elapsed < 30
