"""Training and fine-tuning of the registration networks, and the model file format.

Owns:

* :func:`train` - SynthMorph-style training on synthetic pairs (:mod:`atlasflow.training.pairs`):
  first the affine network (supervised by the known random affine, error measured in voxels at
  points spread over the brain, plus keypoint consistency for the keypoint network), then the
  velocity U-Net (soft Dice on grouped labels + LNCC for same-contrast pairs + end-point error
  where the displacement is known + diffusion regulariser on the half-resolution velocity). The
  last ``holdout_maps`` label maps only give validation pairs (Dice before/after, affine error).
* :func:`finetune` - unsupervised fine-tuning of the U-Net on a user's own images (LNCC +
  diffusion), each image registered to a fixed image after the engine's affine stage.
* :func:`save_model` / :func:`load_model` - weights as ``safetensors`` plus a JSON sidecar with the
  architecture, the hyper-parameters and the SHA-256 of the weights; loading refuses any file whose
  hash, size or tensor set does not match (tampered or truncated files raise AtlasflowError).
* ``train_main`` / ``finetune_main`` - the ``atlasflow train`` / ``atlasflow finetune`` commands.

Runs are deterministic for a given seed on CPU; progress lines give the step, the loss terms and the
elapsed seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from atlasflow.errors import AtlasflowError
from atlasflow.io.atomic import atomic_write_text, sibling_tempfile
from atlasflow.nn import deterministic_kernels
from atlasflow.nn.layers import integrate_velocity, resize_displacement, warp_tensor
from atlasflow.nn.losses import diffusion_loss, lncc_loss, soft_dice_loss
from atlasflow.nn.networks import NetConfig, RegistrationModel

FORMAT = "atlasflow-registration-v2"
#: Version 1 files (pooled affine network, no ``affine_kind`` in the config) still load.
READABLE_FORMATS = ("atlasflow-registration-v1", FORMAT)
DEFAULT_LABEL_DIR = Path(__file__).resolve().parents[4] / "shared" / "data" / "synthseg_label_maps"


# ----------------------------------------------------------------------------------- model files


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(
    model: RegistrationModel, path: str | os.PathLike, hyper: dict | None = None
) -> Path:
    """Write ``path`` (safetensors) and its JSON sidecar atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = sibling_tempfile(path)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        sha = _sha256(Path(tmp))
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    sidecar = {
        "format": FORMAT,
        "weights": path.name,
        "sha256": sha,
        "bytes": size,
        "config": model.config.to_dict(),
        "hyper": hyper or {},
    }
    atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(path: str | os.PathLike) -> dict:
    side = sidecar_path(path)
    if not side.exists():
        raise AtlasflowError(
            f"{path}: model sidecar {side.name} is missing (architecture and checksum)"
        )
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AtlasflowError(f"{side}: not a readable model sidecar ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        raise AtlasflowError(
            f"{side}: not an atlasflow model sidecar (format {meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    return meta


def load_model(path: str | os.PathLike, device: str = "cpu") -> tuple[RegistrationModel, dict]:
    """Load weights + sidecar; any mismatch (hash, size, tensors) raises AtlasflowError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise AtlasflowError(f"{path}: model weights not found")
    meta = read_sidecar(path)
    if path.stat().st_size != meta.get("bytes"):
        raise AtlasflowError(
            f"{path}: size {path.stat().st_size} bytes differs from the sidecar ({meta.get('bytes')}); truncated or replaced"
        )
    if _sha256(path) != meta.get("sha256"):
        raise AtlasflowError(
            f"{path}: SHA-256 does not match its sidecar; the weights were modified"
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AtlasflowError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        config = NetConfig.from_dict(meta.get("config", {}))
    except (TypeError, ValueError) as exc:
        raise AtlasflowError(f"{path}: sidecar describes an unknown architecture ({exc})") from None
    model = RegistrationModel(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise AtlasflowError(
            f"{path}: weights do not fit the architecture in the sidecar ({exc})"
        ) from None
    model.to(device).eval()
    return model, meta


# ----------------------------------------------------------------------------------- helpers


def set_determinism(seed: int, threads: int | None = None) -> None:
    """Fix every seed and ask torch for deterministic kernels (CPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    deterministic_kernels()
    torch.set_num_threads(max(1, min(threads or os.cpu_count() or 1, os.cpu_count() or 1)))


def _affine_points(shape: tuple[int, int, int], radius: float = 25.0) -> torch.Tensor:
    """Centred voxel coordinates (4, N) of a box of points spread over a brain-sized region."""
    offsets = torch.tensor([-radius, 0.0, radius])
    pts = torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij")).reshape(3, -1)
    return torch.cat([pts, torch.ones(1, pts.shape[1])], 0)


def flow_forward(
    model: RegistrationModel, fixed: torch.Tensor, moving: torch.Tensor, steps: int = 7
):
    """Velocity (half res, half-res voxels) and the full-resolution displacement (voxels)."""
    velocity = model.flow(torch.cat([fixed, moving], 1))
    half = integrate_velocity(velocity, steps)
    return velocity, resize_displacement(half, tuple(fixed.shape[2:]))


def _log(line: str, stream=None) -> None:
    print(line, file=stream or sys.stdout, flush=True)


# ----------------------------------------------------------------------------------- training


def _split_label_set(label_set, holdout: int):
    """(training, validation) label sets: the last ``holdout`` maps are kept for validation."""
    from atlasflow.training.pairs import LabelSet

    n = len(label_set.maps)
    holdout = min(max(holdout, 0), n - 1)
    if holdout == 0:
        return label_set, None
    part = lambda maps: LabelSet(maps, label_set.labels, label_set.grid, label_set.source)  # noqa: E731
    return part(label_set.maps[: n - holdout]), part(label_set.maps[n - holdout :])


def synthetic_dice(model: RegistrationModel, pairs: list[dict]) -> tuple[float, float]:
    """Mean soft Dice (full resolution) of synthetic pairs before and after the flow network."""
    from atlasflow.training.pairs import NUM_CLASSES  # noqa: F401  (documents the label space)

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


def train(
    out_path: str | os.PathLike,
    *,
    label_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    affine_steps: int = 1000,
    flow_steps: int = 3000,
    lr: float = 1e-3,
    diffusion_weight: float = 0.5,
    lncc_weight: float = 1.0,
    dice_weight: float = 1.0,
    flow_target_weight: float = 0.1,
    max_std: float = 4.0,
    seed: int = 0,
    checkpoint_every: int = 200,
    log_every: int = 10,
    init: str | os.PathLike | None = None,
    config: NetConfig | None = None,
    limit_maps: int | None = None,
    time_budget: float | None = None,
    affine_fraction: float = 0.2,
    threads: int | None = None,
    crop: tuple[int, int, int] | None = None,
    train_shape: tuple[int, int, int] | None = None,
    t1_probability: float = 0.8,
    same_probability: float = 0.4,
    holdout_maps: int = 0,
    validation_pairs: int = 8,
) -> RegistrationModel:
    """Train both networks on synthetic pairs and save them to ``out_path`` (with checkpoints).

    Affine phase: mean point error against the known random affine (voxels), plus, for the
    keypoint network, the distance between the moving keypoints and the fixed keypoints mapped by
    the true affine (a dense, per-keypoint signal that keeps the keypoints from collapsing).
    Flow phase: ``dice_weight`` x soft Dice on grouped labels + ``lncc_weight`` x LNCC (pairs of one
    contrast) + ``flow_target_weight`` x end-point error against the known displacement ('same'
    pairs, where it is exact) + ``diffusion_weight`` x diffusion of the half-resolution velocity.
    The last ``holdout_maps`` label maps are never trained on; pairs drawn from them give the
    validation numbers logged at every checkpoint and stored in the sidecar.
    """
    from atlasflow.training.pairs import TRAIN_SHAPE, PairGenerator, build_label_set

    set_determinism(seed, threads)
    label_set = build_label_set(
        label_dir, cache_dir, shape=train_shape or TRAIN_SHAPE, limit=limit_maps
    )
    train_set, val_set = _split_label_set(label_set, holdout_maps)
    generator = PairGenerator(
        train_set,
        seed=seed,
        max_std=max_std,
        crop=crop,
        t1_probability=t1_probability,
        same_probability=same_probability,
    )
    if init is not None:
        model, _ = load_model(init)
        model.train()
    else:
        model = RegistrationModel(config)
    shape = tuple(label_set.maps.shape[1:])
    points = _affine_points(shape)
    val_flow: list[dict] = []
    val_affine: list[dict] = []
    if val_set is not None and validation_pairs > 0:
        # Whole-grid pairs (no crop), drawn once with their own seed: the same pairs every time.
        val_gen = PairGenerator(
            val_set, seed=10_000 + seed, max_std=max_std, t1_probability=t1_probability
        )
        val_flow = [val_gen.sample() for _ in range(validation_pairs)]
        val_affine = [val_gen.sample("affine") for _ in range(validation_pairs)]
    hyper: dict = {
        "label_source": label_set.source,
        "label_maps": int(len(train_set.maps)),
        "holdout_maps": int(len(val_set.maps)) if val_set is not None else 0,
        "train_shape": list(label_set.maps.shape[1:]),
        "spacing_mm": 2.0,
        "affine_steps": affine_steps,
        "flow_steps": flow_steps,
        "lr": lr,
        "diffusion_weight": diffusion_weight,
        "lncc_weight": lncc_weight,
        "dice_weight": dice_weight,
        "flow_target_weight": flow_target_weight,
        "max_std": max_std,
        "seed": seed,
        "init": str(init) if init else None,
        "threads": torch.get_num_threads(),
        "crop": list(crop) if crop else None,
        "t1_probability": t1_probability,
        "same_probability": same_probability,
    }
    validation: dict = {}

    def validate(tag: str) -> None:
        if val_flow:
            model.eval()
            before, after = synthetic_dice(model, val_flow)
            err = affine_point_error(model, val_affine, points)
            eye = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)[None]
            err0 = float(
                np.mean(
                    [
                        (eye @ points - p["affine"] @ points).pow(2).sum(1).sqrt().mean().item()
                        for p in val_affine
                    ]
                )
            )
            model.train()
            validation[tag] = {
                "dice_before": round(before, 4),
                "dice_after": round(after, 4),
                "affine_error_identity_vox": round(err0, 3),
                "affine_error_vox": round(err, 3),
            }
            _log(
                f"validation {tag}: held-out dice {before:.4f} -> {after:.4f}, affine point error "
                f"{err0:.2f} -> {err:.2f} vox"
            )

    def checkpoint(**done) -> None:
        save_model(model, out_path, {**hyper, **done, "validation": validation})

    validate("start")
    start = time.perf_counter()
    keypoints = model.config.affine_kind == "keypoints"

    # Phase 1: affine network, supervised by the true affine (mean point error in voxels).
    opt = torch.optim.Adam(model.affine.parameters(), lr=lr)
    for step in range(1, affine_steps + 1):
        pair = generator.sample("affine")
        pred = model.affine(torch.cat([pair["fixed"], pair["moving"]], 1))
        err = (pred @ points - pair["affine"] @ points).pow(2).sum(1).sqrt().mean()
        loss = err
        consistency = torch.zeros(())
        if keypoints:
            kp, _ = model.affine.keypoints(torch.cat([pair["fixed"], pair["moving"]], 0))
            truth = pair["affine"][0]
            mapped = kp[0] @ truth[:, :3].T + truth[:, 3]
            consistency = (kp[1] - mapped).pow(2).sum(-1).add(1e-6).sqrt().mean()
            loss = loss + consistency
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.affine.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == 1:
            _log(
                f"affine step {step}/{affine_steps} point_error_vox {err.item():.3f} "
                f"keypoint_error_vox {consistency.item():.3f} seconds {time.perf_counter() - start:.1f}"
            )
        if step % checkpoint_every == 0:
            validate(f"affine_{step}")
            checkpoint(completed_affine_steps=step, completed_flow_steps=0)
        if time_budget and time.perf_counter() - start > time_budget * affine_fraction:
            _log(f"affine phase stopped by time budget at step {step}")
            affine_steps = step
            break

    # Phase 2: velocity U-Net on near-aligned pairs.
    opt = torch.optim.Adam(model.flow.parameters(), lr=lr)
    done = 0
    for step in range(1, flow_steps + 1):
        pair = generator.sample()
        velocity = model.flow(torch.cat([pair["fixed"], pair["moving"]], 1))
        disp_half = integrate_velocity(velocity, model.config.integration_steps)
        half_shape = tuple(disp_half.shape[2:])
        # Dice at half resolution: 8x cheaper than warping 17 label channels at full resolution.
        fixed_labels = F.avg_pool3d(pair["fixed_onehot"], 2)
        warped_labels = warp_tensor(F.avg_pool3d(pair["moving_onehot"], 2), disp_half)
        dice = soft_dice_loss(fixed_labels, warped_labels)
        reg = diffusion_loss(velocity)
        loss = dice_weight * dice + diffusion_weight * reg
        sim = torch.zeros(())
        if pair["t1_like"] and lncc_weight > 0:
            warped = warp_tensor(
                pair["moving"], resize_displacement(disp_half, tuple(pair["fixed"].shape[2:]))
            )
            sim = lncc_loss(pair["fixed"], warped, 7, pair["fixed_mask"])
            loss = loss + lncc_weight * sim
        epe = torch.zeros(())
        if "target" in pair and flow_target_weight > 0:
            target = resize_displacement(pair["target"], half_shape)
            epe = (disp_half - target).pow(2).sum(1).add(1e-6).sqrt().mean()
            loss = loss + flow_target_weight * epe
        opt.zero_grad()
        loss.backward()
        # Clipping keeps one odd synthetic pair from throwing the weights far away.
        torch.nn.utils.clip_grad_norm_(model.flow.parameters(), 1.0)
        opt.step()
        done = step
        if step % log_every == 0 or step == 1:
            _log(
                f"flow step {step}/{flow_steps} loss {loss.item():.4f} dice_loss {dice.item():.4f} "
                f"lncc_loss {sim.item():.4f} epe_half_vox {epe.item():.3f} diffusion {reg.item():.5f} "
                f"max_velocity {velocity.detach().abs().max().item():.2f} kind {pair['kind']} "
                f"seconds {time.perf_counter() - start:.1f}"
            )
        if step % checkpoint_every == 0:
            validate(f"flow_{step}")
            checkpoint(completed_affine_steps=affine_steps, completed_flow_steps=step)
        if time_budget and time.perf_counter() - start > time_budget:
            _log(f"flow phase stopped by time budget at step {step}")
            break
    hyper.update(
        completed_affine_steps=affine_steps,
        completed_flow_steps=done,
        seconds=round(time.perf_counter() - start, 1),
    )
    validate("end")
    save_model(model, out_path, {**hyper, "validation": validation})
    _log(f"saved {out_path} after {hyper['seconds']} s")
    return model.eval()


# ----------------------------------------------------------------------------------- fine-tuning


def finetune(
    out_path: str | os.PathLike,
    images: list[str | os.PathLike],
    *,
    fixed: str | os.PathLike | None = None,
    masks: list[str | os.PathLike] | None = None,
    fixed_mask: str | os.PathLike | None = None,
    init: str | os.PathLike | None = None,
    steps: int = 200,
    lr: float = 1e-4,
    diffusion_weight: float = 1.0,
    window: int = 7,
    seed: int = 0,
    threads: int | None = None,
    log_every: int = 10,
) -> RegistrationModel:
    """Unsupervised fine-tuning of the velocity U-Net on a cohort (LNCC + diffusion).

    Every image is first aligned to ``fixed`` (default: the first image) by the engine's affine
    stage and resampled once onto the fixed working grid; each step then trains on one random
    (fixed, image) pair. Masks (same order as ``images``) restrict the similarity; the fixed mask
    is the first mask when ``fixed`` is not given, else ``fixed_mask`` (a file on ``fixed``'s grid).
    """
    from atlasflow.io.images import Grid, load_image, load_mask
    from atlasflow.registration.engine import DEFAULT_MODEL, WorkingGrid, register_deep
    from atlasflow.transforms import Transform, apply_transform

    if not images:
        raise AtlasflowError("finetune needs at least one image")
    set_determinism(seed, threads)
    init = init or DEFAULT_MODEL
    model, meta = load_model(init)
    fixed_img = load_image(fixed if fixed is not None else images[0])
    mask_imgs = [load_image(m).data > 0 for m in masks] if masks else [None] * len(images)
    if len(mask_imgs) != len(images):
        raise AtlasflowError(f"{len(masks or [])} masks given for {len(images)} images")
    if fixed is not None and fixed_mask is not None:
        fixed_mask = load_mask(fixed_mask, fixed_img, fixed)
    else:
        fixed_mask = mask_imgs[0] if (fixed is None and masks) else None
    work = WorkingGrid.for_grid(fixed_img.grid)
    grid = Grid(work.shape, work.affine)
    fm = np.ones(fixed_img.data.shape, bool) if fixed_mask is None else fixed_mask
    fixed_t = torch.from_numpy(work.to_working(np.where(fm, fixed_img.data, 0).astype(np.float32)))[
        None, None
    ]
    mask_t = torch.from_numpy(work.to_working(fm.astype(np.float32)))[None, None]
    pairs = []
    for path, mask in zip(images, mask_imgs, strict=True):
        moving = load_image(path)
        if mask is not None:
            moving = moving.with_data(np.where(mask, moving.data, 0).astype(np.float32))
        aligned = register_deep(
            fixed_img, moving, fixed_mask=fixed_mask, model_path=str(init), affine_only=True
        )
        warped = apply_transform(moving, Transform(aligned.transform.affine), grid).data
        pairs.append(torch.from_numpy(warped.astype(np.float32))[None, None])
    model.train()
    for p in model.flow.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.flow.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        moving_t = pairs[int(torch.randint(len(pairs), (), generator=gen))]
        velocity, disp = flow_forward(model, fixed_t, moving_t, model.config.integration_steps)
        sim = lncc_loss(fixed_t, warp_tensor(moving_t, disp), window, mask_t)
        reg = diffusion_loss(velocity)
        loss = sim + diffusion_weight * reg
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.flow.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == 1:
            _log(
                f"finetune step {step}/{steps} loss {loss.item():.4f} lncc_loss {sim.item():.4f} diffusion {reg.item():.5f} seconds {time.perf_counter() - start:.1f}"
            )
    hyper = {
        "finetuned_from": str(init),
        "base": meta.get("hyper", {}),
        "images": [str(p) for p in images],
        "fixed": str(fixed) if fixed else str(images[0]),
        "steps": steps,
        "lr": lr,
        "diffusion_weight": diffusion_weight,
        "window": window,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 1),
    }
    save_model(model, out_path, hyper)
    _log(f"saved {out_path}")
    return model.eval()


# ----------------------------------------------------------------------------------- commands


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atlasflow train",
        description="Train the deep registration networks on synthetic pairs.",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output weights (.safetensors); a .json sidecar is written next to it",
    )
    p.add_argument(
        "--label-dir",
        default=None,
        help="folder of label maps (default: ../shared/data/synthseg_label_maps if present, else nilearn MNI152)",
    )
    p.add_argument("--cache-dir", default=None, help="folder for the resampled label-map cache")
    p.add_argument("--affine-steps", type=int, default=1000)
    p.add_argument("--flow-steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--diffusion-weight", type=float, default=0.5)
    p.add_argument("--lncc-weight", type=float, default=1.0)
    p.add_argument("--dice-weight", type=float, default=1.0)
    p.add_argument(
        "--flow-target-weight",
        type=float,
        default=0.1,
        help="weight of the end-point error against the known displacement of 'same' pairs",
    )
    p.add_argument(
        "--holdout-maps",
        type=int,
        default=4,
        help="last N label maps: validation only, never trained on",
    )
    p.add_argument(
        "--affine-fraction",
        type=float,
        default=0.2,
        help="share of --time-budget for the affine phase",
    )
    p.add_argument(
        "--max-std",
        type=float,
        default=4.0,
        help="largest random velocity standard deviation (voxels)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--init", default=None, help="start from these weights")
    p.add_argument("--limit-maps", type=int, default=None)
    p.add_argument(
        "--crop",
        type=int,
        nargs=3,
        default=None,
        help="train the U-Net on random crops of this size (voxels)",
    )
    p.add_argument(
        "--t1-probability",
        type=float,
        default=0.8,
        help="share of pairs with a T1-like contrast (rest: random contrasts)",
    )
    p.add_argument(
        "--same-probability",
        type=float,
        default=0.4,
        help="share of pairs drawn from one label map (known displacement); rest: two maps",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: all cores; 1 is faster on a busy machine)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop after this many seconds (affine phase: --affine-fraction of it)",
    )
    return p


def train_main(argv: list[str] | None = None) -> int:
    """``atlasflow train``: returns a process exit code."""
    args = _train_parser().parse_args(argv)
    label_dir = args.label_dir
    if label_dir is None and DEFAULT_LABEL_DIR.is_dir():
        label_dir = str(DEFAULT_LABEL_DIR)
    try:
        train(
            args.out,
            label_dir=label_dir,
            cache_dir=args.cache_dir,
            affine_steps=args.affine_steps,
            flow_steps=args.flow_steps,
            lr=args.lr,
            diffusion_weight=args.diffusion_weight,
            lncc_weight=args.lncc_weight,
            dice_weight=args.dice_weight,
            flow_target_weight=args.flow_target_weight,
            holdout_maps=args.holdout_maps,
            affine_fraction=args.affine_fraction,
            max_std=args.max_std,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            log_every=args.log_every,
            init=args.init,
            limit_maps=args.limit_maps,
            time_budget=args.time_budget,
            threads=args.threads,
            crop=args.crop,
            t1_probability=args.t1_probability,
            same_probability=args.same_probability,
        )
    except AtlasflowError as exc:
        print(f"atlasflow train: error: {exc}", file=sys.stderr)
        return 1
    return 0


def finetune_main(argv: list[str] | None = None) -> int:
    """``atlasflow finetune``: returns a process exit code."""
    p = argparse.ArgumentParser(
        prog="atlasflow finetune",
        description="Fine-tune the velocity network on a cohort (unsupervised, LNCC + diffusion).",
    )
    p.add_argument("--images", nargs="+", required=True, help="preprocessed images (NIfTI)")
    p.add_argument("--masks", nargs="+", default=None, help="brain masks, same order as --images")
    p.add_argument(
        "--fixed",
        default=None,
        help="fixed image (default: the first image), e.g. the current template",
    )
    p.add_argument("--fixed-mask", default=None, help="brain mask of --fixed (similarity only inside)")
    p.add_argument("--init", default=None, help="starting weights (default: the shipped model)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--diffusion-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    try:
        finetune(
            args.out,
            args.images,
            fixed=args.fixed,
            masks=args.masks,
            fixed_mask=args.fixed_mask,
            init=args.init,
            steps=args.steps,
            lr=args.lr,
            diffusion_weight=args.diffusion_weight,
            seed=args.seed,
            threads=args.threads,
        )
    except AtlasflowError as exc:
        print(f"atlasflow finetune: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
