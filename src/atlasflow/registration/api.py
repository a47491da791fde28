"""Pairwise registration: one entry point, interchangeable backends, files ANTs can read.

:func:`register` aligns ``moving`` to ``fixed`` with the ``deep`` backend (atlasflow's networks,
:mod:`atlasflow.registration.engine`) or the ``ants`` backend (antspyx, the classical baseline), and returns a
:class:`Registration` whose transform is the same representation for both.
:func:`register_files` is the file-level wrapper used by the CLI and the workflow: it writes the
warped image, the ITK affine, the displacement field and its inverse, label-aware warped labels and
a metrics JSON judged by :mod:`atlasflow.registration.qc` (whose ``ncc``, ``dice_per_label``,
``QCThresholds`` and ``qc_flags`` are importable from here too).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlasflow.errors import AtlasflowError
from atlasflow.io.atomic import atomic_write_text
from atlasflow.io.images import Image, load_image, load_mask, save_image
from atlasflow.io.itk import (
    read_itk_affine,
    read_itk_displacement,
    save_transform,
    write_itk_displacement,
)
from atlasflow.registration.qc import (
    QCThresholds,
    add_verdict,
    dice_per_label,
    ncc,
    qc_flags,  # noqa: F401  (importable from here, as before)
)
from atlasflow.transforms import Transform, apply_transform, folding_fraction

BACKENDS = ("deep", "ants")
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Registration:
    """Result of one pairwise registration (fixed -> moving pull-back, on the fixed grid)."""

    transform: Transform
    inverse_displacement: Image | None
    velocity: Image | None
    seconds: float
    backend: str
    coarse_velocity: Image | None = None  # deep: the velocity on the network's grid (see register_deep)

    @property
    def field(self) -> Image:
        """The velocity, or for ANTs (which gives none) the displacement, its first-order stand-in
        (v ~ u when small): the atlas shape update works the same way for both backends."""
        return self.velocity if self.velocity is not None else self.transform.displacement


# ------------------------------------------------------------------------------ ANTs conversion


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
    lps = np.eye(4)
    spacing = np.asarray(ants_image.spacing, float)
    lps[:3, :3] = np.asarray(ants_image.direction, float) * spacing
    lps[:3, 3] = ants_image.origin
    return Image(np.asarray(ants_image.numpy(), np.float32), _FLIP @ lps)


def _register_ants(
    fixed: Image,
    moving: Image,
    fixed_mask: np.ndarray | None,
    moving_mask: np.ndarray | None,
    type_of_transform: str,
    seed: int,
) -> Registration:
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
            displacement, inverse = Image(zeros, fixed.affine.copy()), Image(zeros.copy(), fixed.affine.copy())
    return Registration(Transform(affine, displacement), inverse, None, seconds, "ants")


# ------------------------------------------------------------------------------------- public


def register(
    fixed: Image,
    moving: Image,
    *,
    backend: str = "deep",
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
    cost_mask: np.ndarray | None = None,
    refine_steps: int = 0,
    model_path: str | None = None,
    device: str = "cpu",
    ants_type: str = "SyN",
    affine_only: bool = False,
    seed: int = 0,
    fixed_labels: np.ndarray | None = None,
    moving_labels: np.ndarray | None = None,
    label_weight: float = 1.0,
    label_term: str = "dice",
    init_affine: np.ndarray | None = None,
    init_velocity: Image | None = None,
    affine_steps: int | None = None,
    inverse: bool = True,
    full_velocity: bool = True,
) -> Registration:
    """Register ``moving`` to ``fixed``; the transform maps fixed points to moving points.

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
    if backend == "ants":
        if init_velocity is not None:
            raise AtlasflowError("init_velocity needs the deep backend; ANTs starts from its own fields")
        kind = "Affine" if affine_only else ants_type
        if cost_mask is not None:
            # ANTs has no separate cost mask: the excluded voxels leave its fixed mask.
            keep = np.ones(fixed.data.shape, bool) if fixed_mask is None else fixed_mask > 0
            fixed_mask = keep & ~(np.asarray(cost_mask) > 0)
        return _register_ants(fixed, moving, fixed_mask, moving_mask, kind, seed)
    if backend == "deep":
        from atlasflow.registration.engine import register_deep

        res = register_deep(
            fixed,
            moving,
            fixed_mask=fixed_mask,
            moving_mask=moving_mask,
            cost_mask=cost_mask,
            model_path=model_path,
            refine_steps=refine_steps,
            affine_only=affine_only,
            device=device,
            seed=seed,
            fixed_labels=fixed_labels,
            moving_labels=moving_labels,
            label_weight=label_weight,
            label_term=label_term,
            init_affine=init_affine,
            init_velocity=init_velocity,
            affine_network=init_affine is None,
            inverse=inverse,
            full_velocity=full_velocity,
            **({} if affine_steps is None else {"affine_steps": affine_steps}),
        )
        return Registration(
            res.transform, res.inverse_displacement, res.velocity, res.seconds, "deep", res.coarse_velocity
        )
    raise AtlasflowError(f"unknown registration backend {backend!r}; choose one of {', '.join(BACKENDS)}")


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
    **options,
) -> dict:
    """Register two files and write every output named in ``outputs``; returns the metrics.

    The metrics carry ``qc_flags`` (reasons to distrust the result, by ``thresholds``) and
    ``qc_pass``; a flagged registration still writes its outputs so a person can inspect it.
    """
    fixed = load_image(fixed_path)
    moving = load_image(moving_path)
    fmask = load_mask(fixed_mask, fixed, fixed_path)
    mmask = load_mask(moving_mask, moving, moving_path)
    cmask = load_image(cost_mask).data > 0 if cost_mask else None
    reg = register(fixed, moving, fixed_mask=fmask, moving_mask=mmask, cost_mask=cmask, **options)
    warped = apply_transform(moving, reg.transform, fixed.grid, "linear")
    before = apply_transform(moving, Transform.identity(), fixed.grid, "linear")
    region = fmask if fmask is not None else (fixed.data > 0)
    metrics: dict = {
        "backend": reg.backend,
        "seconds": round(reg.seconds, 3),
        "folding_fraction": folding_fraction(reg.transform.displacement, region),
        "ncc_before": ncc(fixed.data, before.data, region),
        "ncc_after": ncc(fixed.data, warped.data, region),
        "fixed": str(fixed_path),
        "moving": str(moving_path),
    }
    save_image(warped, outputs.warped, dtype=np.float32)
    save_transform(reg.transform, outputs.affine, outputs.warp)
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
