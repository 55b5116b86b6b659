"""sslspec: self-supervised learning losses written once against the Array API."""

from sslspec.barlow_twins import barlow_twins_loss
from sslspec.byol import byol_loss, ema_update, momentum_schedule
from sslspec.distributed import Collective
from sslspec.mae import (
    MaskResult,
    generate_mask,
    patchify,
    reconstruction_loss,
    unpatchify,
)
from sslspec.simclr import nt_xent_loss
from sslspec.vicreg import covariance_loss, invariance_loss, variance_loss, vicreg_loss

__all__ = [
    "Collective",
    "MaskResult",
    "barlow_twins_loss",
    "byol_loss",
    "covariance_loss",
    "ema_update",
    "generate_mask",
    "invariance_loss",
    "momentum_schedule",
    "nt_xent_loss",
    "patchify",
    "reconstruction_loss",
    "unpatchify",
    "variance_loss",
    "vicreg_loss",
]
