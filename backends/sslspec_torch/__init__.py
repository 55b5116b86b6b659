"""PyTorch backend of sslspec, registered as the entry point ``torch``."""

from .backend import TorchBackend

__all__ = ["TorchBackend"]
