"""Configuration of a pretraining run, shared by the driver and every backend."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .networks import METHODS, HeadSizes

__all__ = ["AugmentConfig", "PretrainConfig", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of the augmentations that make the two views.

    Images: random resized crop (area fraction in ``crop_scale``, aspect ratio in
    ``crop_ratio``), rotation by up to ``max_rotation_degrees``, translation by up to
    ``max_translation`` of the side, optional horizontal flip, additive Gaussian
    noise of standard deviation ``noise_std`` (in units of the data's scale), and
    random erasing of one rectangle with probability ``erase_probability`` (area
    fraction in ``erase_scale``, aspect ratio height over width in ``erase_ratio``).
    Feature vectors: Gaussian noise of ``feature_noise_std`` and masking of each
    feature with probability ``feature_mask_probability``.
    """

    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    max_rotation_degrees: float = 15.0
    max_translation: float = 0.1
    horizontal_flip: bool = False
    noise_std: float = 0.05
    erase_probability: float = 0.25
    erase_scale: tuple[float, float] = (0.02, 0.2)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    feature_noise_std: float = 0.1
    feature_mask_probability: float = 0.2


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that defines a pretraining run; saved as ``config.json``.

    ``total_steps`` and ``steps_per_epoch`` are filled in by the driver once the
    data is loaded. Method hyperparameters that do not apply to ``method`` are
    ignored.

    ``batch_size`` is the global batch. With ``nproc_per_node`` processes each one
    computes the forward and backward pass of ``batch_size // nproc_per_node``
    samples, and the run's losses and weights are those of one process on the
    whole batch, so ``batch_size`` must be a multiple of ``nproc_per_node``.
    """

    method: str = "simclr"
    backend: str = "torch"
    data: str = "digits"
    epochs: int = 100
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 5
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    nproc_per_node: int = 1
    steps_per_epoch: int = 0
    total_steps: int = 0
    # Method hyperparameters, named as the loss functions name them.
    temperature: float = 0.5
    base_momentum: float = 0.99
    final_momentum: float = 1.0
    lambda_param: float = 0.005
    invariance_weight: float = 25.0
    variance_weight: float = 25.0
    covariance_weight: float = 1.0
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    sizes: HeadSizes = field(default_factory=HeadSizes)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, "
                f"got {self.precision!r}"
            )
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        nproc = self.nproc_per_node
        if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
            raise ValueError(
                f"nproc_per_node must be a positive integer, got {nproc!r}"
            )
        if self.batch_size % nproc:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of nproc_per_node "
                f"{nproc}, because every process takes an equal share of each batch"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainConfig:
        """Rebuild a config from :meth:`to_dict` output (as read from JSON)."""
        values = dict(values)
        sizes = dict(values.pop("sizes", {}))
        for key in ("mlp_encoder_hidden", "conv_channels"):
            if key in sizes:
                sizes[key] = tuple(sizes[key])
        augment = dict(values.pop("augment", {}))
        for key, value in augment.items():
            if isinstance(value, list):
                augment[key] = tuple(value)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values, sizes=HeadSizes(**sizes), augment=AugmentConfig(**augment))

    def replace(self, **changes: Any) -> PretrainConfig:
        return dataclasses.replace(self, **changes)
