"""The engine's input contract: scans as users have them, made into what the networks expect.

The networks were trained on brain or head images scaled to [0, 1], zero outside the region that
matters, on near-isotropic voxels of about 2 mm. Users hand over raw scanner output: any dtype and
intensity range (offsets included), whole heads with background noise, 0.5 mm in-plane by 4 mm
slices, two scans on different grids, often no mask, sometimes far apart or rotated. This module
closes that gap before the engine runs and carries its result back afterwards:

* :func:`normalise_intensities` maps the background (or the mask's 1st percentile) and the
  foreground's 99th percentile to [0, 1]
  (invariant to any positive scale and offset of the input, so uint8, int16 x 16 and
  float x 1000 + 500 give the same image);
* :func:`foreground_mask` finds the head (or the brain of a skull-stripped scan) when no mask is
  given: the largest bright component, closed and hole-filled;
* :func:`working_image` resamples a scan whose voxels are anisotropic or much finer than the
  networks' onto an isotropic grid of ``WORKING_SPACING_MM`` (Gaussian anti-aliasing first);
* the starting alignment (centres of mass, a rotation search, a mutual-information affine) is
  :mod:`atlasflow.registration.initial`.

Images already shaped like the workflow's preprocessed scans (values in [0, 1], a mask, an
isotropic grid of 1.5 mm or more) pass through unchanged, so the workflow's outputs do not move.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Grid, Image
from atlasflow.transforms import Transform, apply_transform

WORKING_SPACING_MM = 2.0
#: Grids kept as they are: isotropic within this ratio and no finer than this spacing.
ISOTROPY_RATIO = 1.25
FINEST_KEPT_MM = 1.5


@dataclass
class PreparedImage:
    """One scan as the engine takes it: normalised, on its working grid, with its mask."""

    image: Image
    mask: np.ndarray  # bool, on ``image``'s grid
    original: Grid  # the grid the user's scan came on
    resampled: bool  # whether ``image`` lives on another grid than ``original``
    mask_found: bool  # the mask was found here rather than given
    native: Image | None = None  # normalised on ``original`` (finer alignment levels read it)
    native_mask: np.ndarray | None = None


# ------------------------------------------------------------------------------- intensities


def is_normalised(data: np.ndarray, mask: np.ndarray | None = None) -> bool:
    """Already on the networks' intensity scale: values within about [0, 1] (a little below 0
    and above 1 are left alone: interpolation and noise put them there) whose bright end reaches
    at least half way. The workflow's preprocessed scans are; raw scanner output (hundreds or
    thousands, offsets) never is."""
    values = data[mask] if mask is not None else data
    if values.size == 0:
        return False
    lo, hi = np.percentile(values, [0.1, 99.9])
    if lo < -0.1 or hi > 1.5:
        return False
    bright = values[values > 0.05]
    return bright.size > 0 and float(np.percentile(bright, 99)) >= 0.5


def _background_level(data: np.ndarray) -> float:
    """The intensity of empty space: the low end of the histogram (0 for most scans, the offset
    for a shifted one)."""
    return float(np.percentile(data, 0.5))


def normalise_intensities(data: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Map the foreground's 1st-99th percentiles to [0, 1] and clip (float32), as the workflow's
    preprocessing does inside a brain mask.

    Without ``mask`` the foreground is everything brighter than the background by a tenth of the
    bright end, and the background (the histogram's low end) maps to 0: an offset does not survive
    as a grey floor.
    """
    data = np.asarray(data, np.float32)
    if not np.all(np.isfinite(data)):
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    floor = _background_level(data)
    shifted = data - floor
    if mask is None:
        top = float(np.percentile(shifted, 99.5))
        inside = shifted[shifted > 0.1 * top] if top > 0 else shifted.ravel()
    else:
        inside = shifted[mask]
    if inside.size == 0:
        raise AtlasflowError("the image has no foreground to register (it is empty or constant)")
    lo, hi = np.percentile(inside, [1.0, 99.0])
    if hi <= lo:
        raise AtlasflowError("the image's intensities inside its foreground are constant")
    # Without a mask the dark end is the background itself: the foreground's own 1st percentile
    # would turn its dimmer tissue black and the head mask found next would lose it.
    lo = 0.0 if mask is None else float(lo)
    return np.clip((shifted - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------- masks


def foreground_mask(normalised: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """The head (or the brain, in a skull-stripped scan): the largest component above an Otsu
    threshold, closed over ~4 mm and with its holes filled (ventricles, sinuses, dark bone)."""
    values = normalised[normalised > 0.02]
    if values.size == 0:
        raise AtlasflowError("the image has no foreground to register (it is empty)")
    threshold = _otsu(values) * 0.5
    mask = normalised > threshold
    labels, n = ndimage.label(mask)
    if n == 0:
        raise AtlasflowError("the image has no foreground to register")
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    mask = labels == (1 + int(np.argmax(sizes)))
    radius = np.maximum(np.round(4.0 / np.asarray(spacing, float)).astype(int), 1)
    structure = _ellipsoid(radius)
    pad = [(int(r), int(r)) for r in radius]
    mask = ndimage.binary_closing(np.pad(mask, pad), structure)[tuple(slice(r, -r) for r in radius)]
    mask = ndimage.binary_fill_holes(mask)
    # Slices of a thick-slice scan: fill holes plane by plane too (the 3-D fill cannot close a
    # hole that touches the first or last slice).
    thick = int(np.argmax(spacing))
    for k in range(mask.shape[thick]):
        index = [slice(None)] * 3
        index[thick] = k
        mask[tuple(index)] = ndimage.binary_fill_holes(mask[tuple(index)])
    return mask


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    total = weight[-1]
    mean = np.cumsum(hist * centres)
    between = (mean[-1] * weight / total - mean) ** 2 / np.maximum(weight * (total - weight), 1)
    return float(centres[int(np.argmax(between[:-1]))])


def _ellipsoid(radius: np.ndarray) -> np.ndarray:
    axes = [np.arange(-r, r + 1) / max(r, 1) for r in radius]
    grid = np.meshgrid(*axes, indexing="ij")
    return sum(g**2 for g in grid) <= 1.0


# -------------------------------------------------------------------------------------- grids


def needs_working_grid(grid: Grid) -> bool:
    """A grid the networks would see at the wrong scale: anisotropic or much finer than theirs."""
    spacing = grid.spacing
    return bool(spacing.max() / spacing.min() > ISOTROPY_RATIO or spacing.min() < FINEST_KEPT_MM)


def isotropic_grid(grid: Grid, spacing: float = WORKING_SPACING_MM, region: np.ndarray | None = None) -> Grid:
    """An isotropic grid with ``grid``'s axis directions, covering ``grid`` (or the bounding box of
    ``region`` on it, grown by 8 mm) at ``spacing``."""
    vox = grid.spacing
    if region is not None and region.any():
        idx = np.nonzero(region)
        margin = 8.0 / vox
        lo = np.array([i.min() for i in idx]) - margin
        hi = np.array([i.max() for i in idx]) + margin
        lo, hi = np.maximum(lo, -0.5), np.minimum(hi, np.array(grid.shape) - 0.5)
    else:
        lo, hi = np.full(3, -0.5), np.array(grid.shape, float) - 0.5
    extent = (hi - lo) * vox
    shape = tuple(int(max(np.ceil(e / spacing), 1)) for e in extent)
    directions = grid.affine[:3, :3] / vox
    affine = np.eye(4)
    affine[:3, :3] = directions * spacing
    # Centre the new grid on the covered box.
    centre_vox = (lo + hi) / 2
    centre_world = grid.affine[:3, :3] @ centre_vox + grid.affine[:3, 3]
    affine[:3, 3] = centre_world - affine[:3, :3] @ ((np.array(shape, float) - 1) / 2)
    return Grid(shape, affine)


def resample_smooth(image: Image, grid: Grid) -> Image:
    """``image`` on ``grid``, blurred first along the axes where it is finer than ``grid``
    (sigma = the anti-aliasing width of a box of the new spacing)."""
    target = float(np.mean(grid.spacing))
    sigma = np.sqrt(np.maximum((target / image.grid.spacing) ** 2 - 1.0, 0.0)) / 2.355 * 2.0
    data = ndimage.gaussian_filter(np.asarray(image.data, np.float32), sigma) if np.any(sigma > 0.3) else image.data
    return apply_transform(Image(data, image.affine), Transform.identity(), grid, "linear")


def working_image(image: Image, mask: np.ndarray) -> tuple[Image, np.ndarray, bool]:
    """(image, mask, resampled) on the grid the engine should run on."""
    if not needs_working_grid(image.grid):
        return image, mask, False
    grid = isotropic_grid(image.grid, region=mask)
    moved = resample_smooth(image, grid)
    moved_mask = apply_transform(Image(mask.astype(np.float32), image.affine), Transform.identity(), grid, "linear")
    return moved, moved_mask.data > 0.5, True


def prepare(image: Image, mask: np.ndarray | None = None) -> PreparedImage:
    """One scan, made what the engine expects (see the module docstring)."""
    data = np.asarray(image.data)
    if data.ndim != 3:
        raise AtlasflowError(f"expected a 3-D image, got shape {data.shape}")
    given = mask is not None
    mask_b = np.asarray(mask) > 0 if given else None
    if is_normalised(data, mask_b):
        norm = np.asarray(data, np.float32)
    else:
        norm = normalise_intensities(data, mask_b)
    if mask_b is None:
        mask_b = foreground_mask(norm, image.grid.spacing)
    work, work_mask, resampled = working_image(image.with_data(norm), mask_b)
    native = image.with_data(norm)
    return PreparedImage(work, work_mask, image.grid, resampled, not given, native, mask_b)


def needs_preparation(
    fixed: Image, moving: Image, fixed_mask: np.ndarray | None, moving_mask: np.ndarray | None
) -> bool:
    """Whether a pair is not yet what the networks expect: intensities outside [0, 1] or a grid
    of the wrong kind. The workflow's preprocessed scans never are; an image already in [0, 1]
    without a mask is taken whole, as before."""
    for image, mask in ((fixed, fixed_mask), (moving, moving_mask)):
        if needs_working_grid(image.grid):
            return True
        inside = None if mask is None else np.asarray(mask) > 0
        if not is_normalised(np.asarray(image.data), inside):
            return True
    return False


def on_working_grid(
    data: np.ndarray | None, image: Image, prepared: PreparedImage, interpolation: str
) -> np.ndarray | None:
    """A mask or label map of ``image``'s grid on the grid ``prepared`` was resampled to."""
    if data is None or not prepared.resampled:
        return data
    moved = apply_transform(
        image.with_data(np.asarray(data, np.float32 if interpolation == "linear" else None)),
        Transform.identity(),
        prepared.image.grid,
        interpolation,
    )
    return moved.data > 0.5 if interpolation == "linear" else moved.data


# ------------------------------------------------------------------------------------ output


def to_original_grid(field: Image | None, grid: Grid) -> Image | None:
    """A world-mm vector field of the working grid, sampled on the user's fixed grid."""
    if field is None:
        return None
    return apply_transform(field, Transform.identity(), grid, "linear")
