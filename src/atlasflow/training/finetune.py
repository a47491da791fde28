"""Unsupervised fine-tuning of the velocity U-Net on a user's own images.

Owns :class:`FinetuneSettings` and :func:`finetune`: each image is registered to a fixed image
by the engine's affine stage, then the U-Net is trained on (fixed, image) pairs with LNCC +
diffusion. The workflow's ``atlas_finetune`` rule runs it through ``atlasflow finetune``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Grid, load_image, load_mask
from atlasflow.nn.layers import warp_tensor
from atlasflow.nn.losses import diffusion_loss, lncc_loss
from atlasflow.nn.model_io import load_model, save_model
from atlasflow.nn.networks import RegistrationModel
from atlasflow.registration.engine import DEFAULT_MODEL, register_deep
from atlasflow.registration.working_grid import WorkingGrid
from atlasflow.training.train import flow_forward, log_line, optimiser_step, set_determinism
from atlasflow.transforms import Transform, apply_transform


@dataclass(frozen=True)
class FinetuneSettings:
    """Settings of one :func:`finetune` run; the field names are those of ``atlasflow finetune``'s
    flags (``window`` and ``log_every`` have none)."""

    init: str | os.PathLike | None = None  # starting weights (None: the shipped model)
    steps: int = 200
    lr: float = 1e-4
    diffusion_weight: float = 1.0
    window: int = 7  # LNCC window (voxels)
    seed: int = 0
    threads: int | None = None
    log_every: int = 10


def finetune(
    out_path: str | os.PathLike,
    images: list[str | os.PathLike],
    settings: FinetuneSettings | None = None,
    *,
    fixed: str | os.PathLike | None = None,
    masks: list[str | os.PathLike] | None = None,
    fixed_mask: str | os.PathLike | None = None,
) -> RegistrationModel:
    """Unsupervised fine-tuning of the velocity U-Net on a cohort (LNCC + diffusion).

    Every image is first aligned to ``fixed`` (default: the first image) by the engine's affine
    stage and resampled once onto the fixed working grid; each step then trains on one random
    (fixed, image) pair. Masks (same order as ``images``) restrict the similarity; the fixed mask
    is the first mask when ``fixed`` is not given, else ``fixed_mask`` (a file on ``fixed``'s grid).
    """
    s = settings or FinetuneSettings()
    if not images:
        raise AtlasflowError("finetune needs at least one image")
    set_determinism(s.seed, s.threads)
    init = s.init or DEFAULT_MODEL
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
    opt = torch.optim.Adam(model.flow.parameters(), lr=s.lr)
    gen = torch.Generator().manual_seed(s.seed)
    start = time.perf_counter()
    for step in range(1, s.steps + 1):
        moving_t = pairs[int(torch.randint(len(pairs), (), generator=gen))]
        velocity, disp = flow_forward(model, fixed_t, moving_t, model.config.integration_steps)
        sim = lncc_loss(fixed_t, warp_tensor(moving_t, disp), s.window, mask_t)
        reg = diffusion_loss(velocity)
        loss = sim + s.diffusion_weight * reg
        optimiser_step(opt, loss, model.flow.parameters())
        if step % s.log_every == 0 or step == 1:
            log_line(
                f"finetune step {step}/{s.steps} loss {loss.item():.4f} lncc_loss {sim.item():.4f} diffusion {reg.item():.5f} seconds {time.perf_counter() - start:.1f}"
            )
    hyper = {
        "finetuned_from": str(init),
        "base": meta.get("hyper", {}),
        "images": [str(p) for p in images],
        "fixed": str(fixed) if fixed else str(images[0]),
        "steps": s.steps,
        "lr": s.lr,
        "diffusion_weight": s.diffusion_weight,
        "window": s.window,
        "seed": s.seed,
        "seconds": round(time.perf_counter() - start, 1),
    }
    save_model(model, out_path, hyper)
    log_line(f"saved {out_path}")
    return model.eval()
