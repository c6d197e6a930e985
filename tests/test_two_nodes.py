"""A 2-worker run across Ray nodes that share nothing but an `s3://` storage URI, one of them stopped
mid-run (node loss): the run resumes on a replacement node from the checkpoint in the bucket and
completes, and MLflow holds every step exactly once.

Four Ray nodes on this machine, each a `ray start --block` process this test started (its own
--temp-dir and loopback address, token authentication with a token only this test knows), stopped
by signalling those processes only (never `ray stop`):

    head     the GCS, the dashboard, Train's controller; no `slot`, so no training worker
    b, c     one `slot` each: a worker asks for `worker_resources=slot=1`, so the two workers land
             on different nodes
    d        started once the node holding rank 0 is gone: the replacement an autoscaler would add

The moto S3 server (tests/s3_server.py) holds checkpoints, the run state and the summary. Rank 0's
node is SIGKILLed (all its processes at once) once rank 0 has journalled step KILL_AFTER and a
checkpoint is in the bucket; its output_dir is then deleted, as that node's disk is gone with it.
Run under `flock /tmp/nanovlm-ray.lock`.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from listeners import HAS_PROC_NET, descendants
from ray._private.authentication_test_utils import reset_auth_token_state
from nanovlm import storage, tracking
from nanovlm.distributed.cluster import RAY_CLUSTER_ENV
from s3_server import s3_server
from training_configs import tiny_configs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.skipif(not HAS_PROC_NET, reason="finds rank 0's node through Linux /proc")]

RAY = str(Path(sys.executable).parent / "ray")
BUCKET, RUNS, NAME = "nanovlm", "s3://nanovlm/runs", "two-nodes"
STEPS, CHECKPOINT_INTERVAL, KILL_AFTER = 24, 4, 6
# Each node on a loopback address of its own. Not 127.0.0.1: with multi-node clusters enabled
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, without which `ray start --address` refuses to join) Ray
# replaces "127.0.0.1" and "localhost" by the machine's routable address; other 127.x addresses
# are kept, and Linux routes all of 127.0.0.0/8 to the loopback interface.
ADDRESSES = {"head": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4", "d": "127.0.0.5"}


def _free_port() -> int:
    from nanovlm.distributed.cluster import free_loopback_port

    return free_loopback_port()


class Node:
    """One `ray start --block` process and the Ray processes it started (one process group)."""

    def __init__(self, name: str, env: dict[str, str], *args: str):
        self.name = name
        self.temp_dir = tempfile.mkdtemp(prefix=f"ray{name}", dir="/tmp")  # short: socket paths are length-limited
        self.log = open(Path(self.temp_dir, "ray-start.log"), "w")
        self.process = subprocess.Popen(
            [RAY, "start", "--block", f"--node-ip-address={ADDRESSES[name]}", f"--temp-dir={self.temp_dir}",
             f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats", *args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def pids(self) -> set[int]:
        return {self.process.pid} | descendants(self.process.pid)

    def kill(self) -> None:
        """SIGKILL to every process of the node at once: a machine lost, nothing shut down cleanly.
        (Ray's workers may be in process groups of their own: each is signalled too.)"""
        pids = self.pids()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started

    def stop(self) -> None:
        self.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _worker_node(name: str, env: dict[str, str], port: int) -> Node:
    """A node with one `slot`, joining the head."""
    return Node(name, env, f"--address={ADDRESSES['head']}:{port}", "--num-cpus=1", '--resources={"slot": 1}')


def _wait_for_gcs(address: str, head: Node, timeout_s: float = 90) -> None:
    from nanovlm.distributed.cluster import probe_cluster
    from nanovlm.distributed.launcher import ClusterUnreachableError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            probe_cluster(address, "the test's head node", timeout_s=2)
            return
        except ClusterUnreachableError:
            if head.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the head node did not start: "
                                   + Path(head.temp_dir, "ray-start.log").read_text()) from None
            time.sleep(0.5)


def _wait_for_nodes(count: int, timeout_s: float = 90) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while sum(node["Alive"] for node in ray.nodes()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} Ray nodes did not come up within {timeout_s} s")
        time.sleep(0.5)


@contextlib.contextmanager
def _ray_auth_from_environment():
    """Ray reads its authentication settings once per process: read them again on the way out
    (and in, after RAY_AUTH_MODE/RAY_AUTH_TOKEN change), so that later tests see their own."""
    try:
        yield
    finally:
        reset_auth_token_state()


@pytest.fixture(scope="module")
def nodes():
    """The S3 server, the head node joined by this process, and nodes b and c; yields
    (environment, {name: Node})."""
    import ray

    from nanovlm.data import get_tokenizer

    get_tokenizer("shapes-bpe-512", {"image_token": "<|image|>"})  # train + cache it once, before the workers
    started: dict[str, Node] = {}
    with _ray_auth_from_environment(), s3_server(BUCKET) as s3_env, pytest.MonkeyPatch.context() as patch:
        dashboard = _free_port()
        patch.setenv("RAY_API_SERVER_ADDRESS", f"http://{ADDRESSES['head']}:{dashboard}")  # Train's cleaner finds the head
        patch.delenv("RAY_ADDRESS", raising=False)
        # a token that lives only in this test's environment: the nodes and this driver share it
        patch.setenv("RAY_AUTH_MODE", "token")
        patch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        reset_auth_token_state()  # this process read RAY_AUTH_MODE when it imported Ray
        env = {**os.environ, **s3_env,
               RAY_CLUSTER_ENV: "1",
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",   # SIGTERM: stop at once, nothing to drain
               # the GCS declares a silent node dead after ~1.5 s instead of ~30 s
               "RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
               "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "0"}
        port = _free_port()
        try:
            started["head"] = Node("head", env, "--head", "--num-cpus=1", f"--port={port}",
                                   f"--dashboard-host={ADDRESSES['head']}", f"--dashboard-port={dashboard}",
                                   f"--ray-client-server-port={_free_port()}")
            _wait_for_gcs(f"{ADDRESSES['head']}:{port}", started["head"])
            for name in ("b", "c"):
                started[name] = _worker_node(name, env, port)
            # the driver attaches to the head's raylet (by its temp dir), which is never stopped
            ray.init(address=f"{ADDRESSES['head']}:{port}", _node_ip_address=ADDRESSES["head"],
                     _temp_dir=started["head"].temp_dir,
                     log_to_driver=False)
            _wait_for_nodes(3)
            yield env, started, port
        finally:
            ray.shutdown()
            for node in started.values():
                node.terminate()
            for node in started.values():
                node.stop()


def _journalled_steps(journal: Path) -> list[int]:
    try:
        lines = (journal / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss"' in line]


def _stop_rank0_node(env, started, port, output_dir: Path, seen: dict) -> None:
    """Once rank 0 journalled step KILL_AFTER with a checkpoint in the bucket: the nodes of the two
    workers, then SIGKILL rank 0's node, delete its output_dir, and start node d."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        state = storage.read_json(f"{RUNS}/{NAME}/nanovlm_run.json")
        if state and storage.exists(f"{RUNS}/{NAME}/checkpoint_manager_snapshot.json"):
            journal = output_dir / "mlflow_journal" / state["mlflow_run_id"]
            if max(_journalled_steps(journal), default=0) >= KILL_AFTER:
                break
        time.sleep(0.1)
    else:
        seen["error"] = "the run never reached the kill point"
        return
    rank0_pid = int((journal / "lock").read_text().split()[0])
    victim = next(name for name in ("b", "c") if rank0_pid in started[name].pids())
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
    seen.update(victim=victim, killed_at=max(_journalled_steps(journal)),
                worker_nodes={w.node_id for w in workers}, head_node=_head_node_id())
    started[victim].kill()
    shutil.rmtree(output_dir, ignore_errors=True)  # that node's disk: rank 0's checkpoints and journal
    started["d"] = _worker_node("d", env, port)


def _head_node_id() -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "slot" not in n["Resources"])


@pytest.fixture(scope="module")
def run(nodes, tmp_path_factory):
    from nanovlm.distributed import run_training

    env, started, port = nodes
    tmp = tmp_path_factory.mktemp("two-nodes")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    tracking.check_tracking_store(store)
    vlm, train = tiny_configs(tmp / "out", max_training_steps=STEPS, checkpoint_interval=CHECKPOINT_INTERVAL,
                              log_interval=1, report_interval=2, num_workers=2, cpus_per_worker=0.5,
                              worker_resources="slot=1", max_failures=1, storage_path=RUNS,
                              experiment_name="two-nodes")
    seen: dict = {}
    killer = threading.Thread(target=_stop_rank0_node, args=(env, started, port, tmp / "out", seen), daemon=True)
    killer.start()
    summary = run_training(vlm, train, preset_name="tiny", run_name=NAME, tracking_uri=store)
    killer.join(timeout=5)
    return summary, seen, store


def test_the_two_workers_ran_on_two_nodes_other_than_the_head(run):
    _, seen, _ = run
    assert "error" not in seen, seen.get("error")
    assert len(seen["worker_nodes"]) == 2 and seen["head_node"] not in seen["worker_nodes"]


def test_a_run_whose_rank0_node_is_lost_resumes_from_the_bucket_and_completes(run):
    summary, seen, _ = run
    assert seen["killed_at"] >= KILL_AFTER
    assert summary["steps"] == STEPS
    # the restarted group resumed from a checkpoint it downloaded from the bucket, not from step 0
    assert "nanovlm-resume-" in summary["resumed_from"]
    resumed_at = STEPS - summary["steps_this_run"]
    assert resumed_at % CHECKPOINT_INTERVAL == 0 and CHECKPOINT_INTERVAL <= resumed_at <= seen["killed_at"]
    assert storage.read_json(f"{RUNS}/{NAME}/nanovlm_summary.json")["steps"] == STEPS


def test_mlflow_counts_every_step_once(run):
    summary, _, store = run
    client = tracking._client(store)
    steps = sorted(m.step for m in client.get_metric_history(summary["mlflow_run_id"], "loss"))
    assert steps == list(range(1, STEPS + 1))
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
