"""The reference template: nilearn's packaged MNI152 (no download) or a user-given NIfTI.

The template is written on the working grid (isotropic ``spacing``), intensity-normalised the same
way as subject scans, with its brain mask, so that every registration sees comparable inputs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Grid, Image, load_image, save_image
from atlasflow.preprocess.steps import (
    implausible_brain,
    normalise_intensity,
    template_brain,
    to_ras,
)
from atlasflow.registration.api import FoundMask
from atlasflow.transforms import Transform, apply_transform


def load_mni152() -> tuple[Image, np.ndarray]:
    """nilearn's MNI152 2009c symmetric T1 brain (1 mm) and its brain mask, read from the package."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    image = Image(np.asarray(t1.get_fdata(), np.float32), np.asarray(t1.affine, float))
    mask_img = Image(np.asarray(mask.get_fdata(), np.float32), np.asarray(mask.affine, float))
    if mask_img.grid.same_as(image.grid):  # nilearn's are (resampling 1 mm costs ~3 s)
        return image, mask_img.data > 0
    mask_data = apply_transform(mask_img, Transform.identity(), image.grid, "nearest").data > 0
    return image, mask_data


def template_grid(image: Image, spacing: float, multiple: int = 1) -> Grid:
    """Grid of isotropic ``spacing`` covering ``image`` (RAS), shape rounded up to ``multiple``."""
    ras = to_ras(image)
    extent = np.array(ras.data.shape) * ras.grid.spacing
    shape = tuple(int(np.ceil(np.ceil(e / spacing) / multiple) * multiple) for e in extent)
    centre_vox = (np.array(ras.data.shape) - 1) / 2
    centre = ras.affine[:3, :3] @ centre_vox + ras.affine[:3, 3]
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre - spacing * (np.array(shape) - 1) / 2
    return Grid(shape, affine)


def working_template(
    source: str, spacing: float, mask_path: str | None = None
) -> tuple[Image, np.ndarray]:
    """The template (``mni152`` or a file) normalised in its brain on a grid of ``spacing``, and
    that brain mask on the same grid."""
    if source == "mni152":
        image, mask = load_mni152()
    else:
        image = to_ras(load_image(source))
        if mask_path:
            mask_img = to_ras(load_image(mask_path))
            mask = apply_transform(mask_img, Transform.identity(), image.grid, "nearest").data > 0
        else:
            mask = image.data > 0
    grid = template_grid(image, spacing)
    norm = image.with_data(normalise_intensity(image.data, mask))
    out = apply_transform(norm, Transform.identity(), grid, "linear")
    out_m = apply_transform(
        image.with_data(mask.astype(np.uint8)), Transform.identity(), grid, "nearest"
    )
    return out, out_m.data > 0


@functools.lru_cache(maxsize=2)
def mni152_working(spacing: float = 2.0) -> tuple[Image, np.ndarray]:
    """nilearn's MNI152 brain as the workflow's template (:func:`working_template`), made once per
    process: what ``atlasflow register`` finds a bare scan's brain with."""
    return working_template("mni152", spacing)


def prepare_template(
    source: str,
    spacing: float,
    out_image: str | Path,
    out_mask: str | Path,
    mask_path: str | None = None,
) -> Image:
    """Write the template and its brain mask on the working grid."""
    out, mask = working_template(source, spacing, mask_path)
    save_image(out, out_image, dtype=np.float32)
    save_image(out.with_data(mask.astype(np.uint8)), out_mask, dtype=np.uint8)
    return out


def find_brain(image: Image) -> FoundMask:
    """A bare scan's brain found through the MNI152 template (:func:`mni152_working`,
    :func:`atlasflow.preprocess.steps.template_brain`), how it was found, and the scan's contrast
    class read on the way (:func:`~atlasflow.preprocess.steps.contrast_class`); no mask and no
    class when what was found cannot be this scan's brain
    (:func:`~atlasflow.preprocess.steps.implausible_brain`): the engine then uses the head it
    finds."""
    try:
        brain, contrast = template_brain(image, *mni152_working())
    except AtlasflowError as exc:
        return FoundMask(None, f"head (no brain found: {exc})")
    reason = implausible_brain(brain, image)
    if reason:
        return FoundMask(None, f"head (no brain found: {reason})")
    return FoundMask(brain, "brain found through the MNI152 template", contrast)
