"""Image I/O: the one way atlasflow reads and writes NIfTI files, and the grid they live on.

An :class:`Image` is a 3-D array plus its voxel-to-world affine in nibabel's RAS millimetre
convention. Everything that touches files goes through :func:`load_image` / :func:`save_image`,
so that checks, dtypes and atomic writes are in one place.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from atlasflow.errors import AtlasflowError, describe, failure_record
from atlasflow.io.atomic import atomic_file


@dataclass(frozen=True)
class Grid:
    """A voxel grid: shape and voxel-to-world (RAS mm) affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def same_as(self, other: Grid, atol: float = 1e-3) -> bool:
        return tuple(self.shape) == tuple(other.shape) and np.allclose(
            self.affine, other.affine, atol=atol
        )


@dataclass
class Image:
    """A 3-D image (or a 3-D grid of vectors, shape (X, Y, Z, C)) with its RAS affine."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def grid(self) -> Grid:
        return Grid(tuple(int(s) for s in self.data.shape[:3]), np.asarray(self.affine, float))

    def with_data(self, data: np.ndarray) -> Image:
        return Image(data, self.affine.copy())


def load_header(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI file (header only; data stays on disk) with a clear error when it is not one."""
    path = Path(path)
    if not path.exists():
        raise AtlasflowError(f"{path}: file not found")
    if path.is_dir():
        raise AtlasflowError(f"{path}: is a folder, expected a NIfTI file")
    record = failure_record(path)
    if record is not None:  # written in place of an output under on_scan_error: skip
        raise AtlasflowError(f"{path}: not an image but the record of a skipped scan ({describe(record)})")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for garbage input
        raise AtlasflowError(f"{path}: not a readable NIfTI image ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise AtlasflowError(f"{path}: not a NIfTI image ({type(img).__name__})")
    return img


def load_image(path: str | os.PathLike, dtype: type | None = np.float32, allow_vector: bool = False) -> Image:
    """Load a 3-D NIfTI image (trailing singleton dimensions are dropped).

    Raises AtlasflowError naming the file for anything that is not a finite 3-D image.
    """
    path = Path(path)
    img = load_header(path)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise AtlasflowError(f"{path}: image data cannot be read ({type(exc).__name__}: {exc})") from None
    while data.ndim > 3 and data.shape[-1] == 1 and not allow_vector:
        data = data[..., 0]
    if allow_vector and data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if not allow_vector and data.ndim != 3:
        raise AtlasflowError(f"{path}: expected a 3-D image, got {data.ndim}-D with shape {data.shape}")
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise AtlasflowError(f"{path}: image contains NaN or infinite voxels")
    affine = img.affine if img.affine is not None else np.eye(4)
    return Image(np.ascontiguousarray(data), np.asarray(affine, dtype=float))



def load_mask(
    path: str | os.PathLike | None, image: Image, image_path: str | os.PathLike
) -> np.ndarray | None:
    """A mask (voxels > 0) that must lie on ``image``'s grid; None when no path is given."""
    if not path:
        return None
    mask = load_image(path).data > 0
    if mask.shape != image.data.shape:
        raise AtlasflowError(f"{path}: mask grid {mask.shape} does not match {image_path} {image.data.shape}")
    return mask


def save_image(
    image: Image,
    path: str | os.PathLike,
    dtype: type | np.dtype | None = None,
    intent: str | None = None,
    slope: float | None = None,
) -> Path:
    """Write an image atomically (temporary file in the same folder, then rename).

    A partly written file therefore never survives under the final name. ``slope``: the NIfTI
    scale factor, for integer data that stands for ``data * slope`` (readers get the products).
    """
    path = Path(path)
    data = image.data if dtype is None else image.data.astype(dtype)
    nii = nib.Nifti1Image(data, image.affine)
    nii.header.set_qform(image.affine, code=1)
    nii.header.set_sform(image.affine, code=1)
    nii.header.set_xyzt_units("mm", "sec")
    if intent is not None:
        nii.header.set_intent(intent)
    if slope is not None:
        nii.header.set_slope_inter(slope, 0.0)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    with atomic_file(path, suffix) as tmp:
        # Fixed gzip mtime so identical inputs give byte-identical files. Level 1 (nibabel's own
        # default): level 9 took 5-10x longer on float displacement fields for files ~5 % smaller.
        if suffix == ".nii.gz":
            raw = nii.to_bytes()
            with (
                open(tmp, "wb") as fh,
                gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="", compresslevel=1) as gz,
            ):
                gz.write(raw)
        else:
            nib.save(nii, tmp)
    return path

