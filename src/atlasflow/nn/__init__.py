"""Neural-network pieces of the deep registration engine: networks, losses and model files."""

import torch

from atlasflow.nn.losses import (
    diffusion_loss,
    inverse_consistency_loss,
    lncc_loss,
    local_ncc,
    mse_loss,
    soft_dice_loss,
)
from atlasflow.nn.model_io import load_model, read_sidecar, save_model, sidecar_path
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
    "load_model",
    "local_ncc",
    "mse_loss",
    "read_sidecar",
    "save_model",
    "sidecar_path",
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
