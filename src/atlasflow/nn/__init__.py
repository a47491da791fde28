"""Neural-network pieces of the deep registration engine: networks and losses."""

from .losses import (
    diffusion_loss,
    inverse_consistency_loss,
    lncc_loss,
    local_ncc,
    mse_loss,
    soft_dice_loss,
)
from .networks import AffineNet, KeypointAffineNet, NetConfig, RegistrationModel, VelocityUNet

__all__ = [
    "AffineNet",
    "KeypointAffineNet",
    "NetConfig",
    "RegistrationModel",
    "VelocityUNet",
    "diffusion_loss",
    "inverse_consistency_loss",
    "lncc_loss",
    "local_ncc",
    "mse_loss",
    "soft_dice_loss",
]
