"""Neural-network pieces of the deep registration engine: networks and losses."""

import torch

from atlasflow.nn.losses import (
    diffusion_loss,
    inverse_consistency_loss,
    lncc_loss,
    local_ncc,
    mse_loss,
    soft_dice_loss,
)
from atlasflow.nn.networks import (
    AffineNet,
    KeypointAffineNet,
    NetConfig,
    RegistrationModel,
    VelocityUNet,
)

__all__ = [
    "deterministic_kernels",
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


def deterministic_kernels() -> None:
    """Ask torch for deterministic kernels, warning (not failing) where an operation has none.

    ``torch.use_deterministic_algorithms`` also sets a flag of the inductor compiler, and importing
    that compiler (with sympy) costs about 1.3 s per process here. atlasflow never compiles, so
    the kernel switch alone is set when this torch build exposes it.
    """
    switch = getattr(torch._C, "_set_deterministic_algorithms", None)
    if switch is None:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        switch(True, warn_only=True)
