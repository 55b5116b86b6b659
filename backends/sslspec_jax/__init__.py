"""JAX backend for sslspec: Flax NNX networks, optax training and portable
checkpoints in the canonical PyTorch layout."""

from .backend import JaxBackend
from .networks import build_network, from_canonical, load_canonical, to_canonical

__all__ = [
    "JaxBackend",
    "build_network",
    "from_canonical",
    "load_canonical",
    "to_canonical",
]
