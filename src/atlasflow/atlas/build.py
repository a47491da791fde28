"""Unbiased population atlas: iteration 0 (affines), the iterations, the shape update, metrics.

One iteration (after Avants et al. 2010, antsMultivariateTemplateConstruction2), in one job:
every member is registered to the previous template (fixed = template), the warped images are
averaged, and the average is pulled by the negated mean velocity field, scaled by a gradient step,
so the template moves toward the cohort's centre; a mild unsharp mask restores the edges that
averaging blurs. The members' results are summed into running sums in member order, so memory
does not grow with the cohort size and reruns are identical. The atlas label map is
:mod:`atlasflow.atlas.labels`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

# The label vote is atlasflow.atlas.labels; benchmarks/ixi_atlas.py still reads it from here.
from atlasflow.atlas.labels import leave_one_out_consistency  # noqa: F401
from atlasflow.errors import AtlasflowError
from atlasflow.io.atomic import atomic_write_text
from atlasflow.io.images import Grid, Image, load_image, load_mask, save_image
from atlasflow.registration.options import RegistrationOptions

# torch (through .transforms and .register), scipy and pandas are imported inside the functions
# that need them: the label vote and the metrics table (rules atlas_labels, atlas_final) then
# start in a fraction of a second instead of paying torch's ~2 s import.


def velocity_to_displacement(velocity_world: Image, scale: float = 1.0) -> Image:
    """exp(scale * v) as a RAS-mm displacement field on the velocity's grid."""
    import torch

    from atlasflow.nn.layers import integrate_velocity, resize_displacement
    from atlasflow.transforms import displacement_vox_to_world, displacement_world_to_vox

    grid = velocity_world.grid
    v_vox = displacement_world_to_vox(velocity_world.data.astype(np.float64), grid).astype(
        np.float32
    )
    v = torch.from_numpy(np.ascontiguousarray(v_vox)).permute(3, 0, 1, 2)[None] * scale
    with torch.no_grad():
        shape = tuple(v.shape[2:])
        if min(shape) >= 32:
            # The members' velocities are upsampled half-resolution fields, so their mean is smooth:
            # it is integrated at half resolution (~8x fewer voxels), then upsampled.
            half = tuple((n + 1) // 2 for n in shape)
            v_half = resize_displacement(v, half)
            disp = (
                resize_displacement(integrate_velocity(v_half), shape)[0]
                .permute(1, 2, 3, 0)
                .numpy()
            )
        else:
            disp = integrate_velocity(v)[0].permute(1, 2, 3, 0).numpy()
    return Image(
        displacement_vox_to_world(disp, grid).astype(np.float32), velocity_world.affine.copy()
    )


def sharpen(image: Image, amount: float = 0.5, sigma_vox: float = 1.0) -> Image:
    """Mild unsharp mask; keeps the intensity range of the input."""
    from scipy import ndimage

    blurred = ndimage.gaussian_filter(image.data, sigma_vox)
    out = image.data + amount * (image.data - blurred)
    return image.with_data(np.clip(out, image.data.min(), image.data.max()).astype(np.float32))


def shape_update(average: Image, mean_velocity: Image, gradient_step: float) -> Image:
    """Pull the average by exp(-step * mean velocity): the template moves to the cohort centre."""
    from atlasflow.transforms import Transform, apply_transform

    disp = velocity_to_displacement(mean_velocity, -gradient_step)
    return apply_transform(average, Transform(np.eye(4), disp), average.grid, "linear")


def _finish_iteration(
    average: Image,
    mean_velocity: Image,
    previous: Image,
    region: np.ndarray,
    subject_norms: Sequence[float],
    reg: Sequence[dict],
    out_template: str | Path,
    out_metrics: str | Path,
    *,
    mean_norms: np.ndarray,
    gradient_step: float,
    do_sharpen: bool,
    iteration: int,
) -> dict:
    """Shape update + sharpening of the members' average; the template and the iteration's metrics.

    ``mean_norms``: the mean velocity's norm inside the region, on the grid the members' norms
    were measured on (:func:`_norms_inside`).
    """
    template = shape_update(average, mean_velocity, gradient_step)
    if do_sharpen:
        template = sharpen(template)
    save_image(template, out_template, dtype=np.float32)
    # Registration errors that differ between members leave a mean field of about 1/sqrt(N) of
    # their size even at the cohort's centre; the ratio to the members' own norms separates a
    # shared displacement (template off-centre, ratio near 1) from that floor.
    subject_norm = float(np.mean(subject_norms))
    metrics = {
        "iteration": iteration,
        "members": len(subject_norms),
        "template_change_rms": float(
            np.sqrt(np.mean((template.data - previous.data)[region] ** 2))
        ),
        "mean_velocity_norm_mean_mm": float(mean_norms.mean()),
        "mean_velocity_norm_max_mm": float(mean_norms.max()),
        "subject_velocity_norm_mean_mm": subject_norm,
        "velocity_bias_ratio": float(mean_norms.mean() / subject_norm) if subject_norm > 0 else 0.0,
        "ncc_to_template_mean": float(np.mean([r["ncc_after"] for r in reg])) if reg else None,
        "folding_fraction_max": float(max(r["folding_fraction"] for r in reg)) if reg else None,
        "folding_fraction_mean": float(np.mean([r["folding_fraction"] for r in reg]))
        if reg
        else None,
    }
    atomic_write_text(out_metrics, json.dumps(metrics, indent=2) + "\n")
    return metrics


# ----------------------------------------------------------------- one iteration, one job


@dataclass(frozen=True)
class Member:
    """One atlas member: its preprocessed image, brain mask, affine to the reference template
    (ITK .mat, template world -> member world) and, from the second iteration on, its velocity of
    the previous iteration (coarse grid, world mm) to continue from."""

    name: str
    image: str
    mask: str | None = None
    affine: str | None = None
    velocity: str | None = None


@dataclass(frozen=True)
class Target:
    """What every member of one job is registered to: the template, its mask and the engine's
    options (``affine_only``: atlas_init's affines). ``start_shift`` is added to every carried
    member velocity: minus the step times the previous mean velocity, the shape update that moved
    the template since those velocities were found."""

    fixed: Image
    mask: np.ndarray
    options: RegistrationOptions
    start_shift: Image | None = None


def _register_member(member: Member, target: Target) -> dict:
    """Register one member to ``target``: its image on the template grid and metrics, plus its
    field (iterations) or, with ``affine_only`` in the options (atlas_init), its affine (template
    world -> member world)."""
    from atlasflow.io.itk import read_itk_affine
    from atlasflow.registration.api import register_and_measure

    fixed, fixed_mask, options = target.fixed, target.mask, target.options
    try:
        moving = load_image(member.image)
        mmask = load_mask(member.mask, moving, member.image)
        init = read_itk_affine(member.affine) if member.affine else None
        measured = register_and_measure(
            fixed,
            moving,
            # One network pass per iteration: the carried field makes the iterations a cascade
            # (two passes in the first iteration: IXI atlas label consistency 0.741 -> 0.738).
            replace(options, inverse=False, full_velocity=False, network_passes=1),
            fixed_mask=fixed_mask,
            moving_mask=mmask,
            init_affine=init,
            init_velocity=carried_start(member, target.start_shift),
            before=False,
        )
    except AtlasflowError as exc:
        return {"name": member.name, "error": str(exc)}
    reg, numbers = measured.registration, measured.metrics
    result = {
        "name": member.name,
        "warped": measured.warped.data.astype(np.float32),
        "metrics": {"seconds": numbers["seconds"], "ncc_after": numbers["ncc_after"]},
    }
    if options.affine_only:
        result["affine"] = reg.transform.affine
        return result
    # The deep backend's coarse field is 1/8 of the full one (which it does not make here): the
    # job averages that and resamples the mean once. ANTs has none; its full field goes back.
    field = reg.coarse_velocity if reg.coarse_velocity is not None else reg.field
    result["coarse_velocity"] = reg.coarse_velocity
    if reg.coarse_velocity is None:
        result["field"] = field.data.astype(np.float32)
    result["metrics"].update(
        folding_fraction=numbers["folding_fraction"],
        velocity_norm_mean_mm=float(_norms_inside(field, fixed_mask, fixed.affine).mean()),
    )
    return result


def _norms_inside(field: Image, region: np.ndarray, region_affine: np.ndarray) -> np.ndarray:
    """Norms of a vector field inside ``region`` (boolean, on the grid of ``region_affine``); on a
    field's own coarser grid (the deep backend's), inside the voxels at least half in the region."""
    inside = np.asarray(region, bool)
    if not Grid(inside.shape, region_affine).same_as(field.grid):
        from atlasflow.transforms import Transform, apply_transform

        share = apply_transform(
            Image(inside.astype(np.float32), region_affine),
            Transform.identity(),
            field.grid,
            "linear",
        )
        inside = share.data >= 0.5
    return np.linalg.norm(field.data, axis=-1)[inside]


def update_shift(mean_velocity: str | Path | None, gradient_step: float) -> Image | None:
    """What a shape update moved the template by, as a velocity to add to each member's carried
    one: minus the step times that iteration's mean velocity (None: no mean, no shift)."""
    if mean_velocity is None:
        return None
    mean = load_image(mean_velocity, allow_vector=True)
    return mean.with_data((-gradient_step * mean.data).astype(np.float32))


def carried_start(member: Member, shift: Image | None) -> Image | None:
    """The member's velocity of the previous iteration moved by ``shift`` (None: start afresh)."""
    if member.velocity is None:
        return None
    start = load_image(member.velocity, allow_vector=True)
    if shift is None:
        return start
    if not start.grid.same_as(shift.grid) or start.data.shape != shift.data.shape:
        raise AtlasflowError(f"{member.velocity}: grid differs from the previous mean velocity's")
    return start.with_data(start.data + shift.data)


def worker_init(threads: int = 1) -> None:
    """Start-up of a member worker process: its own torch thread budget."""
    import torch

    torch.set_num_threads(threads)


def member_pool(workers: int):
    """``workers`` forked processes that register members, one torch thread each.

    Forked, so they start with the parent's imports. One torch thread each: a second thread made
    one IXI registration only 1.2x faster, a second worker doubles the throughput. A worker that
    dies (for example killed for memory) fails the job instead of hanging it.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        workers, mp_context=mp.get_context("fork"), initializer=worker_init, initargs=(1,)
    )


# A warm engine's member workers (:mod:`atlasflow.runtime.server`), kept between jobs; else each job
# forks its own.
_POOL = None


def use_pool(pool) -> None:
    """Register members in ``pool`` (kept alive by the caller) instead of a pool per job."""
    global _POOL
    _POOL = pool


def map_members(
    function: Callable[[Any, Any], dict],
    members: Sequence[Any],
    target: Any,
    workers: int,
) -> Iterator[dict]:
    """``function(member, target)`` of every member (a :class:`Member`, or a member with its
    outputs), in member order.

    One worker runs in this process, on one torch thread like the pool's workers: reductions then
    add up in the same order, so the bytes depend neither on the number of workers nor on whether
    a warm engine ran them. With one thread the workers may fork from a parent that has already
    run torch operations (its OpenMP threads do not survive a fork; a single-threaded worker never
    needs them).
    """
    from functools import partial

    import torch

    task = partial(function, target=target)
    workers = max(1, min(workers, len(members)))
    if _POOL is not None:
        yield from _POOL.map(task, members)
        return
    if workers == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield from map(task, members)
        finally:
            torch.set_num_threads(threads)
        return
    pool = member_pool(workers)
    try:
        yield from pool.map(task, members)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run_iteration(
    members: Sequence[Member],
    previous_template: str | Path,
    mask: str | Path,
    out_template: str | Path,
    out_metrics: str | Path,
    out_members: str | Path,
    *,
    options: RegistrationOptions | Mapping[str, Any],
    iteration: int = 1,
    gradient_step: float = 1.0,
    do_sharpen: bool = True,
    workers: int = 1,
    skip_failed: bool = False,
    min_members: int = 1,
    previous_mean_velocity: str | Path | None = None,
    out_velocities: Sequence[str | Path] | None = None,
    out_mean_velocity: str | Path | None = None,
) -> dict:
    """One atlas iteration in one process: register every member to the previous template, then
    average, shape-update and sharpen.

    Carried velocities (deep backend): a member with a ``velocity`` (its field of the previous
    iteration) starts from it, moved by ``-gradient_step`` x ``previous_mean_velocity`` (the shape
    update since), and the network adds a residual, so the registrations sharpen from one
    iteration to the next instead of starting afresh. ``out_velocities`` (one per member) and
    ``out_mean_velocity`` receive this iteration's fields on the network's coarse grid for the
    next; a failed member's file holds its failure record (the next iteration starts it afresh).

    One job per iteration instead of one per member: the engine's start-up (Python, torch, the
    weights; ~2 s) is paid once, not per member, and the warped images and fields are summed in
    memory instead of written and read back. ``workers`` processes (:func:`member_pool`, or a warm
    engine's) register the members; results are summed in member order, so reruns are identical.
    A member that fails is named in the error, or under ``skip_failed`` left out and listed in
    ``out_members`` with its reason.
    """
    from atlasflow.errors import write_failure

    if out_velocities is not None and len(out_velocities) != len(members):
        raise AtlasflowError(
            f"atlas iteration {iteration}: {len(members)} members but {len(out_velocities)} velocity outputs"
        )
    previous = load_image(previous_template)
    region = load_mask(mask, previous, previous_template)
    shift = update_shift(previous_mean_velocity, gradient_step)
    target = Target(previous, region, RegistrationOptions.of(options), shift)
    total_warped = np.zeros(previous.data.shape, np.float64)
    total_field: np.ndarray | None = None  # the members' full fields (ANTs) or coarse ones (deep)
    field_affine: np.ndarray | None = None
    rows, norms, kept = [], [], []
    outs = out_velocities if out_velocities is not None else [None] * len(members)
    results = map_members(_register_member, members, target, workers)
    for member, out_velocity, result in zip(members, outs, results, strict=True):
        if "error" in result:
            if not skip_failed:
                raise AtlasflowError(
                    f"atlas iteration {iteration}: {member.image}: {result['error']}"
                )
            rows.append({"member": member.name, "status": "failed", "reason": result["error"]})
            if out_velocity is not None:
                write_failure(
                    [out_velocity],
                    f"atlas iteration {iteration}",
                    result["error"],
                    source=member.image,
                )
            continue
        coarse = result["coarse_velocity"]
        if out_velocity is not None:
            if coarse is None:
                raise AtlasflowError("carried atlas velocities need the deep backend")
            save_image(coarse, out_velocity, dtype=np.float32)
        field = result["field"] if coarse is None else coarse.data
        total_field = field.astype(np.float64) if total_field is None else total_field + field
        field_affine = previous.affine if coarse is None else coarse.affine
        total_warped += result["warped"]
        norms.append(result["metrics"]["velocity_norm_mean_mm"])
        kept.append(result["metrics"])
        rows.append({"member": member.name, "status": "ok", **result["metrics"]})
    _check_enough(rows, len(kept), min_members, iteration)
    n = len(kept)
    average = previous.with_data((total_warped / n).astype(np.float32))
    assert total_field is not None and field_affine is not None  # n >= 1 members registered
    mean_velocity = Image((total_field / n).astype(np.float32), field_affine.copy())
    if out_mean_velocity is not None:
        save_image(mean_velocity, out_mean_velocity, dtype=np.float32)
    mean_norms = _norms_inside(mean_velocity, region, previous.affine)  # where the members' were
    if not mean_velocity.grid.same_as(previous.grid):
        # The coarse mean on the template grid: the same trilinear upsampling each member's full
        # field would have had, done once.
        from atlasflow.transforms import Transform, apply_transform

        mean_velocity = apply_transform(
            mean_velocity, Transform.identity(), previous.grid, "linear"
        )
    metrics = _finish_iteration(
        average,
        mean_velocity,
        previous,
        region,
        norms,
        kept,
        out_template,
        out_metrics,
        mean_norms=mean_norms,
        gradient_step=gradient_step,
        do_sharpen=do_sharpen,
        iteration=iteration,
    )
    _write_members(rows, out_members)
    return metrics


def _check_enough(rows: Sequence[dict], registered: int, min_members: int, iteration: int) -> None:
    if registered < max(1, min_members):
        failed = "; ".join(f"{r['member']}: {r['reason']}" for r in rows if r["status"] == "failed")
        raise AtlasflowError(
            f"atlas iteration {iteration}: {registered} member(s) registered, fewer than the "
            f"{min_members} needed (atlas.min_subjects); failed: {failed}"
        )


def _write_members(rows: Sequence[dict], out_members: str | Path) -> None:
    atomic_write_text(out_members, _tsv(rows))


def run_init(
    members: Sequence[Member],
    reference: str | Path,
    reference_mask: str | Path,
    out_template: str | Path,
    out_affines: Sequence[str | Path],
    out_members: str | Path,
    *,
    options: RegistrationOptions | Mapping[str, Any],
    mean: bool = True,
    workers: int = 1,
    skip_failed: bool = False,
    min_members: int = 1,
) -> Image:
    """Iteration 0: every member's affine to the reference template, and the template to start from.

    The affines (ITK .mat, one per member, in ``out_affines``) seed every later iteration, so the
    atlas needs nothing but the preprocessed scans. Iteration 0 is the mean of the affinely aligned
    members (``mean``), or else the reference template itself. Workers, member order and failures
    behave as in :func:`run_iteration`; a failed member's affine file holds its failure record.
    """
    from atlasflow.errors import write_failure
    from atlasflow.io.itk import write_itk_affine

    if len(out_affines) != len(members):
        raise AtlasflowError(
            f"atlas iteration 0: {len(members)} members but {len(out_affines)} affine outputs"
        )
    fixed = load_image(reference)
    region = load_mask(reference_mask, fixed, reference)
    target = Target(fixed, region, RegistrationOptions.of(options, affine_only=True))
    total = np.zeros(fixed.data.shape, np.float64)
    rows: list[dict] = []
    registered = 0
    for member, out_affine, result in zip(
        members, out_affines, map_members(_register_member, members, target, workers), strict=True
    ):
        if "error" in result:
            if not skip_failed:
                raise AtlasflowError(f"atlas iteration 0: {member.image}: {result['error']}")
            write_failure([out_affine], "atlas affine", result["error"], source=member.image)
            rows.append({"member": member.name, "status": "failed", "reason": result["error"]})
            continue
        write_itk_affine(result["affine"], out_affine)
        total += result["warped"]
        registered += 1
        rows.append({"member": member.name, "status": "ok", **result["metrics"]})
    _check_enough(rows, registered, min_members, 0)
    template = fixed.with_data((total / registered).astype(np.float32)) if mean else fixed
    save_image(template, out_template, dtype=np.float32)
    _write_members(rows, out_members)
    return template


def gather_metrics(paths: Iterable[str | Path], out_tsv: str | Path) -> None:
    """Collect per-iteration JSON metrics into one TSV (one row per iteration)."""
    rows = sorted(
        (json.loads(Path(p).read_text()) for p in paths), key=lambda row: row["iteration"]
    )
    atomic_write_text(out_tsv, _tsv(rows))


def _tsv(rows: Sequence[dict]) -> str:
    """Rows as a TSV, columns in order of first appearance, empty where a row lacks one or holds
    None/NaN, quoted where needed (like pandas' ``to_csv``, without its import)."""
    import csv
    import io

    columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if (v := row.get(c)) is None or v != v else v for c in columns])
    return out.getvalue()
