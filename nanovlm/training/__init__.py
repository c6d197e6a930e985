"""The framework-free training loop and the hooks a wrapper (Ray Train, a test) plugs into."""

from nanovlm.training.hooks import TrainHooks
from nanovlm.training.loop import NonFiniteLossError, train

__all__ = ["train", "TrainHooks", "NonFiniteLossError"]
