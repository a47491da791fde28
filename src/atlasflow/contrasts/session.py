"""A session's other contrasts (T2w, FLAIR, post-contrast T1w, PDw) brought to its reference.

The session's reference is its T1w unless config ``contrasts.reference`` names another contrast
(the T1w is then one of the others); "T1w" below stands for it. Each contrast is bias-corrected
on its own grid, aligned to the session's preprocessed T1w by normalised mutual information
(:func:`atlasflow.registration.initial.session_alignment`: rigid by default, the
contrast-independent path of the engine), and normalised in the T1w's brain mask with the same
percentile rule as the T1w. What is kept on the contrast's own grid, brain only,
is the one image every output space is resampled from (:mod:`atlasflow.contrasts.spaces`), so a
contrast is interpolated once per space, never twice.

The alignment's quality is judged by the mutual information it reaches, not by a correlation:
across contrasts a correlation can be high for a wrong alignment and low for a right one.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlasflow.contrasts.qc import MAX_SESSION_SHIFT_MM, MIN_SESSION_NMI
from atlasflow.errors import AtlasflowError
from atlasflow.io.atomic import atomic_write_text
from atlasflow.io.images import Image, load_image, load_mask, save_image
from atlasflow.io.itk import write_itk_affine
from atlasflow.preprocess.steps import bias_correct, to_ras
from atlasflow.registration.initial import alignment_nmi, session_alignment
from atlasflow.registration.inputs import prepare
from atlasflow.transforms import Transform, apply_transform

#: Percentiles inside the brain mapped to 0 and 1 (the T1w's rule, preprocess.normalise_intensity).
#: Values above 1 are kept: a FLAIR lesion is the bright tail the difference maps must not clip.
LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.0


@dataclass(frozen=True)
class SessionAlignment:
    """Where a contrast lies relative to its session's T1w, and how well it fits."""

    world: np.ndarray  # T1w world -> contrast world (the ITK pull-back of from-<contrast>_to-T1w)
    nmi_scanner: float  # mutual information at the scanner's own alignment
    nmi_after: float
    shift_mm: float  # mean displacement over the brain from the scanner's alignment
    rotation_deg: float

    def flags(self, min_nmi: float = MIN_SESSION_NMI, max_shift_mm: float = MAX_SESSION_SHIFT_MM) -> list[str]:
        found = []
        if self.nmi_after < min_nmi:
            found.append(
                f"mutual information {self.nmi_after:.3f} < {min_nmi}: the scans may not show the same head"
            )
        if self.shift_mm > max_shift_mm:
            found.append(f"moved {self.shift_mm:.1f} mm from the scanner's alignment (> {max_shift_mm})")
        return found


def _rotation_deg(matrix: np.ndarray) -> float:
    u, _, vt = np.linalg.svd(matrix[:3, :3])
    rotation = u @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))))


def _mean_shift(world: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> float:
    points = np.argwhere(mask)
    if len(points) > 20000:
        points = points[:: len(points) // 20000]
    xyz = points @ affine[:3, :3].T + affine[:3, 3]
    moved = xyz @ world[:3, :3].T + world[:3, 3]
    return float(np.linalg.norm(moved - xyz, axis=1).mean())


def align_contrast(contrast: Image, reference: Image, reference_mask: np.ndarray, rigid: bool = True) -> SessionAlignment:
    """Align a (bias-corrected) contrast to its session's preprocessed T1w and brain mask."""
    fixed = prepare(reference, reference_mask)
    moving = prepare(contrast)
    world = session_alignment(fixed, moving, rigid=rigid)
    return SessionAlignment(
        world=world,
        nmi_scanner=alignment_nmi(fixed, moving, np.eye(4)),
        nmi_after=alignment_nmi(fixed, moving, world),
        shift_mm=_mean_shift(world, reference_mask, reference.affine),
        rotation_deg=_rotation_deg(world),
    )


def normalise_contrast(
    contrast: Image, world: np.ndarray, reference: Image, reference_mask: np.ndarray
) -> tuple[Image, Image]:
    """(the contrast normalised and brain-masked on its own grid, the same on the T1w's grid).

    The percentiles are read on the T1w's grid, inside its brain mask, so every contrast of a
    cohort is scaled by the same region as its T1w.
    """
    on_reference = apply_transform(contrast, Transform(world), reference.grid, "linear").data
    inside = on_reference[reference_mask]
    low, high = np.percentile(inside, [LOW_PERCENTILE, HIGH_PERCENTILE]) if inside.size else (0.0, 0.0)
    if high <= low:
        raise AtlasflowError("the contrast is constant inside the T1w's brain mask: nothing to align to")
    scale = 1.0 / (high - low)
    # The brain mask on the contrast's grid: the inverse of a rigid/affine map is exact.
    native_mask = apply_transform(
        reference.with_data(reference_mask.astype(np.float32)),
        Transform(np.linalg.inv(world)),
        contrast.grid,
        "linear",
    ).data > 0.5
    native = np.clip((np.asarray(contrast.data, np.float32) - low) * scale, 0, None) * native_mask
    preproc = np.clip((on_reference - low) * scale, 0, None) * reference_mask
    return contrast.with_data(native.astype(np.float32)), reference.with_data(preproc.astype(np.float32))


def run_align(
    contrast_path: str | Path,
    reference_path: str | Path,
    reference_mask_path: str | Path,
    out_native: str | Path,
    out_affine: str | Path,
    out_preproc: str | Path,
    out_metrics: str | Path,
    *,
    rigid: bool = True,
    n4: bool = True,
    min_nmi: float = MIN_SESSION_NMI,
    max_shift_mm: float = MAX_SESSION_SHIFT_MM,
) -> SessionAlignment:
    """The align step of one contrast of one session: files in, files out (see the module doc).

    A contrast whose alignment fails the QC (another head, or no overlap) raises
    :class:`AtlasflowError` naming the file, and nothing is written.
    """
    start = time.perf_counter()
    raw = to_ras(load_image(contrast_path))
    if n4:
        with tempfile.TemporaryDirectory() as tmp:
            save_image(raw, Path(tmp) / "in.nii.gz", dtype=np.float32)
            raw = bias_correct(Path(tmp) / "in.nii.gz", Path(tmp) / "n4.nii.gz")
    reference = load_image(reference_path)
    mask = load_mask(reference_mask_path, reference, reference_path)
    assert mask is not None
    found = align_contrast(raw, reference, mask, rigid=rigid)
    flags = found.flags(min_nmi, max_shift_mm)
    if flags:
        raise AtlasflowError(f"{contrast_path}: not aligned to the session's reference {reference_path}: {'; '.join(flags)}")
    try:
        native, preproc = normalise_contrast(raw, found.world, reference, mask)
    except AtlasflowError as exc:
        raise AtlasflowError(f"{contrast_path}: {exc}") from None
    save_image(native, out_native, dtype=np.float32)
    save_image(preproc, out_preproc, dtype=np.float32)
    write_itk_affine(found.world, out_affine)
    metrics = {
        "transform": "rigid" if rigid else "affine",
        "metric": "normalised mutual information (2 mm, reference brain)",
        "nmi_scanner": round(found.nmi_scanner, 4),
        "nmi_after": round(found.nmi_after, 4),
        "shift_mm": round(found.shift_mm, 3),
        "rotation_deg": round(found.rotation_deg, 3),
        "seconds": round(time.perf_counter() - start, 2),
        "qc_thresholds": {"min_nmi": min_nmi, "max_shift_mm": max_shift_mm},
        "qc_pass": True,
    }
    atomic_write_text(out_metrics, json.dumps(metrics, indent=2) + "\n")
    return found
