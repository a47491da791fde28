"""Spatial layers on torch tensors in voxel units: warping, composing, integrating and resizing
displacement fields (channel order i, j, k of the fixed grid).

Shared by the networks, the instance optimiser, the synthetic-pair generator and the atlas shape
update; world-space transforms and their files are :mod:`atlasflow.transforms` and
:mod:`atlasflow.io.itk`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def identity_grid(shape: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Voxel index grid of shape (1, 3, X, Y, Z)."""
    axes = [torch.arange(s, dtype=torch.float32, device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


@functools.lru_cache(maxsize=8)
def _normalised_identity(
    shape: tuple[int, int, int], src_shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``grid_sample``'s coordinates of every voxel of ``shape`` in a source of ``src_shape``:
    (1, X, Y, Z, 3), last axis (k, j, i) scaled to [-1, 1]. Never modified (it is shared)."""
    scale = torch.tensor([max(s - 1, 1) for s in src_shape], dtype=dtype, device=device)
    base = 2.0 * identity_grid(shape, device).to(dtype) / scale.view(1, 3, 1, 1, 1) - 1.0
    return base.permute(0, 2, 3, 4, 1).flip(-1).contiguous()


def warp_tensor(
    src: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border"
) -> torch.Tensor:
    """Sample ``src`` (B, C, X, Y, Z) at ``identity + disp`` (B, 3, X, Y, Z, voxel units)."""
    shape = tuple(disp.shape[2:])
    src_shape = tuple(src.shape[2:])
    base = _normalised_identity(shape, src_shape, disp.device, disp.dtype)
    # The identity's part is cached; only the displacement is scaled, written straight into
    # grid_sample's (k, j, i)-last layout (no flipped copy of the whole grid per call).
    grid = torch.stack([disp[:, axis] * (2.0 / max(src_shape[axis] - 1, 1)) for axis in (2, 1, 0)], -1)
    return F.grid_sample(src, grid.add_(base), mode=mode, padding_mode=padding_mode, align_corners=True)


def compose_displacements(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Displacement of ``x -> y + second(y)`` with ``y = x + first(x)``."""
    return first + warp_tensor(second, first)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Exponential of a stationary velocity field by scaling and squaring (voxel units)."""
    disp = velocity / (2**steps)
    for _ in range(steps):
        disp = disp + warp_tensor(disp, disp)
    return disp


def resize_displacement(disp: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resample a voxel-unit displacement field to another grid covering the same extent."""
    if tuple(disp.shape[2:]) == tuple(shape):
        return disp
    scale = torch.tensor(
        [(n - 1) / max(o - 1, 1) for n, o in zip(shape, disp.shape[2:], strict=True)],
        dtype=disp.dtype,
        device=disp.device,
    )
    up = F.interpolate(disp, size=tuple(shape), mode="trilinear", align_corners=True)
    return up * scale.view(1, 3, 1, 1, 1)
