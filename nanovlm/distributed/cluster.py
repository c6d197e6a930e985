"""Reaching Ray: one function for every command, joining a cluster or starting one on 127.0.0.1.

`ensure_ray(address)` is how `nanovlm train --num-workers N`, `nanovlm sweep`, `nanovlm bench grid`
and the jobs/*.py scripts connect:

    address        where it was found                                   then
    "local"        --address local, or RAY_ADDRESS=local                start a private cluster
    "host:port"    --address                                            join it
    None           RAY_ADDRESS (set by Ray inside `ray job submit`)     join it
    None           $RAY_TMPDIR/ray/ray_current_cluster (default         join it
                   /tmp/ray/...), written by the last `ray start`
    None           none of these                                        start a private cluster

Ray's own `address="auto"` would also join any Ray process it sees on the machine (another
person's, a test's); here only these places count.

Joining: the address is probed first, a TCP connection and then one gRPC call that only Ray's
GCS serves, within `JOIN_TIMEOUT_S` in all. A cluster that died leaves its address behind (in
RAY_ADDRESS, or in the address file), and Ray's own connect then retries for minutes, printing GCS
time-outs; the probe turns that into one `ClusterUnreachableError` naming the address, where it
came from, and the fix.

Starting: every listener of the new cluster is on 127.0.0.1 (GCS, raylet, object manager,
dashboard and its agents, metrics, each worker's gRPC server), and so is torch.distributed's
rendezvous store of a training run on it (`nanovlm.distributed.rendezvous`). The cluster ends
with the process that started it. To serve other machines, start a cluster yourself
(`ray start --head ...`, cluster.yaml) and pass its address.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from nanovlm.distributed.launcher import ClusterUnreachableError

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 20.0            # the probe of an existing cluster, TCP and gRPC together
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"   # served by Ray's GCS (Ray 2.60)
LOOPBACK = "127.0.0.1"
# Ray decides a node's address when it starts: unless this is "0", Linux nodes take the machine's
# routable address even when told 127.0.0.1, and bind their listeners there (Ray 2.60).
RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
TRAIN_POLL_INTERVAL_S = "0.5"    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S in the clusters started here


def ensure_ray(address: Optional[str] = None, *, num_cpus: Optional[int] = None, num_gpus: Optional[int] = None,
               include_dashboard: bool = True, temp_dir: Optional[str] = None) -> None:
    """Connect this process to Ray (see the module docstring); nothing if it already is.

    A cluster started here keeps its dashboard on a free loopback port unless
    include_dashboard=False: Train's and Tune's placement-group cleaner reaches the state API
    through it, and without it the workers of a trial that ASHA stops are never freed.
    num_cpus, num_gpus (None: what the machine has) and temp_dir apply to a cluster started here only."""
    import ray

    if ray.is_initialized():
        return
    address, source = resolve_address(address)
    if address is None:
        start_local_ray(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard, temp_dir=temp_dir)
        return
    probe_cluster(address, source)
    ray.init(address=address, log_to_driver=True)
    logger.info("Connected to the Ray cluster at %s (%s).", address, source)


def resolve_address(address: Optional[str] = None) -> tuple[Optional[str], str]:
    """(the cluster's address or None to start a private one, where the address came from)."""
    if address == "local":
        return None, "--address local"
    if address and address != "auto":
        return address, "--address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env == "local":
        return None, "RAY_ADDRESS=local"
    if env and env != "auto":
        return env, "the environment variable RAY_ADDRESS"
    path = address_file()
    try:
        recorded = path.read_text().strip()
    except OSError:
        recorded = ""
    if recorded:
        return recorded, f"the address file {path} that the last `ray start` on this machine wrote"
    return None, "no cluster running"


def address_file() -> Path:
    """Where `ray start` records the latest cluster: $RAY_TMPDIR/ray, else $TMPDIR/ray, else /tmp/ray."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


# ==================================================================== joining

def probe_cluster(address: str, source: str, timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """Raise `ClusterUnreachableError` unless a Ray cluster answers at `address` within `timeout_s`.

    First a TCP connection (a dead cluster: refused at once), then one gRPC call that only Ray's
    GCS serves, GetClusterId: a stopped process still accepts connections (the kernel does), and
    another server may own the port now. Ray's token authentication refusing the anonymous call
    still proves a GCS. A Ray Client address (ray://) gets the gRPC handshake only."""
    host, port = split_address(address, source)
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterUnreachableError(_unreachable(address, source, _reason(exc, timeout_s))) from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # gRPC would need the cluster's certificates
    import grpc

    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    remaining = max(deadline - time.monotonic(), 1.0)
    try:
        if address.startswith("ray://"):
            grpc.channel_ready_future(channel).result(timeout=remaining)
            return
        get_cluster_id = channel.unary_unary(GCS_PROBE_METHOD, request_serializer=lambda _: b"",
                                             response_deserializer=lambda reply: reply)
        get_cluster_id(None, timeout=remaining)
    except grpc.FutureTimeoutError:
        raise ClusterUnreachableError(_unreachable(
            address, source, f"it accepts connections but did not answer within {timeout_s:g} s")) from None
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return
        reason = (f"it accepts connections but did not answer within {timeout_s:g} s"
                  if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
                  else f"what answers there is not a Ray cluster ({code.name}: {exc.details()})")
        raise ClusterUnreachableError(_unreachable(address, source, reason)) from None
    finally:
        channel.close()


def split_address(address: str, source: str = "--address") -> tuple[str, int]:
    """("host", port) of "host:port", "[v6]:port" or "ray://host:port"."""
    scheme, _, rest = address.rpartition("://")
    if scheme in ("http", "https"):
        raise ClusterUnreachableError(
            f"Ray address {address} (from {source}) is a dashboard address, which `ray job submit` takes; "
            "a command joins a cluster by its GCS address (host:6379, printed by `ray start --head`). Submit "
            "the command as a job (docs/ray.md) or give the GCS address.")
    rest = rest.rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterUnreachableError(f"Ray address {address!r} (from {source}) is not host:port. Give the "
                                      "address that `ray start --head` printed, e.g. 127.0.0.1:6379.")
    return host.strip("[]"), int(port)


def _reason(exc: OSError, timeout_s: float) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused, nothing listens there"
    if isinstance(exc, socket.timeout):
        return f"no answer within {timeout_s:g} s"
    return exc.strerror or type(exc).__name__


def _unreachable(address: str, source: str, reason: str) -> str:
    fixes = {
        "--address": "Pass the address of a running cluster, or --address local for a private one",
        "the environment variable RAY_ADDRESS": ("Point RAY_ADDRESS at a running cluster, unset it, or set "
                                                 "RAY_ADDRESS=local for a private cluster"),
    }
    fix = fixes.get(source, f"Start it again (`ray start --head ...`), forget it (rm {address_file()}; `ray stop` "
                            "also does this but stops every Ray process of yours), or use a private cluster "
                            "(RAY_ADDRESS=local, or `nanovlm sweep --address local`)")
    return f"The Ray cluster at {address} (from {source}) does not answer: {reason}. {fix}."


# ==================================================================== starting

def start_local_ray(num_cpus: Optional[int] = None, num_gpus: Optional[int] = None, include_dashboard: bool = True,
                    temp_dir: Optional[str] = None) -> None:
    """A private Ray cluster on 127.0.0.1, owned by this process.

    The dashboard gets a known port and every Ray process inherits its address
    (RAY_API_SERVER_ADDRESS): Train's placement-group cleaner finds the state API from its
    environment and, with several clusters on the machine (CI, a shared box), gives up otherwise."""
    import ray

    # Train's controller reads each worker's report when it polls (every 2 s by default); a faster
    # poll keeps what Tune and the controller see fresh. Ray's processes inherit the environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_INTERVAL_S)
    kwargs: dict[str, Any] = {"_temp_dir": temp_dir} if temp_dir else {}
    if include_dashboard:
        port = free_loopback_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{LOOPBACK}:{port}"
        kwargs.update(dashboard_host=LOOPBACK, dashboard_port=port)
    with _loopback_nodes():
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                 _node_ip_address=LOOPBACK, **kwargs)
    logger.info("Started a private Ray cluster on %s%s.", LOOPBACK,
                f" (dashboard http://{LOOPBACK}:{kwargs['dashboard_port']})" if include_dashboard else "")


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _loopback_nodes() -> Iterator[None]:
    """Ray nodes started inside this block take 127.0.0.1 as their address.

    The processes it starts read RAY_CLUSTER_ENV from their environment; this process read it
    when it imported Ray, so Ray's constant is set here too, and restored afterwards: a later
    join of a multi-node cluster from this process must find the machine's real address."""
    from ray._private import ray_constants

    saved_env, saved_constant = os.environ.get(RAY_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(RAY_CLUSTER_ENV, None)
        else:
            os.environ[RAY_CLUSTER_ENV] = saved_env
