"""SynthMorph-style training of both registration networks on synthetic pairs.

Owns :class:`TrainSettings` (everything ``atlasflow train`` is told) and :func:`train`: first the
affine network (supervised by the known random affine, error measured in voxels at points spread
over the brain, plus keypoint consistency for the keypoint network), then the velocity U-Net (soft
Dice on grouped labels + LNCC for same-contrast pairs + end-point error where the displacement is
known + diffusion regulariser on the half-resolution velocity). The last ``holdout_maps`` label
maps only give validation pairs (Dice before/after, affine error), measured by
:func:`synthetic_dice` and :func:`affine_point_error`.

Pairs come from :mod:`atlasflow.training.pairs`; weights are written by
:mod:`atlasflow.nn.model_io`, and beside them, at every checkpoint and when a run stops, the
training state (:mod:`atlasflow.training.state`) that ``resume`` continues from; SIGINT/SIGTERM
stop a run after the current step (:mod:`atlasflow.training.interrupt`). Runs are deterministic
for a given seed on CPU, stopped and resumed or not; progress lines give the step, the loss terms
and the elapsed seconds (of the whole run, across resumes).
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
import torch.nn.functional as F

from atlasflow.errors import AtlasflowError
from atlasflow.nn import deterministic_kernels
from atlasflow.nn.layers import integrate_velocity, resize_displacement, warp_tensor
from atlasflow.nn.losses import diffusion_loss, lncc_loss, soft_dice_loss
from atlasflow.nn.model_io import load_model
from atlasflow.nn.networks import NetConfig, RegistrationModel
from atlasflow.training.interrupt import StopOnSignal, TrainingStopped
from atlasflow.training.pairs import TRAIN_SHAPE, LabelSet, PairGenerator, build_label_set
from atlasflow.training.run import TrainingRun
from atlasflow.training.state import check_data, check_resume, load_state, restore_random_state

DEFAULT_LABEL_DIR = Path(__file__).resolve().parents[4] / "shared" / "data" / "synthseg_label_maps"


@dataclass(frozen=True)
class TrainSettings:
    """Settings of one :func:`train` run; the field names are those of ``atlasflow train``'s flags.

    The defaults are the function's; the command's defaults differ where its flags say so
    (``--holdout-maps 4``).
    """

    # data
    label_dir: str | os.PathLike | None = None
    cache_dir: str | os.PathLike | None = None
    limit_maps: int | None = None
    train_shape: tuple[int, int, int] | None = None
    holdout_maps: int = 0
    validation_pairs: int = 8
    init: str | os.PathLike | None = None
    # schedule
    affine_steps: int = 1000
    flow_steps: int = 3000
    lr: float = 1e-3
    time_budget: float | None = None
    affine_fraction: float = 0.2
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    # loss weights
    diffusion_weight: float = 0.5
    lncc_weight: float = 1.0
    dice_weight: float = 1.0
    flow_target_weight: float = 0.1
    # pair synthesis
    max_std: float = 4.0
    crop: tuple[int, int, int] | None = None
    t1_probability: float = 0.8
    same_probability: float = 0.4


def settings_to_dict(settings: TrainSettings) -> dict:
    """``settings`` as JSON values (paths as strings, tuples as lists), as a training state keeps
    them."""

    def plain(value: object) -> object:
        if isinstance(value, os.PathLike):
            return str(value)
        return list(value) if isinstance(value, tuple) else value

    return {k: plain(v) for k, v in asdict(settings).items()}


def settings_from_dict(data: dict) -> TrainSettings:
    """The :class:`TrainSettings` of :func:`settings_to_dict` (unknown keys are ignored)."""
    known = {f.name for f in fields(TrainSettings)}
    values = {k: v for k, v in data.items() if k in known}
    for key in ("train_shape", "crop"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return TrainSettings(**values)


# ----------------------------------------------------------------------------------- helpers


def set_determinism(seed: int, threads: int | None = None) -> None:
    """Fix every seed and ask torch for deterministic kernels (CPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    deterministic_kernels()
    torch.set_num_threads(max(1, min(threads or os.cpu_count() or 1, os.cpu_count() or 1)))


def training_device(name: str) -> torch.device:
    """The device ``--device`` names; CUDA that is not there is an error, not a silent CPU run."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AtlasflowError(
                f"--device {name}: no CUDA device is available to this torch ({torch.__version__})"
            )
        # cuBLAS is deterministic only with a fixed workspace, set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif name != "cpu":
        raise AtlasflowError(f"--device {name}: not a device (cpu or cuda)")
    return torch.device(name)


def _on(pair: dict, device: torch.device) -> dict:
    """A synthetic pair (made on the CPU) with its tensors on ``device``."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in pair.items()}


def _affine_points(shape: tuple[int, int, int], radius: float = 25.0) -> torch.Tensor:
    """Centred voxel coordinates (4, N) of a box of points spread over a brain-sized region."""
    offsets = torch.tensor([-radius, 0.0, radius])
    pts = torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij")).reshape(3, -1)
    return torch.cat([pts, torch.ones(1, pts.shape[1])], 0)


def flow_forward(
    model: RegistrationModel, fixed: torch.Tensor, moving: torch.Tensor, steps: int = 7
) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity (half res, half-res voxels) and the full-resolution displacement (voxels)."""
    velocity = model.flow(torch.cat([fixed, moving], 1))
    half = integrate_velocity(velocity, steps)
    return velocity, resize_displacement(half, tuple(fixed.shape[2:]))


def log_line(line: str, stream: TextIO | None = None) -> None:
    """One progress line, flushed at once (training runs are watched through log files)."""
    print(line, file=stream or sys.stdout, flush=True)


def optimiser_step(
    opt: torch.optim.Optimizer, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter]
) -> None:
    """Back-propagate ``loss`` and step ``opt``, the gradient norm clipped to 1 (so that one odd
    synthetic pair cannot throw the weights far away)."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    opt.step()


# ----------------------------------------------------------------------------------- validation


def _split_label_set(label_set: LabelSet, holdout: int) -> tuple[LabelSet, LabelSet | None]:
    """(training, validation) label sets: the last ``holdout`` maps are kept for validation."""
    n = len(label_set.maps)
    holdout = min(max(holdout, 0), n - 1)
    if holdout == 0:
        return label_set, None
    part = lambda maps: LabelSet(maps, label_set.labels, label_set.grid, label_set.source)  # noqa: E731
    return part(label_set.maps[: n - holdout]), part(label_set.maps[n - holdout :])


def synthetic_dice(model: RegistrationModel, pairs: list[dict]) -> tuple[float, float]:
    """Mean soft Dice (full resolution) of synthetic pairs before and after the flow network."""
    before, after = [], []
    with torch.no_grad():
        for pair in pairs:
            _, disp = flow_forward(
                model, pair["fixed"], pair["moving"], model.config.integration_steps
            )
            warped = warp_tensor(pair["moving_onehot"], disp)
            before.append(1.0 - soft_dice_loss(pair["fixed_onehot"], pair["moving_onehot"]).item())
            after.append(1.0 - soft_dice_loss(pair["fixed_onehot"], warped).item())
    return float(np.mean(before)), float(np.mean(after))


def affine_point_error(model: RegistrationModel, pairs: list[dict], points: torch.Tensor) -> float:
    """Mean point error (voxels) of the affine network on synthetic affine pairs."""
    with torch.no_grad():
        errs = [
            (model.affine(torch.cat([p["fixed"], p["moving"]], 1)) @ points - p["affine"] @ points)
            .pow(2)
            .sum(1)
            .sqrt()
            .mean()
            .item()
            for p in pairs
        ]
    return float(np.mean(errs))


class _Validation:
    """Fixed held-out pairs, scored at every checkpoint; the results go into the sidecar (and the
    training state: ``results`` is the history a resumed run continues)."""

    def __init__(
        self, val_set: LabelSet | None, settings: TrainSettings, points: torch.Tensor
    ) -> None:
        self.points = points
        self.results: dict = {}
        self.flow: list[dict] = []
        self.affine: list[dict] = []
        if val_set is not None and settings.validation_pairs > 0:
            # Whole-grid pairs (no crop), drawn once with their own seed: the same pairs every time.
            gen = PairGenerator(
                val_set,
                seed=10_000 + settings.seed,
                max_std=settings.max_std,
                t1_probability=settings.t1_probability,
            )
            device = points.device
            self.flow = [_on(gen.sample(), device) for _ in range(settings.validation_pairs)]
            self.affine = [
                _on(gen.sample("affine"), device) for _ in range(settings.validation_pairs)
            ]

    def __call__(self, model: RegistrationModel, tag: str) -> None:
        if not self.flow:
            return
        points = self.points
        model.eval()
        before, after = synthetic_dice(model, self.flow)
        err = affine_point_error(model, self.affine, points)
        eye = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)[None].to(points)
        err0 = float(
            np.mean(
                [
                    (eye @ points - p["affine"] @ points).pow(2).sum(1).sqrt().mean().item()
                    for p in self.affine
                ]
            )
        )
        model.train()
        self.results[tag] = {
            "dice_before": round(before, 4),
            "dice_after": round(after, 4),
            "affine_error_identity_vox": round(err0, 3),
            "affine_error_vox": round(err, 3),
        }
        log_line(
            f"validation {tag}: held-out dice {before:.4f} -> {after:.4f}, affine point error "
            f"{err0:.2f} -> {err:.2f} vox"
        )


# ----------------------------------------------------------------------------------- training


def _hyper(
    settings: TrainSettings,
    label_set: LabelSet,
    train_set: LabelSet,
    val_set: LabelSet | None,
) -> dict:
    """The hyper-parameters recorded in the sidecar."""
    s = settings
    return {
        "label_source": label_set.source,
        "label_maps": int(len(train_set.maps)),
        "holdout_maps": int(len(val_set.maps)) if val_set is not None else 0,
        "train_shape": list(label_set.maps.shape[1:]),
        "spacing_mm": 2.0,
        "affine_steps": s.affine_steps,
        "flow_steps": s.flow_steps,
        "lr": s.lr,
        "diffusion_weight": s.diffusion_weight,
        "lncc_weight": s.lncc_weight,
        "dice_weight": s.dice_weight,
        "flow_target_weight": s.flow_target_weight,
        "max_std": s.max_std,
        "seed": s.seed,
        "init": str(s.init) if s.init else None,
        "threads": torch.get_num_threads(),
        "crop": list(s.crop) if s.crop else None,
        "t1_probability": s.t1_probability,
        "same_probability": s.same_probability,
    }


def _train_affine(
    run: TrainingRun, s: TrainSettings, points: torch.Tensor, stop: StopOnSignal
) -> None:
    """Phase 1: the affine network, supervised by the true affine."""
    model, progress = run.model, run.progress
    if progress.affine_finished:
        return
    keypoints = model.config.affine_kind == "keypoints"
    opt = run.optimiser("affine", model.affine.parameters())
    for step in range(progress.affine_done + 1, s.affine_steps + 1):
        run.stop_if_asked(stop, "affine")
        if s.time_budget and run.elapsed() > s.time_budget * s.affine_fraction:
            log_line(f"affine phase stopped by time budget at step {step - 1}")
            run.budget_spent = True
            break
        pair = _on(run.generator.sample("affine"), run.device)
        pred = model.affine(torch.cat([pair["fixed"], pair["moving"]], 1))
        err = (pred @ points - pair["affine"] @ points).pow(2).sum(1).sqrt().mean()
        loss = err
        consistency = torch.zeros((), device=run.device)
        if keypoints:
            kp, _ = model.affine.keypoints(torch.cat([pair["fixed"], pair["moving"]], 0))
            truth = pair["affine"][0]
            mapped = kp[0] @ truth[:, :3].T + truth[:, 3]
            consistency = (kp[1] - mapped).pow(2).sum(-1).add(1e-6).sqrt().mean()
            loss = loss + consistency
        optimiser_step(opt, loss, model.affine.parameters())
        progress.affine_done = step
        if step % s.log_every == 0 or step == 1:
            log_line(
                f"affine step {step}/{s.affine_steps} point_error_vox {err.item():.3f} "
                f"keypoint_error_vox {consistency.item():.3f} seconds {run.elapsed():.1f}"
            )
        if step % s.checkpoint_every == 0:
            run.checkpoint(f"affine_{step}")
    progress.affine_finished = True


def _train_flow(run: TrainingRun, s: TrainSettings, stop: StopOnSignal) -> None:
    """Phase 2: the velocity U-Net on near-aligned pairs."""
    model, progress, device = run.model, run.progress, run.device
    opt = run.optimiser("flow", model.flow.parameters())
    for step in range(progress.flow_done + 1, s.flow_steps + 1):
        run.stop_if_asked(stop, "flow")
        if s.time_budget and run.elapsed() > s.time_budget:
            log_line(f"flow phase stopped by time budget at step {step - 1}")
            run.budget_spent = True
            break
        pair = _on(run.generator.sample(), device)
        velocity = model.flow(torch.cat([pair["fixed"], pair["moving"]], 1))
        disp_half = integrate_velocity(velocity, model.config.integration_steps)
        half_shape = tuple(disp_half.shape[2:])
        # Dice at half resolution: 8x cheaper than warping 17 label channels at full resolution.
        fixed_labels = F.avg_pool3d(pair["fixed_onehot"], 2)
        warped_labels = warp_tensor(F.avg_pool3d(pair["moving_onehot"], 2), disp_half)
        dice = soft_dice_loss(fixed_labels, warped_labels)
        reg = diffusion_loss(velocity)
        loss = s.dice_weight * dice + s.diffusion_weight * reg
        sim = torch.zeros((), device=device)
        if pair["t1_like"] and s.lncc_weight > 0:
            warped = warp_tensor(
                pair["moving"], resize_displacement(disp_half, tuple(pair["fixed"].shape[2:]))
            )
            sim = lncc_loss(pair["fixed"], warped, 7, pair["fixed_mask"])
            loss = loss + s.lncc_weight * sim
        epe = torch.zeros((), device=device)
        if "target" in pair and s.flow_target_weight > 0:
            target = resize_displacement(pair["target"], half_shape)
            epe = (disp_half - target).pow(2).sum(1).add(1e-6).sqrt().mean()
            loss = loss + s.flow_target_weight * epe
        optimiser_step(opt, loss, model.flow.parameters())
        progress.flow_done = step
        if step % s.log_every == 0 or step == 1:
            log_line(
                f"flow step {step}/{s.flow_steps} loss {loss.item():.4f} dice_loss {dice.item():.4f} "
                f"lncc_loss {sim.item():.4f} epe_half_vox {epe.item():.3f} diffusion {reg.item():.5f} "
                f"max_velocity {velocity.detach().abs().max().item():.2f} kind {pair['kind']} "
                f"seconds {run.elapsed():.1f}"
            )
        if step % s.checkpoint_every == 0:
            run.checkpoint(f"flow_{step}")


def train(
    out_path: str | os.PathLike,
    settings: TrainSettings | None = None,
    *,
    config: NetConfig | None = None,
    resume: str | os.PathLike | None = None,
) -> RegistrationModel:
    """Train both networks on synthetic pairs and save them to ``out_path`` (with checkpoints).

    Affine phase: mean point error against the known random affine (voxels), plus, for the
    keypoint network, the distance between the moving keypoints and the fixed keypoints mapped by
    the true affine (a dense, per-keypoint signal that keeps the keypoints from collapsing).
    Flow phase: ``dice_weight`` x soft Dice on grouped labels + ``lncc_weight`` x LNCC (pairs of one
    contrast) + ``flow_target_weight`` x end-point error against the known displacement ('same'
    pairs, where it is exact) + ``diffusion_weight`` x diffusion of the half-resolution velocity.
    The last ``holdout_maps`` label maps are never trained on; pairs drawn from them give the
    validation numbers logged at every checkpoint and stored in the sidecar. ``config`` is the
    architecture of a new model (ignored with ``settings.init``; with ``resume``, the state's
    architecture is used and another ``config`` refused).

    Every ``checkpoint_every`` steps, at the end, and when SIGINT/SIGTERM stops the run (which
    then raises :class:`~atlasflow.training.interrupt.TrainingStopped`), the weights and the
    training state (``state_path(out_path)``) are written. ``resume``: such a state to continue
    from, with the weights, optimisers, random states, validation history and time an
    uninterrupted run would have had; ``settings`` may differ from the state's only in
    :data:`~atlasflow.training.state.OVERRIDABLE` (more steps, another device, ...).
    """
    s = settings or TrainSettings()
    device = training_device(s.device)
    set_determinism(s.seed, s.threads)
    state = load_state(resume, device) if resume is not None else None
    if state is not None:
        check_resume(resume, state, settings_to_dict(s), config.to_dict() if config else None)
    label_set = build_label_set(
        s.label_dir, s.cache_dir, shape=s.train_shape or TRAIN_SHAPE, limit=s.limit_maps
    )
    data = label_set.fingerprint()
    if state is not None:
        check_data(resume, state, data, s.label_dir)
    train_set, val_set = _split_label_set(label_set, s.holdout_maps)
    generator = PairGenerator(
        train_set,
        seed=s.seed,
        max_std=s.max_std,
        crop=s.crop,
        t1_probability=s.t1_probability,
        same_probability=s.same_probability,
    )
    if state is not None:
        model = RegistrationModel(NetConfig.from_dict(state.config))
        model.load_state_dict(state.model)
    elif s.init is not None:
        model, _ = load_model(s.init)
    else:
        model = RegistrationModel(config)
    model.to(device).train()
    points = _affine_points(tuple(label_set.maps.shape[1:])).to(device)
    validate = _Validation(val_set, s, points)
    if state is None:
        validate(model, "start")
    else:
        validate.results = dict(state.validation)
        # Last: building the model and the validation pairs drew from the seeded generators.
        restore_random_state(state.rng, generator.gen)
    run = TrainingRun(
        out_path,
        model,
        generator,
        validate,
        lr=s.lr,
        hyper=_hyper(s, label_set, train_set, val_set),
        settings=settings_to_dict(s),
        data=data,
        state=state,
    )
    if state is not None:
        p = run.progress
        log_line(
            f"resuming {resume}: {p.affine_done} affine steps"
            f"{' (phase finished)' if p.affine_finished else ''}, {p.flow_done} flow steps, "
            f"{run.before:.1f} s trained so far; on {device}"
        )
    # A signal during the last validation and save is only noted: they finish the run anyway.
    with StopOnSignal() as stop:
        try:
            _train_affine(run, s, points, stop)
            _train_flow(run, s, stop)
        except TrainingStopped as stopped:
            log_line(str(stopped))
            raise
        validate(model, "end")
        run.save("time budget" if run.budget_spent else "finished")
    log_line(f"saved {out_path} after {run.elapsed():.1f} s")
    return model.eval()
