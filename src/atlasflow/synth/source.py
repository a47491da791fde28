"""The material every demo subject is made from: nilearn's MNI152 2009 brain at 1 mm.

Owns reading the skull-stripped T1, its grey- and white-matter probability maps and brain mask
(package data of nilearn, no download), preparing them once per demo spacing (:func:`load_source`,
and :func:`load_tissue_channels` for the other contrasts, which are made from the tissue maps) and
resampling T1 and tissue labels through a transform (:func:`resample_source`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from atlasflow.io.images import Grid, Image
from atlasflow.preprocess.reference import template_grid
from atlasflow.transforms import Transform, apply_transform


@dataclass
class Source:
    """The nilearn material at 1 mm, cropped to the brain."""

    # (X, Y, Z, 5): the MNI T1 pre-smoothed for the demo spacing, then the probabilities of
    # background, CSF, GM and WM; all are resampled together, labels are the most probable class.
    channels: Image
    brain_box: tuple[np.ndarray, np.ndarray]  # world corners (min, max) of the brain mask
    wm_level: float  # median T1 value in white matter
    tumour_seeds: np.ndarray  # world points deep in white matter, where a lesion may start
    template_grid: Grid


def antialias_sigma_mm(spacing_mm: float) -> float:
    """Gaussian sigma (mm) whose FWHM makes up the difference between 1 mm and the demo voxel."""
    return math.sqrt(max(spacing_mm**2 - 1.0, 0.0)) / 2.3548


@functools.lru_cache(maxsize=2)
def load_source(spacing_mm: float) -> Source:
    """Read and prepare nilearn's files (cached: tests and repeated calls reuse it; read-only)."""
    from nilearn import datasets

    t1_nii = datasets.load_mni152_template(resolution=1)
    maps = [
        datasets.load_mni152_gm_template(resolution=1),
        datasets.load_mni152_wm_template(resolution=1),
        datasets.load_mni152_brain_mask(resolution=1),
    ]
    affine = np.asarray(t1_nii.affine, float)
    full = Image(np.asarray(t1_nii.get_fdata(), np.float32), affine)
    arrays = []
    for nii in maps:
        img = Image(np.asarray(nii.get_fdata(), np.float32), np.asarray(nii.affine, float))
        if not img.grid.same_as(full.grid):
            img = apply_transform(img, Transform.identity(), full.grid)
        arrays.append(img.data)
    gm, wm, mask = arrays
    brain = mask > 0.5
    csf = np.clip(mask - gm - wm, 0.0, 1.0)

    # Lesions start deep in white matter, far enough from the brain surface to grow.
    # (on every other voxel: 2 mm is plenty to find deep white matter, and 8 times cheaper)
    depth = ndimage.distance_transform_edt(brain[::2, ::2, ::2], sampling=2.0)
    seeds_vox = 2.0 * np.argwhere((wm[::2, ::2, ::2] > 0.9) & (depth >= 30.0)).astype(float)
    seeds = seeds_vox @ affine[:3, :3].T + affine[:3, 3]

    ijk = np.argwhere(brain)
    lo, hi = ijk.min(0), ijk.max(0)
    corners = np.array([lo, hi], float) @ affine[:3, :3].T + affine[:3, 3]
    box = (corners.min(0), corners.max(0))
    # Crop to the brain (plus a rim) so every resampling reads a smaller volume.
    lo_c = np.maximum(lo - 3, 0)
    hi_c = np.minimum(hi + 4, np.array(brain.shape))
    crop = tuple(slice(a, b) for a, b in zip(lo_c, hi_c, strict=True))
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ lo_c + affine[:3, 3]

    sigma_mm = antialias_sigma_mm(spacing_mm)
    t1 = full.data[crop]
    if sigma_mm > 0:
        t1 = ndimage.gaussian_filter(t1, sigma_mm, mode="constant")
    channels = np.stack([t1, 1.0 - mask[crop], csf[crop], gm[crop], wm[crop]], -1)
    return Source(
        channels=Image(np.ascontiguousarray(channels, np.float32), crop_affine),
        brain_box=box,
        wm_level=float(np.median(full.data[(wm > 0.9) & brain])),
        tumour_seeds=seeds,
        template_grid=template_grid(full, spacing_mm),
    )


def resample_source(
    source: Source, transform: Transform, grid: Grid
) -> tuple[np.ndarray, np.ndarray]:
    """T1 and tissue labels on ``grid`` through ``transform`` (labels: argmax of the warped
    tissue probabilities, so they are never interpolated as numbers)."""
    values = apply_transform(source.channels, transform, grid).data
    return np.ascontiguousarray(values[..., 0]), np.argmax(values[..., 1:], -1).astype(np.uint8)


@functools.lru_cache(maxsize=2)
def load_tissue_channels(spacing_mm: float) -> Image:
    """The source's tissue probabilities for the contrasts made from them (cached; read-only).

    (X, Y, Z, 7) on the source's 1 mm crop: background, CSF, GM and WM as in ``Source.channels``
    (their most probable class is the label), then CSF, GM and WM pre-smoothed as the T1 is, so that
    an image mixed from them (:mod:`atlasflow.synth.contrasts`) has the T1's resolution.
    """
    source = load_source(spacing_mm)
    tissues = source.channels.data[..., 1:]
    sigma_mm = antialias_sigma_mm(spacing_mm)
    smoothed = [
        ndimage.gaussian_filter(tissues[..., k], sigma_mm, mode="constant")
        if sigma_mm > 0
        else tissues[..., k]
        for k in (1, 2, 3)
    ]
    channels = np.concatenate([tissues, np.stack(smoothed, -1)], -1)
    return Image(np.ascontiguousarray(channels, np.float32), source.channels.affine)
