"""Pairwise registration: one entry point, interchangeable backends, files ANTs can read.

:func:`register` aligns ``moving`` to ``fixed`` with the ``deep`` backend (atlasflow's networks,
:mod:`atlasflow.registration.engine`) or the ``ants`` backend (antspyx, the classical baseline,
:mod:`atlasflow.registration.ants`), and returns a :class:`Registration` whose transform is the
same representation for both. How it registers is a
:class:`~atlasflow.registration.options.RegistrationOptions`.
:func:`register_and_measure` registers, warps the moving image onto the fixed grid and measures
the result (folding fraction, NCC before and after): the one path under the ``register``
command, the atlas members and the longitudinal pairs, each of which adds its own outputs.
:func:`register_files` is the file-level wrapper used by the CLI and the workflow: it writes the
warped image, the ITK affine, the displacement field and its inverse, label-aware warped labels and
a metrics JSON judged by :mod:`atlasflow.registration.qc` (whose ``ncc``, ``dice_per_label``,
``QCThresholds`` and ``qc_flags`` are importable from here too).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from atlasflow.errors import AtlasflowError
from atlasflow.io.atomic import atomic_write_text
from atlasflow.io.images import Image, load_image, load_mask, save_image
from atlasflow.io.itk import save_transform, write_itk_displacement

# to_ants and from_ants are also read from here (preprocessing).
from atlasflow.registration.ants import from_ants, register_ants, to_ants  # noqa: F401
from atlasflow.registration.options import BACKENDS, RegistrationOptions
from atlasflow.registration.qc import (  # noqa: F401  (qc_flags: importable from here, as before)
    SAME_CONTRAST_AGREEMENT,
    QCThresholds,
    add_verdict,
    dice_per_label,
    intensity_agreement,
    ncc,
    nmi,
    qc_flags,
)
from atlasflow.transforms import Transform, apply_transform, folding_fraction


@dataclass
class Registration:
    """Result of one pairwise registration (fixed -> moving pull-back, on the fixed grid)."""

    transform: Transform
    inverse_displacement: Image | None
    velocity: Image | None
    seconds: float
    backend: str
    # deep: the velocity on the network's grid (see register_deep)
    coarse_velocity: Image | None = None

    @property
    def field(self) -> Image:
        """The velocity, or for ANTs (which gives none) the displacement, its first-order stand-in
        (v ~ u when small): the atlas shape update works the same way for both backends."""
        return self.velocity if self.velocity is not None else self.transform.displacement


# ------------------------------------------------------------------------------------- public


def register(
    fixed: Image,
    moving: Image,
    options: RegistrationOptions | None = None,
    *,
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
    cost_mask: np.ndarray | None = None,
    fixed_labels: np.ndarray | None = None,
    moving_labels: np.ndarray | None = None,
    init_affine: np.ndarray | None = None,
    init_velocity: Image | None = None,
    **changes: Any,
) -> Registration:
    """Register ``moving`` to ``fixed``; the transform maps fixed points to moving points.

    ``options`` say how (``changes``: keyword changes to its fields, as in
    ``register(fixed, moving, backend="ants", ants_type="Affine")``).
    ``fixed_labels``/``moving_labels`` (integer maps of regions that correspond, for example the
    tumour at two timepoints) steer the deep backend's instance optimisation; ANTs ignores them.
    ``init_affine`` (fixed world -> moving world, deep backend) is a known affine alignment: the
    affine network is skipped and ``affine_steps`` (default: the engine's) of test-time
    optimisation refine it. ANTs ignores it and aligns from scratch. ``inverse=False`` skips the
    deep backend's inverse field (``inverse_displacement`` is then None), ``full_velocity=False``
    its velocity on the fixed grid (``velocity`` is then None; ``coarse_velocity`` holds it).
    ``init_velocity`` (deep backend only) is a field to continue from, for example an earlier
    result's ``coarse_velocity``.
    """
    opts = RegistrationOptions.of(options, **changes)
    if opts.backend == "ants":
        if init_velocity is not None:
            raise AtlasflowError(
                "init_velocity needs the deep backend; ANTs starts from its own fields"
            )
        kind = "Affine" if opts.affine_only else opts.ants_type
        if cost_mask is not None:
            # ANTs has no separate cost mask: the excluded voxels leave its fixed mask.
            keep = np.ones(fixed.data.shape, bool) if fixed_mask is None else fixed_mask > 0
            fixed_mask = keep & ~(np.asarray(cost_mask) > 0)
        transform, inverse, seconds = register_ants(
            fixed, moving, fixed_mask, moving_mask, kind, opts.seed
        )
        return Registration(transform, inverse, None, seconds, "ants")
    if opts.backend == "deep":
        from atlasflow.registration.engine import register_deep

        res = register_deep(
            fixed,
            moving,
            opts,
            fixed_mask=fixed_mask,
            moving_mask=moving_mask,
            cost_mask=cost_mask,
            fixed_labels=fixed_labels,
            moving_labels=moving_labels,
            init_affine=init_affine,
            init_velocity=init_velocity,
            affine_network=init_affine is None,
        )
        return Registration(
            res.transform,
            res.inverse_displacement,
            res.velocity,
            res.seconds,
            "deep",
            res.coarse_velocity,
        )
    raise AtlasflowError(
        f"unknown registration backend {opts.backend!r}; choose one of {', '.join(BACKENDS)}"
    )


@dataclass
class Measured:
    """A registration, the moving image warped by it onto the fixed grid, and its numbers."""

    registration: Registration
    warped: Image  # moving on the fixed grid through the transform (linear)
    unregistered: Image | None  # moving on the fixed grid as it lies (None: not asked for)
    metrics: dict  # backend, seconds, folding_fraction, ncc_before (with unregistered), ncc_after

    def save(self, warped: str | Path, affine: str | Path, warp: str | Path) -> None:
        """Write the warped image (float32) and the transform (ITK affine + displacement)."""
        save_image(self.warped, warped, dtype=np.float32)
        save_transform(self.registration.transform, affine, warp)


def register_and_measure(
    fixed: Image,
    moving: Image,
    options: RegistrationOptions | None = None,
    *,
    before: bool = True,
    **inputs: Any,
) -> Measured:
    """:func:`register` (``inputs``: its masks, labels and starting transforms), then the moving
    image warped onto the fixed grid and the result measured inside the fixed mask (else where
    the fixed image is > 0): the folding fraction of the displacement
    (:func:`~atlasflow.transforms.folding_fraction`), the NCC after and, with ``before``, the NCC
    of the unregistered pair."""
    reg = register(fixed, moving, options, **inputs)
    warped = apply_transform(moving, reg.transform, fixed.grid, "linear")
    fixed_mask = inputs.get("fixed_mask")
    region = fixed_mask if fixed_mask is not None else (fixed.data > 0)
    metrics: dict = {
        "backend": reg.backend,
        "seconds": round(reg.seconds, 3),
        "folding_fraction": folding_fraction(reg.transform.displacement, region),
    }
    unregistered = None
    if before:
        unregistered = apply_transform(moving, Transform.identity(), fixed.grid, "linear")
        metrics["ncc_before"] = ncc(fixed.data, unregistered.data, region)
        metrics["nmi_before"] = round(nmi(fixed.data, unregistered.data, region), 4)
    metrics["ncc_after"] = ncc(fixed.data, warped.data, region)
    metrics["nmi_after"] = round(nmi(fixed.data, warped.data, region), 4)
    # one contrast or two: the NCC limits hold only for one (registration.qc.qc_flags)
    agreement = intensity_agreement(fixed.data, warped.data, region)
    if unregistered is not None:
        agreement = max(agreement, intensity_agreement(fixed.data, unregistered.data, region))
    metrics["intensity_agreement"] = round(agreement, 3)
    metrics["same_contrast"] = bool(agreement >= SAME_CONTRAST_AGREEMENT)
    if RegistrationOptions.of(options).cross_contrast:
        # the caller knows the pair shows two contrasts (a FLAIR onto a T1w template), whatever
        # the intensities say (the demo's FLAIR rises with the T1w's): judged by NMI
        metrics["cross_contrast"] = True
        metrics["same_contrast"] = False
    return Measured(reg, warped, unregistered, metrics)


class FoundMask(NamedTuple):
    """What a mask finder (``find_mask`` of :func:`register_files`) found on a scan."""

    mask: np.ndarray | None  # None: the engine uses the head it finds
    how: str  # recorded in the metrics
    # the scan's contrast class (for example "T1-like", "FLAIR-like"), when the finder read one
    contrast: str | None = None


@dataclass
class RegisterOutputs:
    """Where :func:`register_files` writes; ``None`` skips that file."""

    warped: Path
    affine: Path
    warp: Path
    inverse_warp: Path | None = None
    warped_labels: Path | None = None
    metrics: Path | None = None
    velocity: Path | None = None

    @classmethod
    def in_dir(cls, out_dir: str | Path, labels: bool = False) -> RegisterOutputs:
        d = Path(out_dir)
        return cls(
            warped=d / "warped.nii.gz",
            affine=d / "affine.mat",
            warp=d / "warp.nii.gz",
            inverse_warp=d / "inverse_warp.nii.gz",
            warped_labels=d / "warped_labels.nii.gz" if labels else None,
            metrics=d / "metrics.json",
        )


def register_files(
    fixed_path: str | Path,
    moving_path: str | Path,
    outputs: RegisterOutputs,
    *,
    moving_labels: str | Path | None = None,
    fixed_labels: str | Path | None = None,
    fixed_mask: str | Path | None = None,
    moving_mask: str | Path | None = None,
    cost_mask: str | Path | None = None,
    thresholds: QCThresholds | None = None,
    options: RegistrationOptions | None = None,
    find_mask: Callable[[Image], FoundMask] | None = None,
    **changes: Any,
) -> dict:
    """Register two files and write every output named in ``outputs``; returns the metrics.

    A scan without a mask file gets the head the engine finds, or, with ``find_mask`` (``atlasflow
    register``'s default: :func:`atlasflow.preprocess.reference.find_brain`, the MNI152 brain
    carried onto the scan), what that returns (:class:`FoundMask`): how each was found is
    recorded as ``fixed_mask``/``moving_mask``, with ``brain_mask_seconds`` apart from the
    registration's ``seconds``. When the finder read both scans' contrast classes
    (``fixed_contrast``/``moving_contrast`` in the metrics) and they differ, the pair is
    registered as ``cross_contrast`` (no local-correlation refinement, judged by NMI) whatever
    the options say: on open_ms same-session T1W/T2W -> FLAIR pairs, 30 refinement steps moved
    the result 2.4-2.8 mm from the authors' alignment
    (benchmarks/results/open_ms_points_refine30.md). On raw IXI heads the networks alone score
    Dice 0.562 with head masks and 0.615 with found brains, 0.618 with the brains of the label
    maps (benchmarks/results/register_raw_v2.md).

    ``moving_labels`` are warped (label-aware) and, with ``fixed_labels``, scored by their mean
    Dice. The metrics carry ``qc_flags`` (reasons to distrust the result, by ``thresholds``) and
    ``qc_pass``; a flagged registration still writes its outputs so a person can inspect it.
    """
    fixed = load_image(fixed_path)
    moving = load_image(moving_path)
    fmask = load_mask(fixed_mask, fixed, fixed_path)
    mmask = load_mask(moving_mask, moving, moving_path)
    found: dict[str, Any] = {}
    opts = RegistrationOptions.of(options, **changes)
    if find_mask is not None and (fmask is None or mmask is None):
        start = time.perf_counter()
        if fmask is None:
            fmask, found["fixed_mask"], found["fixed_contrast"] = find_mask(fixed)
        if mmask is None:
            mmask, found["moving_mask"], found["moving_contrast"] = find_mask(moving)
        found["brain_mask_seconds"] = round(time.perf_counter() - start, 3)
        classes = (found.get("fixed_contrast"), found.get("moving_contrast"))
        if None not in classes and classes[0] != classes[1]:
            opts = replace(opts, cross_contrast=True)
    cmask = load_image(cost_mask).data > 0 if cost_mask else None
    measured = register_and_measure(
        fixed,
        moving,
        opts,
        fixed_mask=fmask,
        moving_mask=mmask,
        cost_mask=cmask,
    )
    reg = measured.registration
    metrics = {**measured.metrics, **found, "fixed": str(fixed_path), "moving": str(moving_path)}
    measured.save(outputs.warped, outputs.affine, outputs.warp)
    if outputs.inverse_warp is not None and reg.inverse_displacement is not None:
        write_itk_displacement(reg.inverse_displacement, outputs.inverse_warp)
    if outputs.velocity is not None:
        save_image(reg.field, outputs.velocity, dtype=np.float32)
    if moving_labels:
        labels = load_image(moving_labels, dtype=None)
        warped_labels = apply_transform(labels, reg.transform, fixed.grid, "nearest")
        if outputs.warped_labels is not None:
            save_image(warped_labels, outputs.warped_labels)
        if fixed_labels:
            target = load_image(fixed_labels, dtype=None).data
            per_label = dice_per_label(warped_labels.data, target)
            metrics["dice_mean"] = float(np.mean(list(per_label.values()))) if per_label else None
    add_verdict(metrics, thresholds or QCThresholds())
    if outputs.metrics is not None:
        atomic_write_text(outputs.metrics, json.dumps(metrics, indent=2) + "\n")
    return metrics
