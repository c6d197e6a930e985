"""`nanovlm dashboard`: the MLflow UI on 127.0.0.1 over the store that training and sweeps log to.

    nanovlm dashboard                 # http://127.0.0.1:5000, the default SQLite store
    nanovlm dashboard --port 5001 --experiment sweep-test

Runs `mlflow server` in the foreground until Ctrl-C, and prints the address of the experiment's
runs (`/#/experiments/<id>/runs?workflowType=machine_learning`: the experiment is tagged as
model training, and the query switches MLflow's sidebar from its GenAI default to "Model
training", so the browser opens on the runs rather than the GenAI overview). Loopback only: to reach it from another
machine, forward the port (`ssh -L 5000:127.0.0.1:5000 host`) rather than opening it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from nanovlm import tracking
from nanovlm.config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    parser.add_argument("--backend-store-uri", default=None,
                        help="MLflow store to show (default: MLFLOW_TRACKING_URI, else the SQLite file "
                             "under $NANOVLM_HOME or ~/.nanovlm)")
    parser.add_argument("--experiment", default=TrainConfig.experiment_name, metavar="NAME",
                        help=f"the experiment whose runs to open (default {TrainConfig.experiment_name!r})")


def server_command(uri: str, port: int, host: str = "127.0.0.1", artifacts: Optional[str] = None) -> list[str]:
    """The `mlflow server` command line for a store URI. One worker: a single user on a laptop.
    `artifacts`: where the server puts the runs' artifacts (e.g. s3://bucket/mlflow); default,
    for a SQLite store, the folder next to its file."""
    command = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
               "--backend-store-uri", uri]
    artifacts = artifacts or tracking.artifact_root(uri)
    if artifacts is not None:  # keep uploads through the UI next to the runs' own artifacts
        command += ["--artifacts-destination", artifacts]
    return command


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    # MLflow 3 starts a job-execution service with several extra processes by default; the UI
    # does not need it, and without it /health answers in seconds on 2 cores.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def run(args: argparse.Namespace) -> int:
    uri = args.backend_store_uri or tracking.default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        print(f"The tracking store is already a server: open {tracking.masked_uri(uri)}")
        return 0
    db: Optional[Path] = tracking.sqlite_path(uri)
    if db is not None and not db.exists():
        print(f"Note: {db} does not exist yet; the dashboard will be empty until a run or sweep logs to it.")
    tracking.check_tracking_store(uri)  # creates the tables of a new SQLite store, names any problem
    command = server_command(uri, args.port)
    address = f"http://127.0.0.1:{args.port}"
    print(f"MLflow dashboard on {address}  (store: {tracking.masked_uri(uri)}); Ctrl-C to stop.")
    print(landing_page(uri, address, args.experiment), flush=True)
    # The server runs in its own process group so that stopping this command (Ctrl-C, or
    # SIGTERM from a supervisor or a test) stops the server and every worker it started.
    signal.signal(signal.SIGTERM, _interrupt)
    process = subprocess.Popen(command, env=server_env(), start_new_session=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, timeout_s: float = 10) -> None:
    """Stop a server started with `start_new_session=True` and every worker it started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class MlflowServer:
    """`mlflow server` over `uri` on 127.0.0.1:`port`, in the background: for tests and benchmarks
    that take a tracking server down and bring it back (`nanovlm dashboard` runs it in the foreground)."""

    def __init__(self, uri: str, port: int, artifacts: Optional[str] = None):
        self.command = server_command(uri, port, artifacts=artifacts)
        self.address = f"http://127.0.0.1:{port}"
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout_s: float = 120) -> None:
        """Start it and wait until it answers `/health`."""
        self.process = subprocess.Popen(self.command, env=server_env(), start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with status {self.process.returncode}: {self.command}")
            try:
                urllib.request.urlopen(f"{self.address}/health", timeout=2).close()
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"mlflow server on {self.address} did not answer within {timeout_s:.0f} s.")

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process, timeout_s=20)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def landing_page(uri: str, address: str, experiment_name: str) -> str:
    """Where to open the dashboard: the runs of `experiment_name` once it exists (tagged as model
    training on the way, for experiments created before that tag was set)."""
    experiment = tracking._client(uri).get_experiment_by_name(experiment_name)
    if experiment is None:
        return f"Open {address} (experiment {experiment_name!r} has no runs yet)."
    experiment_id = tracking.get_or_create_experiment(uri, experiment_name)
    return (f"Runs of experiment {experiment_name!r}: "
            f"{address}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
