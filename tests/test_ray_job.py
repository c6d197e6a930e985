"""`ray job submit ... python jobs/train.py` against a local cluster this test starts, read back from MLflow.

The cluster listens on 127.0.0.1 only, uses token authentication with a token that lives only
in this test's environment, keeps its files in its own --temp-dir, and is stopped by signalling
the `ray start --block` process this test started (never `ray stop`, which would stop every Ray
on the machine).
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from listeners import HAS_PROC_NET, descendants, listeners, not_loopback
from nanovlm import tracking
from nanovlm.config import apply_overrides, configs_to_dict, preset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU head node on 127.0.0.1; yields (dashboard address, environment for the job CLI, pid)."""
    from nanovlm.data import get_tokenizer

    get_tokenizer("shapes-bpe-512", {"image_token": "<|image|>"})  # train + cache it once, before the workers

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: socket paths are length-limited
    dashboard_port = _free_port()
    env = {**os.environ,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",   # keeps listeners on 127.0.0.1 on Linux
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # SIGTERM: stop at once, nothing to drain
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
         f"--port={_free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(address, head, timeout_s=120)
        yield address, env, head.pid
    finally:
        head.send_signal(signal.SIGTERM)  # ray start --block tears down the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(address, head, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{head.stdout.read()}")
        if _answers(address):
            return
        time.sleep(1)
    raise TimeoutError(f"the dashboard at {address} did not come up within {timeout_s} s")


def _answers(address):
    """Any HTTP answer (an authentication error included) means the dashboard is up."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except Exception:  # noqa: BLE001 - not listening yet
        return False
    return True


@pytest.mark.skipif(not HAS_PROC_NET, reason="reads Linux /proc")
def test_cluster_listens_on_loopback_only(cluster):
    head_pid = cluster[2]
    seen = listeners(descendants(head_pid))
    assert seen and not_loopback(seen) == [], not_loopback(seen)


def test_submitted_job_is_tracked_in_mlflow(cluster, tmp_path):
    address, env, _ = cluster
    store = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    sets = ["max_training_steps=4", "batch_size=4", "shapes_train_size=64", "shapes_eval_size=8",
            "eval_samples=8", "eval_interval=1000", "checkpoint_interval=2", "report_interval=2",
            "log_interval=1", "peak_flops=1e12", "experiment_name=job-test",
            f"output_dir={tmp_path / 'out'}", f"storage_path={tmp_path / 'ray_results'}"]
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": store},
                   "excludes": [".gpu", "runs", "outputs"]}  # large local files that are not the project
    submission = f"nanovlm-test-{secrets.token_hex(4)}"
    command = [RAY, "job", "submit", "--address", address, "--submission-id", submission,
               "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
               sys.executable, "jobs/train.py", "--preset", "tiny", "--num-workers", "2", "--run-name", "job",
               *[arg for s in sets for arg in ("--set", s)]]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=360)
    logs = done.stdout + done.stderr
    assert done.returncode == 0 and f"Job '{submission}' succeeded" in logs, logs[-5000:]

    runs = list(tracking.iter_runs("job-test", store))
    assert len(runs) == 1
    run = runs[0]
    vlm, train = apply_overrides(*preset("tiny"), sets + ["num_workers=2"])
    assert run.data.params == tracking.flatten_config(configs_to_dict(vlm, train))
    assert run.data.tags["world_size"] == "2" and run.data.tags["preset"] == "tiny"
    assert run.info.status == "FINISHED"

    client = tracking._client(store)
    for key in ("loss", "tokens_per_second"):
        steps = {m.step for m in client.get_metric_history(run.info.run_id, key)}
        assert steps == {1, 2, 3, 4}, key

    local = client.download_artifacts(run.info.run_id, "checkpoint", str(tmp_path / "downloaded"))
    from nanovlm.models import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(local)
    assert model.cfg.to_dict() == vlm.to_dict()
    assert (Path(local) / "model.safetensors").exists()
