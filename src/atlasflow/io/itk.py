"""Transform files as ANTs and ITK read them.

A moving->fixed registration is stored as an ITK ``AffineTransform_double_3_3`` ``.mat`` (LPS)
plus a displacement field NIfTI (vector intent, LPS mm, on the fixed grid), applied by
``ants.apply_transforms(fixed, moving, [warp, affine])``. In memory the same mapping is one
:class:`atlasflow.transforms.Transform` in RAS millimetres; this module converts at the file
boundary and nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.io

from atlasflow.errors import AtlasflowError
from atlasflow.io.atomic import atomic_file
from atlasflow.io.images import Image, load_image, save_image
from atlasflow.transforms import Transform

#: RAS <-> LPS: flips the first two world axes (nibabel works in RAS, ITK in LPS).
RAS_LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_itk_affine(affine_ras: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a fixed->moving RAS affine as an ITK ``AffineTransform_double_3_3`` .mat (LPS)."""
    lps = RAS_LPS_FLIP @ np.asarray(affine_ras, float) @ RAS_LPS_FLIP
    params = np.concatenate([lps[:3, :3].ravel(), lps[:3, 3]]).reshape(12, 1)
    with atomic_file(path, ".mat") as tmp:
        scipy.io.savemat(
            tmp,
            {"AffineTransform_double_3_3": params, "fixed": np.zeros((3, 1))},
            format="4",
        )
    return Path(path)


def read_itk_affine(path: str | os.PathLike) -> np.ndarray:
    """Read an ITK affine .mat (as written by ANTs or by us) as a fixed->moving RAS 4x4."""
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:
        raise AtlasflowError(f"{path}: not a readable ITK transform file ({exc})") from None
    key = next((k for k in mat if k.startswith("AffineTransform") or k.startswith("MatrixOffset")), None)
    if key is None or "fixed" not in mat:
        raise AtlasflowError(f"{path}: no affine transform parameters found")
    params = np.asarray(mat[key], float).ravel()
    center = np.asarray(mat["fixed"], float).ravel()
    matrix = params[:9].reshape(3, 3)
    translation = params[9:12]
    # ITK: y = M (x - c) + t + c
    offset = translation + center - matrix @ center
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = offset
    return RAS_LPS_FLIP @ lps @ RAS_LPS_FLIP


def write_itk_displacement(displacement: Image, path: str | os.PathLike) -> Path:
    """Write a RAS-mm displacement field as an ITK/ANTs displacement field (LPS mm, 5-D vector)."""
    data = np.asarray(displacement.data, np.float32).copy()
    data[..., 0] *= -1.0
    data[..., 1] *= -1.0
    return save_image(Image(data[:, :, :, None, :], displacement.affine), path, intent="vector")


def read_itk_displacement(path: str | os.PathLike) -> Image:
    """Read an ITK/ANTs displacement field as RAS mm, shape (X, Y, Z, 3)."""
    img = load_image(path, allow_vector=True)
    data = img.data
    if data.ndim != 4 or data.shape[-1] != 3:
        raise AtlasflowError(f"{path}: expected a 3-D displacement field, got shape {data.shape}")
    data = data.copy()
    data[..., 0] *= -1.0
    data[..., 1] *= -1.0
    return Image(data, img.affine)


def save_transform(transform: Transform, affine_path: str | os.PathLike, warp_path: str | os.PathLike | None) -> None:
    """Write a transform as ANTs reads it: ``[warp_path, affine_path]``.

    An affine-only transform still gets a (zero) displacement field when ``warp_path`` is given, so
    every backend produces the same files.
    """
    write_itk_affine(transform.affine, affine_path)
    if warp_path is not None:
        if transform.displacement is None:
            raise AtlasflowError("an affine-only transform has no grid for a displacement field")
        write_itk_displacement(transform.displacement, warp_path)


def load_transform(affine_path: str | os.PathLike, warp_path: str | os.PathLike | None = None) -> Transform:
    disp = read_itk_displacement(warp_path) if warp_path is not None else None
    return Transform(read_itk_affine(affine_path), disp)
