"""Synthetic cohorts: the embedded demo cohort and the ground truth to score the pipeline against.

Everything is made from material nilearn ships inside its package (no download): the skull-stripped
MNI152 2009 T1 brain at 1 mm, its grey- and white-matter probability maps and its brain mask.

Cross-sectional ("control") subjects are the template pushed through a random smooth diffeomorphism
(a stationary velocity field integrated by scaling and squaring) and a random affine, seen by a
scanner with its own grid and header orientation, a smooth multiplicative bias field and Rician
noise. Longitudinal ("tumour") subjects add a lesion grown from a white-matter seed: the lesion and
the tissue around it are moved by the flow of a radial velocity field (:class:`TumourModel`), so
the tumour at every timepoint is the image of the baseline tumour under a known diffeomorphism and
the Jacobian of that map integrates to the tumour's volume change. Follow-up scans also get a
small change of head pose. Beside every T1w the cohort may hold other contrasts (T2w, FLAIR:
:mod:`~atlasflow.synth.contrasts`) of the same anatomy, each on its own grid, moved by a known
small rigid map relative to the T1w.

Point-mapping conventions (the package's :class:`~atlasflow.transforms.Transform`: fixed grid points
to moving world points, pull-back, as ITK/ANTs), all in world RAS millimetres:

* template -> subject (``..._from-T1w_to-template_mode-image_xfm``, fixed = template grid):
  ``y = P_t(Phi_t(A (x + u(x))))``, ``u`` the random diffeomorphism, ``A`` the subject affine,
  ``Phi_t`` the tumour flow at session t (identity for controls), ``P_t`` the head pose of session
  t (identity at baseline and for controls); stored as ``P_t A (x + W(x))``.
* follow-up -> baseline (``..._from-T1w_to-baseline_mode-image_xfm``, fixed = baseline scan grid):
  ``y_t = P_t(Phi_t(Phi_1^-1(x))) = P_t(x + m(x))``, ``m`` the mass effect between the sessions.

The text ``assets/truth_README.md``, written to ``truth/README.md`` with every cohort, spells this
out next to the files. The pieces: :mod:`~atlasflow.synth.plan` (subjects, dates, names, random
streams), :mod:`~atlasflow.synth.source` (the nilearn material), :mod:`~atlasflow.synth.fields`
(random fields and deformations), :mod:`~atlasflow.synth.tumour` (the lesion),
:mod:`~atlasflow.synth.contrasts` (the other contrasts' appearance) and
:mod:`~atlasflow.synth.tables` (the text files); this module draws, renders and writes subjects.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from atlasflow.cohort.columns import CONTRAST_COLUMNS
from atlasflow.io.images import Grid, Image, save_image
from atlasflow.io.itk import save_transform
from atlasflow.synth.contrasts import (
    APPEARANCES,
    contrast_template,
    draw_alignment,
    grid_spacing,
    render_contrast,
)
from atlasflow.synth.fields import exp_velocity, random_affine, random_velocity, smooth_field
from atlasflow.synth.plan import (
    DEMO_CONTRASTS,
    ORIENTATIONS,
    STREAM_ANATOMY,
    STREAM_SCAN,
    STREAM_TUMOUR,
    SubjectPlan,
    anat_path,
    check_arguments,
    contrast_path,
    contrast_rng,
    demo_manifest,
    plan_cohort,
    subject_rng,
    truth_prefix,
)
from atlasflow.synth.source import Source, load_source, load_tissue_channels, resample_source
from atlasflow.synth.tables import TUMOUR_LABEL, write_tables
from atlasflow.synth.tumour import LesionView, TumourModel
from atlasflow.transforms import Transform, apply_transform, sample_voxels, world_coordinates

# demo_manifest (from the torch-free plan) stays importable here, beside make_demo_cohort.
__all__ = ["demo_manifest", "make_demo_cohort", "oriented_grid"]


# ------------------------------------------------------------------------------------- grids


def oriented_grid(ras_grid: Grid, axcodes: str) -> Grid:
    """The same voxels as ``ras_grid`` (whose axes run R, A, S) stored in another axis order/direction."""
    source = nib.orientations.axcodes2ornt(("R", "A", "S"))
    target = nib.orientations.axcodes2ornt(tuple(axcodes))
    transform = nib.orientations.ornt_transform(source, target)
    shape = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(transform):
        shape[int(new_axis)] = ras_grid.shape[axis]
    # inv_ornt_aff maps voxel indices of the reoriented array to indices of the original one.
    affine = ras_grid.affine @ nib.orientations.inv_ornt_aff(transform, ras_grid.shape)
    return Grid(tuple(shape), affine)


def _box_grid(lo: np.ndarray, hi: np.ndarray, spacing: float | Sequence[float]) -> Grid:
    """RAS grid of voxel size ``spacing`` (one, or one per axis) whose voxel centres cover the
    world box [lo, hi]."""
    spacing = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing).astype(int) + 1)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = lo
    return Grid(shape, affine)


# ------------------------------------------------------------------------------------- rendering


@dataclass
class _Subject:
    """Everything random about one subject; sessions are rendered from it."""

    plan: SubjectPlan
    affine: np.ndarray  # template -> subject (baseline) world
    forward_warp: np.ndarray  # u on the template grid, world mm
    inverse_warp: np.ndarray  # its inverse on the template grid
    poses: list[np.ndarray]  # head pose per session (baseline world -> session world)
    tumour: TumourModel | None
    scan: Grid
    params: dict


@dataclass
class _Session:
    t1w: Image
    dseg: Image
    tumour_mask: Image | None
    template_to_subject: Transform  # the truth: fixed = template grid, moving = this scan


def _scan_to_template(
    source: Source, subject: _Subject, t: int, pose: np.ndarray, grid: Grid
) -> tuple[Transform, tuple | None]:
    """The map from the points of ``grid`` to the template at session ``t`` of ``subject``, seen
    by a scanner whose world is the baseline world moved by ``pose``; and the tumour's polar
    coordinates (:meth:`TumourModel.normalised`) of the grid's points (None without a tumour)."""
    tgrid, affine = source.template_grid, subject.affine
    tumour = None if subject.tumour is None else (subject.tumour, subject.tumour.times[t])
    pose_linear, affine_linear = pose[:3, :3], affine[:3, :3]
    scan_points = world_coordinates(grid)
    baseline_points = scan_points @ np.linalg.inv(pose)[:3, :3].T + np.linalg.inv(pose)[:3, 3]

    # Scan point y -> healthy baseline point h = b + e(b), b = P^-1 y (e = 0 without a tumour).
    polar = None
    if tumour is not None:
        model, tau = tumour
        polar = model.normalised(baseline_points)
        healthy = model.flow(baseline_points, -tau, polar)
        first = (healthy - baseline_points) @ pose_linear.T
    else:
        first = np.zeros(grid.shape + (3,), np.float32)

    # Scan point -> template point: x = A^-1 h + w(A^-1 h) written as (P A)^-1 (y + D(y)).
    to_template_affine = np.linalg.inv(pose @ affine)
    warp_at = apply_transform(
        Image(subject.inverse_warp, tgrid.affine),
        Transform(to_template_affine, Image(first, grid.affine)),
        grid,
    ).data
    displacement = first + warp_at @ (pose_linear @ affine_linear).T
    transform = Transform(to_template_affine, Image(displacement.astype(np.float32), grid.affine))
    return transform, polar


def _lesion(
    subject: _Subject, t: int, pose: np.ndarray, grid: Grid, polar: tuple, rng: np.random.Generator
) -> LesionView:
    """The tumour of session ``t`` on ``grid`` (scanner world = baseline moved by ``pose``); its
    texture is the first draw of ``rng``, in baseline world."""
    model = subject.tumour
    baseline_grid = Grid(grid.shape, np.linalg.inv(pose) @ grid.affine)
    texture = smooth_field(rng, baseline_grid, 1, (6.0, 15.0), 1.0, 8)[..., 0]
    return model.view(polar[0], model.times[t], texture)


def _render_session(
    source: Source, subject: _Subject, t: int, rng: np.random.Generator
) -> _Session:
    """Session ``t`` of ``subject``: the template seen through the subject's maps, the lesion,
    then the scanner."""
    tgrid, scan_grid, affine = source.template_grid, subject.scan, subject.affine
    forward_warp, pose = subject.forward_warp, subject.poses[t]
    subject_to_template, polar = _scan_to_template(source, subject, t, pose, scan_grid)

    # Template point -> scan point: y = P (Phi(A (x + u(x)))) = P A (x + W(x)).
    template_warp = forward_warp
    if subject.tumour is not None:
        model, tau = subject.tumour, subject.tumour.times[t]
        affine_linear = affine[:3, :3]
        subject_points = (world_coordinates(tgrid) + forward_warp) @ affine_linear.T + affine[:3, 3]
        mass = model.flow(subject_points, tau) - subject_points
        template_warp = forward_warp + mass @ np.linalg.inv(affine_linear).T
    template_to_subject = Transform(
        pose @ affine, Image(template_warp.astype(np.float32), tgrid.affine)
    )

    anatomy, dseg = resample_source(source, subject_to_template, scan_grid)
    anatomy /= source.wm_level

    mask = None
    if subject.tumour is not None:
        lesion = _lesion(subject, t, pose, scan_grid, polar, rng)
        core, texture, inside = lesion.core, lesion.texture, lesion.inside
        tumour = core * 0.35 * (1 + 0.15 * texture) + (1 - core) * 1.25 * (1 + 0.06 * texture)
        anatomy = (1 - inside) * anatomy + inside * tumour
        mask = lesion.mask
        dseg[mask] = TUMOUR_LABEL

    # Scanner: contrast, gain, smooth bias fixed to the scanner frame, Rician noise.
    bias = np.exp(smooth_field(rng, scan_grid, 1, (150.0, 400.0), 0.12, 6)[..., 0])
    params = subject.params
    signal = params["gain"] * np.clip(anatomy, 0, None) ** params["gamma"] * bias
    sigma = params["noise"] * params["gain"]
    real = signal + sigma * rng.standard_normal(signal.shape)
    imag = sigma * rng.standard_normal(signal.shape)
    t1w = np.clip(np.rint(np.sqrt(real**2 + imag**2)), 0, 65535).astype(np.uint16)

    return _Session(
        t1w=Image(t1w, scan_grid.affine.copy()),
        dseg=Image(dseg, scan_grid.affine.copy()),
        tumour_mask=None if mask is None else Image(mask.astype(np.uint8), scan_grid.affine.copy()),
        template_to_subject=template_to_subject,
    )


# ------------------------------------------------------------------------------------- the cohort


def _anatomy_draws(
    source: Source, plan: SubjectPlan, seed: int
) -> tuple[np.ndarray, dict, np.ndarray, np.random.Generator]:
    """One subject's random affine (with its parameters) and velocity field, from its own stream
    (returned too: the scanner's draws follow on it)."""
    brain_centre = 0.5 * (source.brain_box[0] + source.brain_box[1])
    rng = subject_rng(seed, plan.index, STREAM_ANATOMY)
    affine, affine_params = random_affine(rng, brain_centre, 10.0, (0.9, 1.1), 10.0)
    return affine, affine_params, random_velocity(rng, source.template_grid), rng


def _scan_grid(
    source: Source,
    maps: Sequence[np.ndarray],
    spacing: float | Sequence[float],
    orientation: str,
    rng: np.random.Generator,
) -> Grid:
    """Scanner grid covering the brain under every template->scan affine in ``maps``."""
    lo, hi = source.brain_box
    margin = 12.0
    corners = np.array(
        [
            [x, y, z]
            for x in (lo[0] - margin, hi[0] + margin)
            for y in (lo[1] - margin, hi[1] + margin)
            for z in (lo[2] - margin, hi[2] + margin)
        ]
    )
    mapped = np.concatenate([corners @ m[:3, :3].T + m[:3, 3] for m in maps])
    extra = rng.uniform(0.0, 8.0, (2, 3))
    ras = _box_grid(mapped.min(0) - extra[0], mapped.max(0) + extra[1], spacing)
    return oriented_grid(ras, orientation)


def _quantised(displacement: np.ndarray) -> np.ndarray:
    """Round to 1/1024 mm: far below any error that matters, and the files compress much better."""
    return (np.round(np.asarray(displacement, np.float64) * 1024.0) / 1024.0).astype(np.float32)


def _save_transform(transform: Transform, prefix: str) -> None:
    quantised = Transform(
        transform.affine,
        Image(_quantised(transform.displacement.data), transform.displacement.affine),
    )
    save_transform(quantised, f"{prefix}_xfm.mat", f"{prefix}_xfm.nii.gz")


def _draw_subject(
    source: Source,
    plan: SubjectPlan,
    seed: int,
    spacing_mm: float,
    anatomy: tuple[np.ndarray, dict, np.ndarray, np.random.Generator],
) -> _Subject:
    """One subject's anatomy (its :func:`_anatomy_draws`, the velocity possibly centred, see
    :func:`make_demo_cohort`), tumour and scanner."""
    tgrid = source.template_grid
    brain_centre = 0.5 * (source.brain_box[0] + source.brain_box[1])
    affine, affine_params, velocity, rng = anatomy
    forward_warp, inverse_warp = exp_velocity(velocity, source.template_grid)
    params = {
        "group": plan.group,
        "orientation": plan.orientation,
        "affine_template_to_subject": np.round(affine, 6).tolist(),
        **affine_params,
        "gain": float(rng.uniform(900.0, 1500.0)),
        "gamma": float(rng.uniform(0.85, 1.15)),
        "noise": float(rng.uniform(0.015, 0.03)),
        "max_warp_mm": round(float(np.linalg.norm(forward_warp, axis=-1).max()), 3),
    }
    poses = [np.eye(4)]
    tumour = None
    if plan.longitudinal:
        rng = subject_rng(seed, plan.index, STREAM_TUMOUR)
        head_centre = affine[:3, :3] @ brain_centre + affine[:3, 3]
        for _ in plan.sessions[1:]:
            poses.append(random_affine(rng, head_centre, 3.0, (1.0, 1.0), 3.0)[0])
        seed_point = source.tumour_seeds[int(rng.integers(len(source.tumour_seeds)))]
        seed_vox = np.linalg.solve(tgrid.affine, np.append(seed_point, 1.0))[:3]
        seed_warp = sample_voxels(forward_warp, seed_vox[None])[0]
        centre = affine[:3, :3] @ (seed_point + seed_warp) + affine[:3, 3]
        tumour = TumourModel.random(rng, centre)
        rate = float(rng.uniform(0.004, 0.007))  # flow time per day
        start = float(rng.uniform(1.2, 1.5))
        tumour.times = [start + rate * (d - plan.dates[0]).days for d in plan.dates]
        params["tumour"] = {
            "centre_template_mm": np.round(seed_point, 3).tolist(),
            "centre_baseline_mm": np.round(centre, 3).tolist(),
            "source_radius_mm": tumour.radius_mm,
            "flow_time_per_day": rate,
            "flow_times": tumour.times,
            "head_poses": [np.round(p, 6).tolist() for p in poses],
        }
    scan = _scan_grid(
        source,
        [p @ affine for p in poses],
        spacing_mm,
        plan.orientation,
        subject_rng(seed, plan.index, STREAM_SCAN),
    )
    return _Subject(plan, affine, forward_warp, inverse_warp, poses, tumour, scan, params)


def _write_contrasts(
    out_dir: Path,
    source: Source,
    subject: _Subject,
    t: int,
    seed: int,
    spacing_mm: float,
    contrasts: Sequence[str],
) -> dict:
    """Render and write session ``t``'s scans of ``contrasts`` with their truth; return their
    parameters.

    Each contrast's world is the T1w's moved by a small rigid map ``R`` (the scanner's view of a
    head that moved between the acquisitions), so it sees the baseline through ``R P_t`` where the
    T1w sees it through ``P_t``; everything else about the anatomy is the T1w's.
    """
    plan = subject.plan
    session, pose = plan.sessions[t], subject.poses[t]
    brain_centre = 0.5 * (source.brain_box[0] + source.brain_box[1])
    to_t1w = pose @ subject.affine
    head_centre = to_t1w[:3, :3] @ brain_centre + to_t1w[:3, 3]
    channels = load_tissue_channels(float(spacing_mm))
    prefix = str(out_dir / truth_prefix(plan.subject, session))
    params: dict[str, dict] = {}
    for column in contrasts:
        rng = contrast_rng(seed, plan.index, t, column)
        rigid, rigid_params = draw_alignment(rng, head_centre)  # T1w world -> contrast world
        contrast_pose = rigid @ pose
        number = CONTRAST_COLUMNS.index(column) + 1
        orientation = ORIENTATIONS[(plan.index + number) % len(ORIENTATIONS)]
        spacing = grid_spacing(column, spacing_mm)
        grid = _scan_grid(source, [contrast_pose @ subject.affine], spacing, orientation, rng)
        to_template, polar = _scan_to_template(source, subject, t, contrast_pose, grid)
        values = apply_transform(channels, to_template, grid).data
        lesion = None
        if subject.tumour is not None:
            # The T1w's lesion texture: the first draw of its session's stream, replayed from a
            # fresh generator (the T1w's own is not touched) and evaluated on this grid.
            texture_rng = subject_rng(seed, plan.index, STREAM_SCAN + 1 + t)
            lesion = _lesion(subject, t, contrast_pose, grid, polar, texture_rng)
        scan = render_contrast(column, values, grid, lesion, rng)
        save_image(
            scan.image, out_dir / contrast_path(plan.subject, session, column), dtype=np.uint16
        )
        suffix = APPEARANCES[column].suffix
        save_image(scan.dseg, f"{prefix}_space-{suffix}_dseg.nii.gz", dtype=np.uint8)
        save_transform(Transform(rigid), f"{prefix}_from-{suffix}_to-T1w_mode-image_xfm.mat", None)
        params[column] = {
            "t1w_to_contrast_world": np.round(rigid, 6).tolist(),
            **rigid_params,
            "spacing_mm": list(spacing),
            "orientation": orientation,
            **scan.params,
        }
    return params


def _write_subject(
    out_dir: Path,
    source: Source,
    subject: _Subject,
    seed: int,
    spacing_mm: float,
    contrasts: Sequence[str],
) -> tuple[list[dict], dict]:
    """Render and write every session of one subject with its truth; return its volume rows and
    the parameters of its other contrasts per session."""
    plan, tumour = subject.plan, subject.tumour
    volume_rows: list[dict] = []
    contrast_params: dict[str, dict] = {}
    for t, session in enumerate(plan.sessions):
        rendered = _render_session(
            source, subject, t, subject_rng(seed, plan.index, STREAM_SCAN + 1 + t)
        )
        if contrasts:
            contrast_params[f"ses-{session}"] = _write_contrasts(
                out_dir, source, subject, t, seed, spacing_mm, contrasts
            )
        save_image(rendered.t1w, out_dir / anat_path(plan.subject, session, "T1w"), dtype=np.uint16)
        save_image(
            rendered.dseg, out_dir / anat_path(plan.subject, session, "dseg"), dtype=np.uint8
        )
        prefix = str(out_dir / truth_prefix(plan.subject, session))
        _save_transform(rendered.template_to_subject, f"{prefix}_from-T1w_to-template_mode-image")
        if tumour is None:
            continue
        save_image(
            rendered.tumour_mask,
            out_dir / anat_path(plan.subject, session, "label-tumor_mask"),
            dtype=np.uint8,
        )
        if t > 0:
            # flow(tau_t) o flow(tau_1)^-1 = flow(tau_t - tau_1): exact, on the baseline grid.
            points = world_coordinates(subject.scan)
            mass = tumour.flow(points, tumour.times[t] - tumour.times[0]) - points
            _save_transform(
                Transform(subject.poses[t], Image(mass, subject.scan.affine)),
                f"{prefix}_from-T1w_to-baseline_mode-image",
            )
        voxel_mm3 = float(abs(np.linalg.det(subject.scan.affine[:3, :3])))
        volume = float(rendered.tumour_mask.data.sum()) * voxel_mm3
        true_volume = tumour.lesion_volume(tumour.times[t])
        if t == 0:
            baseline = (volume, true_volume)
        volume_rows.append(
            {
                "subject": plan.subject,
                "session": session,
                "acq_date": plan.dates[t].isoformat(),
                "days": (plan.dates[t] - plan.dates[0]).days,
                "volume_mm3": round(volume, 3),
                "volume_change_mm3": round(volume - baseline[0], 3),
                "true_volume_mm3": round(true_volume, 3),
                "true_volume_change_mm3": round(true_volume - baseline[1], 3),
            }
        )
    return volume_rows, contrast_params


@dataclass(frozen=True)
class _CohortJob:
    """What every subject's rendering reads; forked workers inherit it instead of unpickling it."""

    out_dir: Path
    source: Source
    plans: list[SubjectPlan]
    draws: dict[int, tuple[np.ndarray, dict, np.ndarray, np.random.Generator]]
    seed: int
    spacing_mm: float
    contrasts: tuple[str, ...]


_JOB: _CohortJob | None = None


def _make_subject(position: int) -> tuple[dict, list[dict], dict]:
    """Draw and write one subject of :data:`_JOB`: its parameters, volume rows and contrast parameters."""
    job = _JOB
    assert job is not None
    plan = job.plans[position]
    subject = _draw_subject(job.source, plan, job.seed, job.spacing_mm, job.draws[plan.index])
    rows, contrast_params = _write_subject(
        job.out_dir, job.source, subject, job.seed, job.spacing_mm, job.contrasts
    )
    return subject.params, rows, contrast_params


def _one_thread() -> None:
    """A forked worker computes on one thread: the workers are the parallelism, and a thread
    pool inherited across fork is not safe to use (what torch's own data-loader workers do)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _map_subjects(job: _CohortJob, workers: int) -> list[tuple[dict, list[dict], dict]]:
    """Every subject of ``job`` in plan order, ``workers`` at a time (forked where available)."""
    global _JOB
    _JOB = job
    try:
        positions = range(len(job.plans))
        if workers <= 1 or len(job.plans) <= 1 or "fork" not in mp.get_all_start_methods():
            return [_make_subject(i) for i in positions]
        with ProcessPoolExecutor(
            max_workers=min(workers, len(job.plans)),
            mp_context=mp.get_context("fork"),
            initializer=_one_thread,
        ) as pool:
            return list(pool.map(_make_subject, positions))
    finally:
        _JOB = None


def make_demo_cohort(
    out_dir: Path,
    *,
    seed: int = 0,
    n_cross: int = 8,
    n_long: int = 3,
    n_timepoints: int = 3,
    spacing_mm: float = 2.0,
    contrasts: Sequence[str] = DEMO_CONTRASTS,
    workers: int = 1,
) -> Path:
    """Write the demo cohort (BIDS-like) and its ground truth under ``out_dir``; return the manifest.

    ``workers`` > 1 renders that many subjects at once in forked processes (every subject draws
    from its own random streams, so the files are the same bytes for any number of workers).

    Same arguments give byte-identical files, and the T1w files and their truth do not depend on
    ``contrasts`` (the other contrasts written beside every T1w, each from its own random stream).
    Layout (paths in the manifest are relative to ``out_dir``): ``manifest.csv``, ``dseg.tsv``,
    ``participants.tsv``, ``dataset_description.json``, ``sub-XX/sub-XX_sessions.tsv``,
    ``sub-XX/ses-N/anat/sub-XX_ses-N_{T1w,dseg,label-tumor_mask,T2w,FLAIR}.nii.gz`` and ``truth/``
    (described in ``truth/README.md``, the text of ``assets/truth_README.md``).
    """
    contrasts = tuple(contrasts)
    check_arguments(seed, n_cross, n_long, n_timepoints, spacing_mm, contrasts)
    out_dir = Path(out_dir)
    source = load_source(float(spacing_mm))
    tgrid = source.template_grid
    template, template_dseg = resample_source(source, Transform.identity(), tgrid)
    save_image(
        Image(template, tgrid.affine), out_dir / "truth/template_T1w.nii.gz", dtype=np.float32
    )
    save_image(
        Image(template_dseg, tgrid.affine), out_dir / "truth/template_dseg.nii.gz", dtype=np.uint8
    )
    if contrasts:
        channels = apply_transform(
            load_tissue_channels(float(spacing_mm)), Transform.identity(), tgrid
        ).data
        for column in contrasts:
            save_image(
                contrast_template(column, channels, tgrid.affine),
                out_dir / f"truth/template_{APPEARANCES[column].suffix}.nii.gz",
                dtype=np.float32,
            )

    plans = plan_cohort(seed, n_cross, n_long, n_timepoints)
    # The controls' velocity fields are centred on their mean, so that the true template is the
    # centre of the control group (the atlas members), the point an unbiased atlas converges to.
    # Drawn independently, 5 fields keep a mean of ~45 % of their own size: the cohort's centre
    # would then be a warped template, and no atlas could approach the true one.
    draws = {plan.index: _anatomy_draws(source, plan, seed) for plan in plans}
    controls = [plan.index for plan in plans if not plan.longitudinal]
    if len(controls) > 1:
        centre = np.mean([draws[i][2] for i in controls], axis=0)
        for i in controls:
            affine, params, velocity, rng = draws[i]
            draws[i] = (affine, params, velocity - centre, rng)
    parameters: dict[str, dict] = {}
    contrast_parameters: dict[str, dict] = {}
    volume_rows: list[dict] = []
    job = _CohortJob(out_dir, source, plans, draws, seed, spacing_mm, contrasts)
    for plan, (params, rows, contrast_params) in zip(plans, _map_subjects(job, workers), strict=True):
        parameters[f"sub-{plan.subject}"] = params
        contrast_parameters[f"sub-{plan.subject}"] = contrast_params
        volume_rows += rows

    write_tables(
        out_dir,
        plans,
        seed,
        n_cross,
        n_long,
        n_timepoints,
        spacing_mm,
        parameters,
        volume_rows,
        contrasts,
        contrast_parameters,
    )
    return out_dir / "manifest.csv"
