"""Ray Train: the worker function (`worker.py`), the driver that builds and runs the
`TorchTrainer` (`launcher.py`), how every command reaches Ray (`cluster.py`) and the
loopback rendezvous of single-node runs (`rendezvous.py`). The training loop knows nothing of Ray."""

from nanovlm.distributed.launcher import (
    ClusterResourceError,
    ClusterUnreachableError,
    build_trainer,
    can_resume,
    check_cluster_resources,
    run_training,
)
from nanovlm.distributed.cluster import ensure_ray
from nanovlm.distributed.worker import RayTrainHooks, train_worker

__all__ = ["ClusterResourceError", "ClusterUnreachableError", "RayTrainHooks", "build_trainer", "can_resume",
           "check_cluster_resources", "ensure_ray", "run_training", "train_worker"]
