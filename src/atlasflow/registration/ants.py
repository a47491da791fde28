"""The ANTs backend (antspyx): ANTsImage conversion in memory and ``ants.registration``.

The classical baseline beside the deep engine; its transforms come back in the same
representation (:class:`~atlasflow.transforms.Transform`, RAS, on the fixed grid).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from atlasflow.io.images import Image
from atlasflow.io.itk import read_itk_affine, read_itk_displacement
from atlasflow.transforms import Transform

_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_ants(image: Image):
    """In-memory conversion to an ANTsImage (LPS origin/direction), no temporary file."""
    import ants

    lps = _FLIP @ image.affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(0))
    direction = lps[:3, :3] / spacing
    return ants.from_numpy(
        np.ascontiguousarray(image.data, dtype=np.float32),
        origin=tuple(float(v) for v in lps[:3, 3]),
        spacing=tuple(float(v) for v in spacing),
        direction=direction,
    )


def from_ants(ants_image) -> Image:
    """An ANTsImage as an Image (RAS affine)."""
    lps = np.eye(4)
    spacing = np.asarray(ants_image.spacing, float)
    lps[:3, :3] = np.asarray(ants_image.direction, float) * spacing
    lps[:3, 3] = ants_image.origin
    return Image(np.asarray(ants_image.numpy(), np.float32), _FLIP @ lps)


def register_ants(
    fixed: Image,
    moving: Image,
    fixed_mask: np.ndarray | None,
    moving_mask: np.ndarray | None,
    type_of_transform: str,
    seed: int,
) -> tuple[Transform, Image | None, float]:
    """``ants.registration`` of the pair: the transform (fixed -> moving pull-back, on the fixed
    grid), the inverse displacement (None when ANTs wrote none) and the seconds it took."""
    import ants

    f, m = to_ants(fixed), to_ants(moving)
    kwargs = {}
    if fixed_mask is not None:
        kwargs["mask"] = to_ants(fixed.with_data(fixed_mask.astype(np.float32)))
    if moving_mask is not None:
        kwargs["moving_mask"] = to_ants(moving.with_data(moving_mask.astype(np.float32)))
    with tempfile.TemporaryDirectory(prefix="atlasflow-ants-") as tmp:
        start = time.perf_counter()
        out = ants.registration(
            f,
            m,
            type_of_transform=type_of_transform,
            outprefix=os.path.join(tmp, "reg_"),
            random_seed=seed,
            **kwargs,
        )
        seconds = time.perf_counter() - start
        fwd, inv = out["fwdtransforms"], out["invtransforms"]
        affine_file = next(p for p in fwd if p.endswith(".mat"))
        affine = read_itk_affine(affine_file)
        warp_files = [p for p in fwd if p.endswith(".nii.gz")]
        inv_files = [p for p in inv if p.endswith(".nii.gz")]
        if warp_files:
            displacement = read_itk_displacement(warp_files[0])
            inverse = read_itk_displacement(inv_files[0]) if inv_files else None
        else:
            zeros = np.zeros((*fixed.data.shape, 3), np.float32)
            displacement, inverse = (
                Image(zeros, fixed.affine.copy()),
                Image(zeros.copy(), fixed.affine.copy()),
            )
    return Transform(affine, displacement), inverse, seconds
