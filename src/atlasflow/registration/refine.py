"""The engine's instance optimisation: the network's velocity refined on the pair itself.

:func:`refine_velocity` runs Adam on 1 - LNCC + diffusion over a half-resolution stationary
velocity, coarse-to-fine, inside the box around the mask. With label maps of regions that
correspond (:func:`label_targets`) a label term joins: soft Dice per label, or the squared
difference of clipped signed distances to one region's edge (:func:`signed_distance`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from atlasflow.io.images import Image
from atlasflow.nn.layers import integrate_velocity
from atlasflow.nn.losses import diffusion_loss, fixed_statistics, local_ncc, soft_dice_loss
from atlasflow.nn.optim import Adam
from atlasflow.registration.working_grid import WorkingPair, mask_box, sample_moving

REFINE_LR = 0.2
REFINE_WINDOW = 7
REFINE_DIFFUSION = 1.0
# Squarings of the exponential inside the refinement loss (the final field uses the model's, 7).
# 2 scored as 5 on IXI tuning pairs (i, i+2) at 0.6x the time of a step (5 in the full-resolution
# steps: 0.697 -> 0.695); 0 (no exponential) lost 0.01 Dice. Large local deformations need more
# (RegistrationOptions.fine_squarings, the longitudinal stage's 5).
REFINE_SQUARINGS = 2
#: Reach of the signed-distance region term (``label_term="distance"``) around a region's edge.
DISTANCE_CLIP_MM = 10.0


def label_targets(
    pair: WorkingPair,
    world: np.ndarray,
    fixed: Image,
    moving: Image,
    fixed_labels: np.ndarray,
    moving_labels: np.ndarray,
    weight: float,
    term: str,
) -> dict:
    """The label term's keyword arguments of :func:`refine_velocity` (none when the two maps
    share no label): the fixed labels on the working grid, the moving ones sampled through
    ``world`` onto it."""
    shared = np.intersect1d(np.unique(fixed_labels), np.unique(moving_labels))
    shared = shared[shared != 0]
    if not shared.size:
        return {}
    # Distances are shifted so that "far outside" is 0: the zero padding of the working
    # grid and of resampling then reads as far outside, not as the region's edge.
    far = 0.0
    if term == "distance":
        unit = float(np.mean(fixed.grid.spacing))  # fixed voxels, on both sides
        far = DISTANCE_CLIP_MM / unit
        fixed_seg = signed_distance(np.asarray(fixed_labels) > 0, fixed.grid.spacing, unit)
        moving_seg = signed_distance(np.asarray(moving_labels) > 0, moving.grid.spacing, unit)
        fixed_seg, moving_seg = fixed_seg[..., None] - far, moving_seg[..., None] - far
    else:
        fixed_seg = onehot(fixed_labels, shared)
        moving_seg = onehot(moving_labels, shared)
    work, device = pair.work, pair.device
    fixed_seg_t = torch.from_numpy(np.ascontiguousarray(work.to_working(fixed_seg)))
    with torch.no_grad():
        return {
            "fixed_seg": fixed_seg_t.permute(3, 0, 1, 2)[None].to(device) + far,
            "moving_seg": sample_moving(
                torch.from_numpy(moving_seg).permute(3, 0, 1, 2)[None].to(device),
                pair.vox_matrix(world, work.affine),
                work.shape,
            )
            + far,
            "seg_weight": weight,
            "seg_loss": term,
        }


def refine(
    pair: WorkingPair,
    moving_w: torch.Tensor,
    velocity: torch.Tensor,
    steps: int,
    integration_steps: int,
    fine_squarings: int | None = None,
    **labels,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``velocity`` after ``steps`` of :func:`refine_velocity` (``moving_w``: the moving image on
    the working grid; ``fine_squarings``: its ``fine_integration_steps``), and its displacement
    integrated by ``integration_steps`` squarings."""
    velocity = refine_velocity(
        pair.fixed_t,
        moving_w,
        pair.cost_t,
        velocity,
        steps,
        fine_integration_steps=fine_squarings,
        **labels,
    )
    with torch.no_grad():
        return velocity, integrate_velocity(velocity, integration_steps)


def onehot(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(X, Y, Z, 1 + len(values)) float32: channel 0 = none of ``values``, then one per value."""
    channels = [~np.isin(labels, values)] + [labels == v for v in values]
    return np.ascontiguousarray(np.stack(channels, -1), dtype=np.float32)


def signed_distance(
    region: np.ndarray, spacing: np.ndarray, unit_mm: float, clip_mm: float = DISTANCE_CLIP_MM
) -> np.ndarray:
    """Signed distance to the edge of ``region`` in units of ``unit_mm`` (negative inside), clipped
    to +-``clip_mm``, float32. In voxel units a one-voxel mismatch costs 1 in the squared loss, on
    the scale of the image term; the clip keeps the term local: beyond it, tissue is left to the
    image similarity."""
    from scipy import ndimage

    region = np.asarray(region, bool)
    clip = clip_mm / unit_mm
    if not region.any():
        return np.full(region.shape, clip, np.float32)
    # Voxel centres sit half a voxel from the edge between an inside and an outside voxel.
    half = 0.5 * float(np.mean(spacing))
    outside = ndimage.distance_transform_edt(~region, sampling=spacing) - half
    inside = ndimage.distance_transform_edt(region, sampling=spacing) - half
    distance = np.where(region, -inside, outside) / unit_mm
    return np.clip(distance, -clip, clip).astype(np.float32)


def warp_region(
    src: torch.Tensor, disp: torch.Tensor, offset: tuple[int, int, int]
) -> torch.Tensor:
    """Sample ``src`` at ``ijk + offset + disp`` for the voxels ``ijk`` of a region of its grid."""
    # The normalised base grid is built per axis and the displacement scaled once: this halves
    # the full-size temporaries (and their backward) of the naive identity + disp -> normalise.
    scale = [2.0 / max(n - 1, 1) for n in src.shape[2:]]
    axes = [
        (torch.arange(n, dtype=disp.dtype, device=disp.device) + o) * s - 1
        for n, o, s in zip(disp.shape[2:], offset, scale, strict=True)
    ]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], -1)[None]
    step = torch.tensor(scale[::-1], dtype=disp.dtype, device=disp.device)
    grid = base + disp.flip(1).permute(0, 2, 3, 4, 1) * step
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _linear_matrix(coords: torch.Tensor, n: int) -> torch.Tensor:
    """(len(coords), n) weights of linear interpolation at ``coords`` (clamped to the border)."""
    coords = coords.clamp(0, n - 1)
    low = coords.floor()
    frac = coords - low
    low = low.long()
    high = (low + 1).clamp(max=n - 1)
    rows = torch.arange(coords.numel())
    matrix = torch.zeros(coords.numel(), n, dtype=coords.dtype, device=coords.device)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix


def _upsample_region(
    disp_half: torch.Tensor,
    offset_half: tuple[int, ...],
    half_shape: tuple[int, ...],
    box: tuple[slice, ...],
    full_shape: tuple[int, ...],
) -> torch.Tensor:
    """Full-resolution displacement on the voxels ``box`` from a half-resolution field on a region.

    Uses the same grid correspondence as :func:`resize_displacement` (corner-aligned), so the
    optimised field and the one the final full-grid integration gives agree. Trilinear
    interpolation is separable: three small matrix products, ~5x faster (forward + backward) than
    ``grid_sample`` on the same points, which dominated a refinement step.
    """
    ratio = [(h - 1) / max(n - 1, 1) for h, n in zip(half_shape, full_shape, strict=True)]
    mx, my, mz = (
        _linear_matrix(
            torch.arange(b.start, b.stop, dtype=disp_half.dtype, device=disp_half.device) * r - o,
            n,
        )
        for b, r, o, n in zip(box, ratio, offset_half, disp_half.shape[2:], strict=True)
    )
    up = torch.einsum("ax,ncxyz->ncayz", mx, disp_half)
    up = torch.einsum("by,ncayz->ncabz", my, up)
    up = torch.einsum("dz,ncabz->ncabd", mz, up)
    return up / torch.tensor(ratio, dtype=up.dtype, device=up.device).view(1, 3, 1, 1, 1)


def refine_velocity(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    mask: torch.Tensor,
    velocity: torch.Tensor,
    steps: int,
    lr: float = REFINE_LR,
    window: int = REFINE_WINDOW,
    diffusion_weight: float = REFINE_DIFFUSION,
    integration_steps: int = REFINE_SQUARINGS,
    coarse_share: float = 0.7,
    fine_integration_steps: int | None = None,
    fixed_seg: torch.Tensor | None = None,
    moving_seg: torch.Tensor | None = None,
    seg_weight: float = 1.0,
    seg_loss: str = "dice",
) -> torch.Tensor:
    """Instance optimisation of a half-resolution velocity (Adam on 1 - LNCC + diffusion).

    Only the velocity inside the box around the mask is optimised (the rest cannot change the
    loss). Coarse-to-fine: the first ``coarse_share`` of the steps compares images at half
    resolution, the rest at full resolution. The exponential uses fewer squaring steps here than
    the final one: ``integration_steps`` (:data:`REFINE_SQUARINGS`), in the full-resolution steps
    ``fine_integration_steps`` when given.

    ``fixed_seg``/``moving_seg`` (one-hot, channel 0 = background, on the grid of ``fixed``) add
    ``seg_weight`` x soft Dice: regions that correspond even where their intensities do not (a
    tumour left out of the similarity by the mask) are mapped onto each other. With
    ``seg_loss="distance"`` they are instead one channel each of a clipped signed distance (in
    voxels) to a region's edge (:func:`signed_distance`), compared by their mean squared
    difference where the fixed one is not clipped.
    """
    full_shape = tuple(fixed.shape[2:])
    half_shape = tuple(velocity.shape[2:])

    def halve(t: torch.Tensor) -> torch.Tensor:
        small = F.avg_pool3d(t, 2)
        if tuple(small.shape[2:]) == half_shape:
            return small
        return F.interpolate(t, size=half_shape, mode="trilinear", align_corners=True)

    fixed_half, moving_half, mask_half = halve(fixed), halve(moving), halve(mask)
    use_seg = fixed_seg is not None and moving_seg is not None

    def seg_term(fixed_part: torch.Tensor, warped_part: torch.Tensor) -> torch.Tensor:
        if seg_loss == "distance":
            # the band where the fixed distance is not clipped
            band = (fixed_part.abs() < fixed_part.abs().max() - 1e-3).to(fixed_part.dtype)
            return ((fixed_part - warped_part) ** 2 * band).sum() / band.sum().clamp_min(1.0)
        return soft_dice_loss(fixed_part, warped_part)

    box_mask = mask
    if use_seg:
        fixed_seg_half, moving_seg_half = halve(fixed_seg), halve(moving_seg)
        # The optimised box must hold the segmented regions too: the mask may leave them out.
        if seg_loss == "distance":
            region = fixed_seg < fixed_seg.abs().max() - 1e-3
        else:
            region = fixed_seg[:, 1:].sum(1, keepdim=True) > 0
        box_mask = torch.maximum(mask, region.to(mask.dtype))
    box_mask_half = halve(box_mask) if use_seg else mask_half
    box_half = mask_box(box_mask_half, max(2, window // 2))
    offset_half = tuple(b.start for b in box_half)
    box = mask_box(box_mask, window)
    offset = tuple(b.start for b in box)
    fixed_box, mask_full_box = fixed[(..., *box)], mask[(..., *box)]
    fixed_hb, mask_hb = fixed_half[(..., *box_half)], mask_half[(..., *box_half)]
    window_half = max(3, window // 2 + 1)
    # The fixed images' local statistics are the same at every step.
    stats_half = fixed_statistics(fixed_hb, window_half)
    stats_full = (
        fixed_statistics(fixed_box, window) if steps > int(round(steps * coarse_share)) else None
    )

    v_box = velocity[(..., *box_half)].detach().clone().requires_grad_(True)
    opt = Adam([v_box], lr=lr)
    coarse = int(round(steps * coarse_share))
    for step in range(steps):
        opt.zero_grad()
        squarings = integration_steps
        if step >= coarse and fine_integration_steps:
            squarings = fine_integration_steps
        disp_half = integrate_velocity(v_box, squarings)
        if step < coarse:
            warped = warp_region(moving_half, disp_half, offset_half)
            sim = 1 - local_ncc(fixed_hb, warped, window_half, mask_hb, fixed_stats=stats_half)
            if use_seg:
                sim = sim + seg_weight * seg_term(
                    fixed_seg_half[(..., *box_half)],
                    warp_region(moving_seg_half, disp_half, offset_half),
                )
        else:
            disp = _upsample_region(disp_half, offset_half, half_shape, box, full_shape)
            warped = warp_region(moving, disp, offset)
            sim = 1 - local_ncc(fixed_box, warped, window, mask_full_box, fixed_stats=stats_full)
            if use_seg:
                sim = sim + seg_weight * seg_term(
                    fixed_seg[(..., *box)], warp_region(moving_seg, disp, offset)
                )
        loss = sim + diffusion_weight * diffusion_loss(v_box)
        loss.backward()
        opt.step()
    out = velocity.detach().clone()
    out[(..., *box_half)] = v_box.detach()
    return out
