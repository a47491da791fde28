"""Random smooth fields and random deformations of the demo cohort (numpy, world millimetres).

Owns :func:`smooth_field` (random plane waves: the subjects' velocity fields, the scanner's bias
fields, the tumour's texture), :func:`random_affine` and the random diffeomorphism of a subject
(:func:`random_velocity`, integrated and inverted by :func:`exp_velocity`).

Training draws its own fields (:mod:`atlasflow.training.pairs`, torch): a different algorithm
(coarse Gaussian noise upsampled in voxels) from a torch stream, so neither the demo cohort's bytes
nor the training pairs of a seed change by keeping the two apart.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from atlasflow.io.images import Grid, Image
from atlasflow.nn.layers import integrate_velocity, warp_tensor
from atlasflow.transforms import (
    Transform,
    apply_transform,
    displacement_vox_to_world,
    displacement_world_to_vox,
    rotation_matrix,
)


def smooth_field(
    rng: np.random.Generator,
    grid: Grid,
    n_components: int,
    wavelength_mm: tuple[float, float],
    rms: float,
    n_modes: int = 12,
) -> np.ndarray:
    """A smooth random field on ``grid`` (X, Y, Z, n_components): random plane waves in world mm.

    The waves live in world millimetres, so a seed gives the same field on any grid. A plane wave
    is separable along the grid axes (``omega . x = (M^T omega) . ijk + omega . t`` for the grid's
    affine ``x = M ijk + t``), so each costs one outer product instead of a cosine per voxel.
    """
    directions = rng.standard_normal((n_components, n_modes, 3))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    wavelengths = rng.uniform(*wavelength_mm, (n_components, n_modes))
    omega = directions * (2 * np.pi / wavelengths)[..., None]
    phase = rng.uniform(0, 2 * np.pi, (n_components, n_modes))
    amplitude = rng.standard_normal((n_components, n_modes)) * rms * math.sqrt(2.0 / n_modes)
    linear, offset = grid.affine[:3, :3], grid.affine[:3, 3]
    axes = [np.arange(n, dtype=np.float64) for n in grid.shape]
    out = np.zeros(tuple(grid.shape) + (n_components,), np.float32)
    for c in range(n_components):
        for k in range(n_modes):
            freq = linear.T @ omega[c, k]
            waves = [
                np.exp(1j * f * a).astype(np.complex64) for f, a in zip(freq, axes, strict=True)
            ]
            start = amplitude[c, k] * np.exp(1j * (omega[c, k] @ offset + phase[c, k]))
            term = (
                np.complex64(start)
                * waves[0][:, None, None]
                * waves[1][None, :, None]
                * waves[2][None, None, :]
            )
            out[..., c] += term.real
    return out


def random_affine(
    rng: np.random.Generator,
    centre: np.ndarray,
    max_rotation_deg: float,
    scale_range: tuple[float, float],
    max_shift_mm: float,
) -> tuple[np.ndarray, dict]:
    """Rotation (about x, y, z), per-axis scaling and translation about ``centre``, as a 4x4."""
    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    scales = rng.uniform(*scale_range, 3)
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    linear = rotation_matrix(np.deg2rad(angles)) @ np.diag(scales)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre + shift - linear @ centre
    params = {
        "rotation_deg": angles.tolist(),
        "scale": scales.tolist(),
        "translation_mm": shift.tolist(),
    }
    return affine, params


def _to_tensor(disp_world: np.ndarray, grid: Grid) -> torch.Tensor:
    vox = displacement_world_to_vox(disp_world, grid).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(vox.transpose(3, 0, 1, 2)))[None]


def _to_world(disp_vox: torch.Tensor, grid: Grid) -> np.ndarray:
    vox = disp_vox[0].permute(1, 2, 3, 0).numpy().astype(np.float64)
    return displacement_vox_to_world(vox, grid).astype(np.float32)


def _invert_small(
    forward: torch.Tensor, initial: torch.Tensor, iterations: int = 4
) -> torch.Tensor:
    """Refine the inverse of ``x -> x + f(x)`` by the fixed point ``g(z) = -f(z + g(z))``.

    Converges where the displacement gradient of ``f`` is well below one, as for the random
    inter-subject warps (the tumour flow needs no refinement: it is inverted exactly).
    """
    inverse = initial
    for _ in range(iterations):
        inverse = -warp_tensor(forward, inverse)
    return inverse


def coarse_grid(grid: Grid) -> tuple[Grid, int]:
    """The ~4 mm grid the subjects' smooth velocity fields are drawn and integrated on."""
    factor = max(1, round(4.0 / float(grid.spacing[0])))
    coarse_affine = grid.affine @ np.diag([factor, factor, factor, 1.0])
    return Grid(
        tuple(int(np.ceil((n - 1) / factor)) + 1 for n in grid.shape), coarse_affine
    ), factor


def random_velocity(rng: np.random.Generator, grid: Grid) -> np.ndarray:
    """A smooth random stationary velocity field (world mm) on the coarse grid of ``grid``."""
    return smooth_field(rng, coarse_grid(grid)[0], 3, (40.0, 110.0), 2.0)


def exp_velocity(velocity_world: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """exp(velocity) on ``grid``: forward u and refined inverse w (world mm).

    ``velocity_world`` lies on ``coarse_grid(grid)``: the field is smooth (wavelengths >= 40 mm),
    so it is integrated on a grid of about 4 mm and interpolated onto ``grid``: the same
    diffeomorphism, 8 times cheaper at 2 mm.
    """
    coarse, factor = coarse_grid(grid)
    velocity = _to_tensor(velocity_world, coarse)
    forward = integrate_velocity(velocity)
    inverse = _invert_small(forward, integrate_velocity(-velocity))
    fields = []
    for disp in (forward, inverse):
        world = Image(_to_world(disp, coarse), coarse.affine)
        fields.append(
            world.data if factor == 1 else apply_transform(world, Transform.identity(), grid).data
        )
    return fields[0], fields[1]
