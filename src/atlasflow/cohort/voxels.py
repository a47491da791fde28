"""Voxel statistics of one image and what they say about the image's role in the cohort.

:func:`voxel_stats` makes one streaming pass over a file's stored voxels
(:func:`atlasflow.io.stream.voxel_chunks`), keeping only running statistics (range, finiteness,
whole numbers, non-zero count) after intensity scaling; :func:`role_problem` turns them into the
reason a scan, label map or mask cannot be used, or None.
"""

from __future__ import annotations

import math
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlasflow.cohort.columns import CONTRAST_COLUMNS
from atlasflow.io.stream import voxel_chunks
from atlasflow.longitudinal.compartments import TumourLabels

#: Roles whose images are scans (intensities to register), not labels or masks.
SCAN_ROLES = ("t1w", *CONTRAST_COLUMNS)


@dataclass(frozen=True)
class VoxelStats:
    """What one streaming pass over the voxels (after intensity scaling) found."""

    finite: bool  # no NaN / Inf, and within float32 range (what load_image produces)
    minimum: float
    maximum: float
    integer_valued: bool
    non_integer_example: float | None
    nonzero: int
    # Number of distinct values when the voxels are whole numbers with at most
    # DISTINCT_LIMIT of them (a label map), else None (a scan: counting stopped early).
    distinct: int | None = None
    # Those distinct values (after scaling), sorted, under the same condition.
    values: tuple[float, ...] | None = None


#: A whole-number image with at most this many distinct values reads as a label map, not a scan:
#: label maps hold tens to about 150 labels, an 8-bit scan uses most of its 256 levels.
DISTINCT_LIMIT = 160


class _StatsAccumulator:
    """Running min/max/finite/integer/non-zero statistics over chunks of raw voxels.

    Each chunk costs a few vectorised reductions: NaN/Inf show up as a non-finite minimum or
    maximum; integer voxels are reduced as stored and the intensity scaling is applied to the
    results (it is monotonic), so they are converted to floating point only in the rare case
    where a non-integer scaling could still give whole numbers.
    """

    def __init__(self, dtype: np.dtype, slope: float, inter: float):
        self.slope, self.inter = slope, inter
        self.scaled = (slope, inter) != (1.0, 0.0)
        self.stored_integers = dtype.kind in "iu"
        # Scaled integers are whole numbers for sure when slope and intercept are.
        self.check_integers = not self.stored_integers or not (
            slope.is_integer() and inter.is_integer()
        )
        zero = -inter / slope if slope else math.nan
        self.raw_zero = (
            zero if self.stored_integers and self.scaled and float(zero).is_integer() else None
        )
        self.finite = True
        self.integer_valued = True
        self.non_integer_example: float | None = None
        self.minimum = math.inf
        self.maximum = -math.inf
        self.nonzero = 0
        self.distinct: set[float] | None = set()

    def _count_distinct(self, raw: np.ndarray) -> None:
        if self.distinct is not None:
            # Stored values map one-to-one to scaled ones: count them as stored.
            if self.stored_integers:
                self.distinct.update(np.unique(raw).tolist())
                if len(self.distinct) > DISTINCT_LIMIT:
                    self.distinct = None
            else:
                self._note_distinct(raw)

    def _scale(self, value: float) -> float:
        return value * self.slope + self.inter if self.scaled else value

    def _note_fraction(self, values: np.ndarray) -> None:
        fractional = values != np.round(values)
        if fractional.any():
            self.integer_valued = False
            self.non_integer_example = float(values[np.argmax(fractional)])

    def _note_distinct(self, values: np.ndarray) -> None:
        if self.distinct is None:
            return
        if not self.integer_valued:
            self.distinct = None
            return
        self.distinct.update(np.unique(values).tolist())
        if len(self.distinct) > DISTINCT_LIMIT:
            self.distinct = None  # a scan: stop counting

    def add(self, raw: np.ndarray) -> None:
        self._count_distinct(raw)
        if self.stored_integers:
            ends = sorted((self._scale(float(raw.min())), self._scale(float(raw.max()))))
            self.minimum, self.maximum = min(self.minimum, ends[0]), max(self.maximum, ends[1])
            if self.integer_valued and self.check_integers:
                self._note_fraction(np.array(ends))
                if self.integer_valued:  # both ends whole: look at every value
                    self._note_fraction(raw.astype(np.float64) * self.slope + self.inter)
            if not self.scaled:
                self.nonzero += int(np.count_nonzero(raw))
            elif self.raw_zero is None:
                self.nonzero += raw.size
            else:
                self.nonzero += raw.size - int(np.count_nonzero(raw == self.raw_zero))
            return
        values = raw.astype(np.float64) * self.slope + self.inter if self.scaled else raw
        low, high = float(values.min()), float(values.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            self.finite = False
            return
        self.minimum, self.maximum = min(self.minimum, low), max(self.maximum, high)
        if self.integer_valued:
            self._note_fraction(values)
        self.nonzero += int(np.count_nonzero(values))

    def result(self) -> VoxelStats:
        limit = float(np.finfo(np.float32).max)
        within = self.finite and max(abs(self.minimum), abs(self.maximum)) <= limit
        known = self.distinct is not None and self.integer_valued
        return VoxelStats(
            within,
            self.minimum,
            self.maximum,
            self.integer_valued,
            self.non_integer_example,
            self.nonzero,
            len(self.distinct) if known else None,
            # The set holds stored values (scaled ones for scaled floats): scale them once here.
            tuple(sorted({self._scale(float(v)) for v in self.distinct})) if known else None,
        )


def voxel_stats(
    path: Path,
    dtype: np.dtype,
    offset: int,
    shape: tuple[int, ...],
    scaling: tuple[float, float],
) -> VoxelStats:
    """One pass over the voxels, decompressing once; stops early at the first NaN/Inf.

    ``dtype`` is the on-disk voxel type (with the header's byte order), ``offset`` the byte where
    the voxels start, ``scaling`` the (slope, intercept) nibabel applies to the stored values.
    Raises :class:`atlasflow.io.stream.InvalidFile` for an unreadable, corrupt or truncated file.
    """
    slope, inter = scaling  # nibabel moves scl_slope/scl_inter from the header to the proxy
    acc = _StatsAccumulator(dtype, slope, inter)
    chunks = closing(voxel_chunks(path, dtype, offset, math.prod(shape)))
    with np.errstate(all="ignore"), chunks as raw_chunks:
        for raw in raw_chunks:
            acc.add(raw)
            if not acc.finite:
                break  # the error is certain; no need to read further
    return acc.result()


def role_problem(
    stats: VoxelStats | None, role: str, tumor_labels: TumourLabels | None = None
) -> str | None:
    """What is wrong with these voxels for this role (None when fine or data were not read).

    ``tumor_labels``: the labels a tumour mask may hold besides 1 (None: the BraTS default).
    """
    if stats is None:
        return None
    if not stats.finite:
        return "image contains NaN or infinite voxels (or values beyond the float32 range)"
    if role in SCAN_ROLES:
        if stats.maximum <= stats.minimum:
            return f"image is constant (every voxel is {stats.minimum:g}): nothing to register"
        if role != "t1w" and stats.distinct is not None:
            return (
                f"looks like a label map or mask, not a {role} scan: only {stats.distinct} distinct "
                "whole-number values"
            )
        return None
    if role == "labels":
        if not stats.integer_valued:
            return (
                f"label map has non-integer values (e.g. {stats.non_integer_example:g}); labels must "
                "be whole numbers (was it resampled with linear interpolation?)"
            )
        if stats.minimum < 0:
            return f"label map has negative values (minimum {stats.minimum:g})"
        if stats.nonzero == 0:
            return "label map is empty (every voxel is 0)"
        return None
    if role == "tumor_mask":
        return _tumour_mask_problem(stats, tumor_labels)
    # Brain masks: 0 outside, 1 inside. Anything else (0/255, a probability map) is ambiguous about
    # what counts as inside, so it is rejected rather than guessed.
    if not stats.integer_valued:
        return (
            f"brain mask is not binary: it has non-integer values (e.g. {stats.non_integer_example:g}); "
            "a mask holds only 0 and 1"
        )
    if stats.minimum < 0 or stats.maximum > 1:
        return (
            f"brain mask is not binary: values range from {stats.minimum:g} to {stats.maximum:g}; "
            "a mask holds only 0 and 1"
        )
    if stats.nonzero == 0:
        return "brain mask is empty (no voxel is 1)"
    return None


def _tumour_mask_problem(stats: VoxelStats, tumor_labels: TumourLabels | None) -> str | None:
    """A tumour mask holds 0 and either 1 or the configured compartment labels (BraTS by default);
    0/255 masks and probability maps are ambiguous about what counts as tumour: refused."""
    labels = tumor_labels if tumor_labels is not None else TumourLabels.of(None)
    if not stats.integer_valued:
        return (
            f"tumour mask has non-integer values (e.g. {stats.non_integer_example:g}); a tumour mask "
            f"holds 0 outside the tumour and inside {labels.describe()} (longitudinal.tumor_labels); "
            "threshold a probability map first"
        )
    if stats.minimum < 0:
        return f"tumour mask has negative values (minimum {stats.minimum:g})"
    return labels.unexpected(stats.values)  # an empty mask: no visible tumour at this session
