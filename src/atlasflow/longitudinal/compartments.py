"""Tumour compartments: what the labels of a tumour mask mean, their volumes, and the volume checks.

A tumour mask is 0 outside the tumour. Inside it holds either 1 (a binary mask: the whole tumour)
or the labels of ``longitudinal.tumor_labels`` in the config, which name the compartments, by
default the BraTS convention (1 necrotic core, 2 oedema, 3 or 4 enhancing tumour)
(:data:`DEFAULT_TUMOR_LABELS`). Every use of a mask as "tumour" (volumes, registration
exclusion, tumour-frequency map) takes any non-zero label.

* :class:`TumourLabels`: the configured compartments, checked, with the set of values a tumour
  mask may hold and how they travel on the command line.
* :func:`mask_volumes`: the whole tumour's volume and each compartment's, from one mask file.
* :func:`response_compartment`: which volume the response category is judged on (RANO 2.0 reads
  the enhancing tumour where there is one).
* :func:`jacobian_mask_check`: whether the registration's volume change over the baseline tumour
  (integrated Jacobian) agrees with the change of the masks.

This module is torch-free: cohort validation (planning) reads the labels from it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlasflow.errors import AtlasflowError

#: BraTS labels: 1 necrotic / non-enhancing core, 2 peritumoural oedema, 4 enhancing tumour
#: (BraTS 2017-2021; 3 in BraTS 2023 and later).
DEFAULT_TUMOR_LABELS: dict[str, tuple[int, ...]] = {
    "necrosis": (1,),
    "oedema": (2,),
    "enhancing": (3, 4),
}
#: The compartment the response category is judged on when the masks have it (RANO 2.0).
ENHANCING = "enhancing"
#: ``response_compartment`` when the category is judged on the whole mask.
WHOLE = "whole"
#: The value of a binary mask's tumour voxels, always accepted.
BINARY_LABEL = 1

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

#: Jacobian / mask agreement: the ratio of the two relative volume changes must lie in this range
#: (opposite signs give a negative ratio, outside it) ...
AGREEMENT_RATIO = (0.5, 2.0)
#: ... unless both changes are smaller than this (% of the baseline volume), where a ratio of two
#: near-zero numbers means nothing: the check then reads ``small_change``.
AGREEMENT_MIN_CHANGE_PCT = 10.0


@dataclass(frozen=True)
class TumourLabels:
    """Compartment name -> the mask values that belong to it (in the configured order)."""

    compartments: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, mapping: Mapping[str, Sequence[int]] | None) -> TumourLabels:
        """From the config's ``longitudinal.tumor_labels`` (None: the BraTS default); checks that
        names are lower-case identifiers, labels positive whole numbers, each in one compartment."""
        if mapping is None:
            mapping = DEFAULT_TUMOR_LABELS
        owner: dict[int, str] = {}
        items = []
        for name, values in mapping.items():
            if not _NAME.match(str(name)):
                raise AtlasflowError(
                    f"longitudinal.tumor_labels: compartment name {name!r} must be lower-case "
                    "letters, digits and '_' (it names table columns)"
                )
            if name == WHOLE:
                raise AtlasflowError(
                    f"longitudinal.tumor_labels: '{WHOLE}' is reserved for the whole tumour"
                )
            labels = []
            for value in values:
                if isinstance(value, bool) or int(value) != value or int(value) < 1:
                    raise AtlasflowError(
                        f"longitudinal.tumor_labels: {name}: label {value!r} is not a whole number >= 1"
                    )
                if int(value) in owner:
                    raise AtlasflowError(
                        f"longitudinal.tumor_labels: label {int(value)} is in both "
                        f"{owner[int(value)]} and {name}"
                    )
                owner[int(value)] = name
                labels.append(int(value))
            items.append((str(name), tuple(labels)))
        return cls(tuple(items))

    @classmethod
    def parse(cls, items: Sequence[str] | None) -> TumourLabels:
        """From command-line items ``name=1,2`` (None: the default; [] : binary masks only)."""
        if items is None:
            return cls.of(None)
        mapping: dict[str, list[int]] = {}
        for item in items:
            name, sep, values = item.partition("=")
            try:
                mapping[name] = [int(v) for v in values.split(",") if v] if sep else []
            except ValueError:
                raise AtlasflowError(
                    f"--tumor-labels: {item!r} is not NAME=LABEL[,LABEL...]"
                ) from None
            if not mapping[name]:
                raise AtlasflowError(f"--tumor-labels: {item!r} names no label")
        return cls.of(mapping)

    def flags(self) -> str:
        """The ``--tumor-labels`` flag that :meth:`parse` reads back."""
        items = " ".join(f"{n}={','.join(map(str, v))}" for n, v in self.compartments)
        return f"--tumor-labels {items}".rstrip()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.compartments)

    @property
    def allowed(self) -> frozenset[int]:
        """The non-zero values a tumour mask may hold: 1 (binary) and every configured label."""
        return frozenset({BINARY_LABEL, *(v for _, values in self.compartments for v in values)})

    def describe(self) -> str:
        """E.g. ``1 (binary), or necrosis 1, oedema 2, enhancing 3/4``."""
        named = ", ".join(f"{n} {'/'.join(map(str, v))}" for n, v in self.compartments)
        return f"1 (binary mask){f', or {named}' if named else ''}"

    def unexpected(self, values: Sequence[float] | None) -> str | None:
        """Why a tumour mask whose distinct values are ``values`` is refused (None: accepted).

        ``values`` None means more distinct whole numbers than a label map holds (a scan, or a
        probability map stored as integers).
        """
        rule = (
            f"a tumour mask holds 0 outside the tumour and inside {self.describe()} "
            "(longitudinal.tumor_labels)"
        )
        if values is None:
            return f"tumour mask has too many distinct values to be a mask; {rule}"
        extra = sorted(v for v in values if v != 0 and int(v) not in self.allowed)
        if not extra:
            return None
        shown = ", ".join(f"{v:g}" for v in extra[:8]) + (", ..." if len(extra) > 8 else "")
        return f"tumour mask has value(s) {shown} that are not tumour labels; {rule}"


@dataclass(frozen=True)
class MaskVolumes:
    """One tumour mask's volumes (mm^3) and whether it is multi-label (holds a value other than 1)."""

    whole_mm3: float
    compartments_mm3: dict[str, float]
    multi_label: bool


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """|det| of the affine's 3x3 part as a triple product: exact for axis-aligned grids (LU
    round-off would give 7.999999999999998 for 2 mm voxels)."""
    a = np.asarray(affine, float)[:3, :3]
    return float(abs(np.dot(a[:, 0], np.cross(a[:, 1], a[:, 2]))))


def mask_volumes(path: str | Path, labels: TumourLabels) -> MaskVolumes:
    """Voxel counts x the voxel volume of the mask's own grid: the whole tumour (any non-zero
    label) and every configured compartment (voxels whose label it names)."""
    from atlasflow.io.images import load_image

    mask = load_image(path, dtype=None)
    voxel = voxel_volume_mm3(mask.affine)
    data = np.rint(np.asarray(mask.data)).astype(np.int64)
    values, counts = np.unique(data, return_counts=True)
    count = dict(zip(values.tolist(), counts.tolist(), strict=True))
    return MaskVolumes(
        whole_mm3=float(sum(c for v, c in count.items() if v > 0)) * voxel,
        compartments_mm3={
            name: float(sum(count.get(v, 0) for v in members)) * voxel
            for name, members in labels.compartments
        },
        multi_label=any(v not in (0, BINARY_LABEL) for v in count),
    )


def response_compartment(baseline: MaskVolumes | None, multi_label: bool) -> str:
    """The compartment the response category is judged on: ``enhancing`` where the subject's masks
    are multi-label, ``enhancing`` is configured and the baseline has enhancing tumour (RANO 2.0
    measures the enhancing disease); else the whole mask (binary masks, non-enhancing tumours)."""
    if multi_label and baseline is not None and baseline.compartments_mm3.get(ENHANCING, 0.0) > 0:
        return ENHANCING
    return WHOLE


def jacobian_mask_check(
    jacobian_pct: float | None, mask_pct: float | None
) -> tuple[float | None, str]:
    """(ratio of the Jacobian's to the masks' relative volume change, verdict).

    Verdicts: ``agree`` (ratio within :data:`AGREEMENT_RATIO`), ``disagree`` (outside it, which
    includes opposite signs), ``small_change`` (both changes under
    :data:`AGREEMENT_MIN_CHANGE_PCT` % of the baseline: not compared), ``not_evaluable`` (a number
    is missing). A disagreement means the deformation and the segmentations tell different stories:
    a registration that did not follow the tumour, or masks drawn inconsistently.
    """
    if jacobian_pct is None or mask_pct is None:
        return None, "not_evaluable"
    ratio = jacobian_pct / mask_pct if mask_pct != 0 else None
    if max(abs(jacobian_pct), abs(mask_pct)) < AGREEMENT_MIN_CHANGE_PCT:
        return ratio, "small_change"
    low, high = AGREEMENT_RATIO
    if ratio is not None and low <= ratio <= high:
        return ratio, "agree"
    return ratio, "disagree"
