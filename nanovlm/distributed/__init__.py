"""Ray Train: the worker function (`worker.py`) and the driver that builds and runs the
`TorchTrainer` (`launcher.py`). The training loop itself knows nothing of Ray."""

from nanovlm.distributed.launcher import (
    ClusterResourceError,
    build_trainer,
    can_resume,
    check_cluster_resources,
    ensure_ray,
    run_training,
)
from nanovlm.distributed.worker import RayTrainHooks, train_worker

__all__ = ["ClusterResourceError", "RayTrainHooks", "build_trainer", "can_resume", "check_cluster_resources",
           "ensure_ray", "run_training", "train_worker"]
