"""torch.distributed's rendezvous kept on the loopback address when the workers' node is.

Ray Train's `TorchConfig` sets MASTER_ADDR to rank 0's node address and has every rank call
`init_process_group("env://")`; rank 0 then hosts torch's TCPStore. The TCPStore server binds to
every interface (`*:<port>`) whatever MASTER_ADDR says (torch 2.13, libuv and classic servers
alike), so even a cluster on 127.0.0.1 exposed one port per training run.

`LoopbackTorchConfig` changes one thing: when rank 0's node address is a loopback address (a
cluster started by `ensure_ray`), rank 0 first opens the store itself on a socket bound to that
address (`TCPStore(master_listen_fd=...)`, multi-tenant), and `init_process_group` then reuses
that server for the same port instead of opening its own. Gloo's own sockets are put on the
loopback interface too (GLOO_SOCKET_IFNAME), unless set already. Every other step is Ray's
(`_setup_torch_process_group`). On other nodes (a multi-node cluster) it is Ray's `TorchConfig`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import ray
from ray.train.torch import TorchConfig
from ray.train.torch import config as ray_torch_config

logger = logging.getLogger(__name__)

# Rank 0's listening socket and store: they must live as long as the process group does.
_HELD: list = []


@dataclass
class LoopbackTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


class _LoopbackTorchBackend(ray_torch_config._TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        address = None
        if backend_config.backend is not None and backend_config.init_method == "env":
            address = worker_group.execute_single(0, host_store_on_loopback, timeout_s=backend_config.timeout_s)
        if address is None:
            return super().on_start(worker_group, backend_config)
        host, port = address
        worker_group.execute(_use_loopback, host=host, port=port)
        if not isinstance(worker_group, ray_torch_config.V1WorkerGroup):
            worker_group.execute(ray_torch_config._set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(
            rank, ray_torch_config._setup_torch_process_group, backend=backend_config.backend, world_rank=rank,
            world_size=len(worker_group), init_method="env://", timeout_s=backend_config.timeout_s)
            for rank in range(len(worker_group))])


def host_store_on_loopback(timeout_s: float) -> Optional[tuple[str, int]]:
    """On rank 0: if this node's address is a loopback address, a TCPStore server listening there
    only; its (host, port). None elsewhere."""
    import torch.distributed as dist

    host = ray.util.get_node_ip_address()
    if not is_loopback(host):
        return None
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.bind((host, 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    store = dist.TCPStore(host, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                          multi_tenant=True, master_listen_fd=listener.fileno())
    _HELD.extend([listener, store])
    logger.debug("torch.distributed store on %s:%d", host, port)
    return host, port


def _use_loopback(host: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, str(port)
    interface = loopback_interface()
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def loopback_interface() -> Optional[str]:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS), or None."""
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)
