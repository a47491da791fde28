"""A contrast in the workflow's other spaces, resampled once from its own grid.

A contrast's session alignment ``R`` (T1w world -> contrast world) and its T1w's transform into a
space (``x_T1w = A (x + u(x))`` for a point ``x`` of the space: template, atlas or the baseline)
compose into one pull-back ``x_contrast = (R A)(x + u(x))``: the contrast is interpolated once,
from the normalised image on its own grid (:mod:`atlasflow.contrasts.session`), whatever the
number of transforms between it and the space.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Image, load_image, save_image
from atlasflow.io.itk import load_transform, read_itk_affine
from atlasflow.transforms import Transform, apply_transform


def compose(session_affine: np.ndarray, to_space: Transform) -> Transform:
    """The pull-back from a space straight to a contrast's grid: the T1w's transform into the
    space followed by the session alignment."""
    return Transform(session_affine @ to_space.affine, to_space.displacement)


def contrast_in_space(contrast: Image, session_affine: np.ndarray, to_space: Transform, grid_of: Image) -> Image:
    """The contrast on the grid of ``grid_of`` through :func:`compose` (linear interpolation)."""
    return apply_transform(contrast, compose(session_affine, to_space), grid_of.grid, "linear")


def run_warp(
    contrast_path: str | Path,
    session_affine_path: str | Path,
    space_affine_path: str | Path,
    space_warp_path: str | Path | None,
    fixed_path: str | Path,
    out_path: str | Path,
) -> Image:
    """Write a contrast (its normalised own-grid image) on a space's grid."""
    contrast = load_image(contrast_path)
    out = contrast_in_space(
        contrast,
        read_itk_affine(session_affine_path),
        load_transform(space_affine_path, space_warp_path),
        load_image(fixed_path),
    )
    save_image(out, out_path, dtype=np.float32)
    return out


def run_change(
    followup_path: str | Path,
    followup_session_affine: str | Path,
    baseline_affine: str | Path,
    baseline_warp: str | Path | None,
    baseline_contrast_path: str | Path,
    out_warped: str | Path,
    out_difference: str | Path,
) -> Image:
    """A follow-up's contrast in its baseline's space and its difference to the baseline's own
    contrast there (follow-up minus baseline; zero where either lies outside its brain)."""
    baseline = load_image(baseline_contrast_path)
    warped = contrast_in_space(
        load_image(followup_path),
        read_itk_affine(followup_session_affine),
        load_transform(baseline_affine, baseline_warp),
        baseline,
    )
    both = (warped.data > 0) & (baseline.data > 0)
    difference = np.where(both, warped.data - baseline.data, 0.0).astype(np.float32)
    save_image(warped, out_warped, dtype=np.float32)
    out = baseline.with_data(difference)
    save_image(out, out_difference, dtype=np.float32)
    return out


def run_average(paths: Sequence[str | Path], out_path: str | Path) -> Image:
    """The atlas of one contrast: the voxel-wise mean of the members' contrast images in atlas
    space (already warped through each member's final atlas transform)."""
    if not paths:
        raise AtlasflowError("no member has this contrast: nothing to average")
    first = load_image(paths[0])
    total = np.zeros(first.data.shape, np.float64)
    for path in paths:
        image = load_image(path)
        if not image.grid.same_as(first.grid):
            raise AtlasflowError(f"{path}: not on the atlas grid of {paths[0]}")
        total += image.data
    out = first.with_data((total / len(paths)).astype(np.float32))
    save_image(out, out_path, dtype=np.float32)
    return out
