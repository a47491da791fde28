"""Volumes made small enough to embed in a page: downsampled, quantised, written as gzipped NIfTI.

The interactive viewer of a subject report (:mod:`atlasflow.reports.viewer`) carries its volumes
inside the HTML file. Each is turned to RAS voxel order, optionally downsampled by an integer
factor (block mean for intensities, the block's middle voxel for labels and masks), and stored as
8-bit codes whose real values come back through the NIfTI header's ``scl_slope``/``scl_inter``,
which NiiVue applies, so values under the cursor are in the volume's own units to within half a
code step (:func:`quantise`, :func:`dequantise`). Label maps keep their integer values (8 or
16 bits). Bytes are deterministic: same volume, same bytes.
"""

from __future__ import annotations

import base64
import gzip
import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from atlasflow.io.images import Image
from atlasflow.reports.montage import ras_image, window

KINDS = ("image", "labels", "mask", "signed", "magnitude")
CODES = 255  # largest 8-bit code; signed maps use 0..254 so that 127 is exactly zero


@dataclass(frozen=True)
class Quantised:
    """Codes and the linear map back to values: ``value = codes * slope + inter``."""

    codes: np.ndarray
    slope: float
    inter: float

    @property
    def step(self) -> float:
        """The value of one code step (the largest error is half of it)."""
        return self.slope


def quantise(data: np.ndarray, kind: str = "image") -> Quantised:
    """8-bit codes of ``data`` over its finite range (NaN and inf become the lowest value).

    ``signed`` maps get a range symmetric about zero with zero an exact code; ``labels`` and
    ``mask`` keep their integer values (uint8, or uint16 for label values above 255).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown volume kind {kind!r}; expected one of {KINDS}")
    data = np.asarray(data)
    if kind in ("labels", "mask"):
        values = np.nan_to_num(np.asarray(data, np.float64), nan=0.0)
        values = np.rint(values).astype(np.int64)
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise ValueError("label values must lie in 0..65535")
        dtype = np.uint8 if values.max(initial=0) <= 255 else np.uint16
        return Quantised(values.astype(dtype), 1.0, 0.0)
    finite = np.isfinite(data)
    values = np.asarray(data, np.float64)
    if not finite.any():
        return Quantised(np.zeros(data.shape, np.uint8), 1.0, 0.0)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if kind == "signed":
        reach = max(abs(lo), abs(hi)) or 1.0
        slope, inter, top = 2 * reach / (CODES - 1), -reach, CODES - 1
    else:
        slope, inter, top = ((hi - lo) / CODES or 1.0), lo, CODES
    clean = np.where(finite, values, inter)
    codes = np.clip(np.rint((clean - inter) / slope), 0, top).astype(np.uint8)
    return Quantised(codes, slope, inter)


def dequantise(q: Quantised) -> np.ndarray:
    """The values the codes stand for (float32)."""
    return (q.codes.astype(np.float64) * q.slope + q.inter).astype(np.float32)


def downsample(image: Image, factor: int, labels: bool = False) -> Image:
    """``image`` on a grid ``factor`` times coarser along every axis, with the affine to match.

    Intensities: mean of each full ``factor``\\ :sup:`3` block (a partial block at the far edge is
    dropped). Labels: the voxel at the block's middle, so no new label values appear.
    """
    if factor <= 1:
        return image
    data = np.asarray(image.data)
    shape = np.array(data.shape[:3])
    if labels:
        start = factor // 2
        small = data[start::factor, start::factor, start::factor]
        offset = float(start)
    else:
        keep = np.maximum(shape // factor, 1) * factor
        keep = np.minimum(keep, shape)
        cropped = np.asarray(data[: keep[0], : keep[1], : keep[2]], np.float32)
        blocks = [max(int(k) // factor, 1) for k in keep]
        sizes = [int(k) // b for k, b in zip(keep, blocks, strict=True)]
        small = cropped.reshape(blocks[0], sizes[0], blocks[1], sizes[1], blocks[2], sizes[2])
        small = (
            np.nanmean(small, axis=(1, 3, 5)) if np.isnan(small).any() else small.mean((1, 3, 5))
        )
        offset = (factor - 1) / 2
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = offset
    return Image(np.ascontiguousarray(small), np.asarray(image.affine, float) @ scale)


@dataclass(frozen=True)
class Embedded:
    """One volume ready for the page: gzipped NIfTI bytes and what the viewer needs to show it."""

    key: str
    name: str
    kind: str
    nifti_gz: bytes
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    display: tuple[float, float]  # value window for the colour map
    step: float  # one code step in the volume's units
    low: float = 0.0  # the smallest value stored

    @property
    def base64(self) -> str:
        return base64.b64encode(self.nifti_gz).decode("ascii")

    def meta(self) -> dict:
        """What the page's script reads about this volume (JSON)."""
        return {
            "key": self.key,
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "spacing": [round(s, 4) for s in self.spacing],
            "display": [_round(v) for v in self.display],
            "step": _round(self.step),
            "min": _round(self.low),
            "bytes": len(self.nifti_gz),
        }


def _round(value: float) -> float:
    return float(f"{value:.6g}") if math.isfinite(value) else 0.0


def display_range(data: np.ndarray, kind: str) -> tuple[float, float]:
    """The colour map's window: robust for intensities, symmetric for signed maps, 0..max else."""
    finite = np.asarray(data, np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    if kind == "signed":
        reach = float(np.percentile(np.abs(finite), 99.5)) or float(np.abs(finite).max()) or 1.0
        return -reach, reach
    if kind in ("labels", "mask"):
        return 0.0, max(float(finite.max()), 1.0)
    if kind == "magnitude":
        return 0.0, float(np.percentile(finite, 99.5)) or 1.0
    return window(np.asarray(data))


def nifti_gz(image: Image, q: Quantised, display: tuple[float, float]) -> bytes:
    """A gzipped single-file NIfTI-1 of the codes with the slope/intercept and display window."""
    header = nib.Nifti1Header()
    header.set_data_dtype(q.codes.dtype)
    nii = nib.Nifti1Image(q.codes, np.asarray(image.affine, float), header)
    nii.set_qform(nii.affine, code=1)
    nii.set_sform(nii.affine, code=1)
    nii.header.set_slope_inter(q.slope, q.inter)
    nii.header.set_xyzt_units("mm")
    nii.header["cal_min"], nii.header["cal_max"] = display
    return gzip.compress(nii.to_bytes(), compresslevel=6, mtime=0)


def embed(image: Image, key: str, name: str, kind: str, factor: int = 1) -> Embedded:
    """``image`` (any orientation) as an :class:`Embedded` volume, RAS-ordered and downsampled."""
    if kind not in KINDS:
        raise ValueError(f"unknown volume kind {kind!r}; expected one of {KINDS}")
    ras = ras_image(image)
    small = downsample(ras, factor, labels=kind in ("labels", "mask"))
    q = quantise(small.data, kind)
    shown = display_range(dequantise(q) if kind not in ("labels", "mask") else q.codes, kind)
    spacing = tuple(float(s) for s in np.sqrt((small.affine[:3, :3] ** 2).sum(axis=0)))
    return Embedded(
        key=key,
        name=name,
        kind=kind,
        nifti_gz=nifti_gz(small, q, shown),
        shape=tuple(int(s) for s in small.data.shape[:3]),
        spacing=spacing,
        display=shown,
        step=q.step,
        low=float(q.codes.min(initial=0)) * q.slope + q.inter,
    )
