"""`nanovlm dashboard` serves the MLflow store on loopback, and its REST API shows a sweep's runs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nanovlm import tracking
from nanovlm.commands.dashboard import landing_page, server_command
from nanovlm.sweep.runner import SweepState, SweepTracker, _create_parent_run
from nanovlm.sweep.space import parse_space


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _log_a_sweep(sweep_dir: Path, uri: str) -> tuple[str, list[str]]:
    """The parent and two child runs exactly as `run_sweep` creates them (no Ray needed)."""
    spec = parse_space({"name": "dash", "preset": "tiny", "overrides": {"experiment_name": "dash-test"},
                        "space": {"lr_mp": {"choice": [0.001, 0.003]}}})
    sweep_dir.mkdir()
    state = SweepState(sweep_dir / "nanovlm_sweep.json", {"trials": {}})
    state.data["parent_run_id"] = _create_parent_run(spec, sweep_dir, uri, "dash-test")
    tracker = SweepTracker(spec, state, uri, "dash-test")
    children = [tracker._create_child_run(f"t{i}", {"lr_mp": lr}) for i, lr in enumerate([0.001, 0.003])]
    return state.data["parent_run_id"], children


def test_server_command_binds_loopback_with_one_worker():
    command = server_command("sqlite:////tmp/x/mlflow.db", 5001)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "5001"
    assert command[command.index("--workers") + 1] == "1"
    assert command[command.index("--artifacts-destination") + 1] == Path("/tmp/x/mlartifacts").as_uri()


def test_server_command_takes_an_artifacts_destination_on_object_storage():
    command = server_command("sqlite:////tmp/x/mlflow.db", 5001, artifacts="s3://bucket/mlflow")
    assert command[command.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    assert command.count("--artifacts-destination") == 1


def test_dashboard_opens_on_the_runs_of_the_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_tracking_store(uri)
    address = "http://127.0.0.1:5000"
    assert landing_page(uri, address, "dash-runs") == f"Open {address} (experiment 'dash-runs' has no runs yet)."
    client = tracking._client(uri)
    experiment_id = client.create_experiment("dash-runs")  # made before experiments were tagged
    assert landing_page(uri, address, "dash-runs").endswith(f"{address}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dashboard_serves_the_sweep_runs_over_rest(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "NANOVLM_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    tracking.check_tracking_store(uri)
    parent_id, child_ids = _log_a_sweep(tmp_path / "sweep", uri)

    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "nanovlm.cli", "dashboard", "--port", str(port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "the MLflow server did not answer /health within 90 s"
            time.sleep(0.5)

        experiments = _post(f"{base}/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
        experiment_id = next(e["experiment_id"] for e in experiments if e["name"] == "dash-test")
        runs = _post(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})["runs"]
        by_id = {r["info"]["run_id"]: r for r in runs}
        assert set(by_id) == {parent_id, *child_ids}
        for child in child_ids:
            tags = {t["key"]: t["value"] for t in by_id[child]["data"]["tags"]}
            params = {p["key"]: p["value"] for p in by_id[child]["data"]["params"]}
            assert tags["mlflow.parentRunId"] == parent_id and tags["mlflow.user"] and tags["mlflow.source.name"]
            assert params["lr_mp"] in ("0.001", "0.003") and "mp_pixel_shuffle_factor" in params
        # listening on loopback only
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        if listening:  # `ss` may be missing in minimal images
            assert all(line.split()[3].startswith("127.0.0.1:") for line in listening.strip().splitlines())
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/health", timeout=2)
