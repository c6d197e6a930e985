"""What the project says and whom it waits for: tracking URIs are printed without their secrets,
and the address of a Ray cluster is checked before Ray is asked to join it (no cluster started here)."""

import socket
import time

import pytest

from nanovlm.distributed import ClusterResourceError, ClusterUnreachableError
from nanovlm.distributed.cluster import probe_cluster, resolve_address, split_address
from nanovlm.tracking import masked_uri


@pytest.mark.parametrize("uri, printed", [
    ("http://me:s3cret@mlflow.internal:5000", "http://me:***@mlflow.internal:5000"),
    ("https://ghp_token@host/mlflow", "https://***@host/mlflow"),
    ("postgresql://ml:pw@db:5432/mlflow?sslmode=require&password=pw",
     "postgresql://ml:***@db:5432/mlflow?sslmode=require&password=***"),
    ("http://host:5000/?Token=abc&experiment=1", "http://host:5000/?Token=***&experiment=1"),
    ("sqlite:////home/me/.nanovlm/mlflow.db", "sqlite:////home/me/.nanovlm/mlflow.db"),
    ("databricks", "databricks"),
])
def test_tracking_uris_are_printed_without_secrets(uri, printed):
    assert masked_uri(uri) == printed


def test_the_address_comes_from_the_flag_then_ray_address_then_the_address_file(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == (None, "no cluster running")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6379\n")
    address, source = resolve_address(None)
    assert address == "127.0.0.1:6379" and str(tmp_path / "ray" / "ray_current_cluster") in source
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert resolve_address(None) == ("10.0.0.5:6379", "the environment variable RAY_ADDRESS")
    assert resolve_address("10.0.0.6:6379") == ("10.0.0.6:6379", "--address")
    assert resolve_address("local")[0] is None
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert resolve_address(None)[0] is None


def test_a_dashboard_address_is_refused_with_what_to_give_instead():
    with pytest.raises(ClusterUnreachableError, match="dashboard address.*GCS address"):
        split_address("http://127.0.0.1:8265")
    assert split_address("ray://[::1]:10001") == ("::1", 10001)


def test_a_port_nothing_listens_on_is_refused_at_once():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ClusterUnreachableError, match=rf"127.0.0.1:{port} \(from --address\).*connection refused"):
        probe_cluster(f"127.0.0.1:{port}", "--address")
    assert time.monotonic() - start < 5


def test_a_cluster_that_accepts_but_never_answers_times_out():
    # a stopped GCS: the kernel still completes the TCP handshake, nothing answers after it
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(ClusterUnreachableError, match="did not answer within 2 s"):
            probe_cluster(f"127.0.0.1:{port}", "--address", timeout_s=2)
        assert time.monotonic() - start < 10


def test_an_unreachable_cluster_is_handled_as_a_cluster_error():
    assert issubclass(ClusterUnreachableError, ClusterResourceError)
