"""The deep registration engine: one public function, :func:`register_deep`.

Owns the path from two Images on any grids to a world-space :class:`~atlasflow.transforms.Transform`:

1. working grid = the fixed grid, cropped to the fixed mask's bounding box (+8 voxels) when a
   mask is given, with its voxel axes reordered to RAS (a permutation, no resampling) and padded
   to a multiple of 16, so the networks always see brains the way round they were trained;
2. initial alignment by centres of mass (or ``init_affine``);
3. deep affine (12 parameters around the identity), kept only when it improves the similarity, then
   a short test-time optimisation of the affine (Adam on LNCC at quarter resolution);
4. deep SVF (U-Net, half-resolution velocity), integrated by scaling and squaring (7 steps);
5. optional instance optimisation of the velocity for ``refine_steps`` steps (Adam, LNCC +
   diffusion, masked by the fixed mask minus the cost mask), coarse-to-fine;
6. conversion to world millimetres on the fixed grid: forward displacement, inverse displacement
   (exp of the negated velocity, unless ``inverse=False``) and the velocity itself.

Everything runs in torch on ``device`` with deterministic algorithms; model loading is cached and
not counted in ``seconds``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Grid, Image
from atlasflow.nn import deterministic_kernels
from atlasflow.nn.layers import integrate_velocity, resize_displacement, warp_tensor
from atlasflow.nn.losses import diffusion_loss, fixed_statistics, local_ncc, soft_dice_loss
from atlasflow.nn.model_io import load_model
from atlasflow.nn.networks import RegistrationModel
from atlasflow.nn.optim import Adam
from atlasflow.transforms import Transform, apply_transform

MODEL_DIR = Path(__file__).resolve().parents[1] / "models"
DEFAULT_MODEL = MODEL_DIR / "atlasflow_synthmorph_2mm.safetensors"

#: Defaults of the test-time optimisation, chosen on synthetic pairs (not on the benchmark).
AFFINE_STEPS = 40
AFFINE_LR = 0.01
AFFINE_MIN_COARSE = 16  # voxels per axis below which the quarter-resolution affine level is skipped
REFINE_LR = 0.2
REFINE_WINDOW = 7
REFINE_DIFFUSION = 1.0
# Squarings of the exponential inside the refinement loss (the final field uses the model's).
# 2 scored as 5 on IXI tuning pairs (i, i+2) at 0.6x the time of a step; 0 (no exponential) lost
# 0.01 Dice.
REFINE_SQUARINGS = 2
#: Reach of the signed-distance region term (``label_term="distance"``) around a region's edge.
DISTANCE_CLIP_MM = 10.0


@dataclass
class DeepResult:
    """Output of :func:`register_deep` (all fields on the fixed grid, RAS mm)."""

    transform: Transform  # fixed -> moving
    inverse_displacement: Image | None  # x_fixed = y + v(y), y = affine^-1 x_moving (None: not asked for)
    velocity: Image | None  # stationary velocity field (world mm; None when not asked for)
    seconds: float  # compute time, model loading excluded
    # The same velocity on the network's own grid (half the working resolution, world mm): 1/8 of
    # the voxels, and exact as ``init_velocity`` of a later registration on the same working grid.
    coarse_velocity: Image | None = None


# ------------------------------------------------------------------------------- working grid


@dataclass
class WorkingGrid:
    """The fixed grid, optionally cropped to a box, reordered to RAS voxel axes and zero-padded
    to a multiple of ``multiple``.

    Cropping to the region that matters (the fixed mask and a margin) makes every network pass,
    integration and resampling proportionally cheaper; fields are carried back to the full fixed
    grid by repeating their values at the crop's faces.
    """

    fixed: Grid
    ornt: np.ndarray  # nibabel orientation transform fixed voxels -> RAS voxels
    ras_shape: tuple[int, int, int]
    pad_low: tuple[int, int, int]
    shape: tuple[int, int, int]
    affine: np.ndarray  # working voxel -> world
    crop: tuple[slice, slice, slice]  # region of the fixed grid the working grid covers

    @classmethod
    def for_grid(
        cls, fixed: Grid, multiple: int = 16, region: np.ndarray | None = None, margin: int = 8
    ) -> WorkingGrid:
        """``region`` (boolean, fixed grid): crop to its bounding box grown by ``margin`` voxels."""
        crop = tuple(slice(0, int(n)) for n in fixed.shape)
        if region is not None and np.any(region):
            idx = np.nonzero(region)
            crop = tuple(
                slice(max(int(i.min()) - margin, 0), min(int(i.max()) + margin + 1, int(n)))
                for i, n in zip(idx, fixed.shape, strict=True)
            )
        shape_c = tuple(b.stop - b.start for b in crop)
        affine_c = fixed.affine.copy()
        affine_c[:3, 3] = fixed.affine[:3, :3] @ np.array([b.start for b in crop], float) + fixed.affine[:3, 3]
        ornt = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(affine_c),
            nib.orientations.axcodes2ornt(("R", "A", "S")),
        )
        ras_affine = affine_c @ nib.orientations.inv_ornt_aff(ornt, shape_c)
        # ornt[i, 0] is the RAS axis of fixed axis i; RAS axis a gets the length of that fixed axis.
        ras_shape = [0, 0, 0]
        for i, (axis, _) in enumerate(ornt):
            ras_shape[int(axis)] = int(shape_c[i])
        shape = tuple(int(np.ceil(n / multiple) * multiple) for n in ras_shape)
        low = tuple((s - n) // 2 for s, n in zip(shape, ras_shape, strict=True))
        shift = np.eye(4)
        shift[:3, 3] = -np.array(low, float)
        return cls(fixed, ornt, tuple(ras_shape), low, shape, ras_affine @ shift, crop)

    def to_working(self, data: np.ndarray) -> np.ndarray:
        """Array on the fixed grid (X, Y, Z[, C]) -> working grid (crop, zero padding)."""
        ras = nib.orientations.apply_orientation(np.asarray(data)[self.crop], self.ornt)
        pad = [
            (lo, s - n - lo)
            for lo, s, n in zip(self.pad_low, self.shape, self.ras_shape, strict=True)
        ]
        pad += [(0, 0)] * (ras.ndim - 3)
        return np.ascontiguousarray(np.pad(ras, pad))

    def to_fixed(self, data: np.ndarray) -> np.ndarray:
        """Array on the working grid -> fixed grid (crop, then undo the axis reordering)."""
        sl = tuple(slice(lo, lo + n) for lo, n in zip(self.pad_low, self.ras_shape, strict=True))
        inverse = nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt(("R", "A", "S")),
            nib.orientations.io_orientation(self.fixed.affine),
        )
        cropped = nib.orientations.apply_orientation(np.asarray(data)[sl], inverse)
        faces = [(b.start, n - b.stop) for b, n in zip(self.crop, self.fixed.shape, strict=True)]
        if any(lo or hi for lo, hi in faces):
            cropped = np.pad(cropped, faces + [(0, 0)] * (cropped.ndim - 3), mode="edge")
        return np.ascontiguousarray(cropped)


# ------------------------------------------------------------------------------------ helpers


_MODEL_CACHE: dict[tuple[str, float], RegistrationModel] = {}


def get_model(model_path: str | os.PathLike | None, device: str = "cpu") -> RegistrationModel:
    """Load (once per process) the model at ``model_path`` or the shipped default."""
    path = Path(model_path) if model_path is not None else DEFAULT_MODEL
    if not path.is_file():
        raise AtlasflowError(f"{path}: registration model not found")
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _MODEL_CACHE:
        model, _ = load_model(path, device)
        for p in model.parameters():
            p.requires_grad_(False)
        _MODEL_CACHE[key] = model
    return _MODEL_CACHE[key]


def _pooled_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Voxel -> world of a grid pooled by ``factor`` (voxel k covers fine voxels k*f .. k*f+f-1)."""
    out = affine @ np.diag([float(factor)] * 3 + [1.0])
    out[:3, 3] = affine[:3, :3] @ np.full(3, (factor - 1) / 2) + affine[:3, 3]
    return out


def _coarse_affine(work: WorkingGrid, shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel -> world of a field on ``shape`` covering the working grid corner to corner (the
    ``align_corners`` sampling of :func:`resize_displacement`)."""
    scale = [(n - 1) / max(c - 1, 1) for n, c in zip(work.shape, shape, strict=True)]
    return work.affine @ np.diag([*scale, 1.0])


def _coarse_to_world(velocity: torch.Tensor, affine: np.ndarray) -> Image:
    """(1, 3, X, Y, Z) voxel units on the grid of ``affine`` -> world mm vectors on that grid."""
    linear = torch.from_numpy(affine[:3, :3]).float()
    return Image(torch.einsum("wc,cxyz->xyzw", linear, velocity[0].cpu()).numpy(), affine.copy())


def _coarse_from_world(velocity: Image, affine: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """World mm vector field (any grid) -> (1, 3, *shape) voxel units on the grid of ``affine``;
    resampled only when its grid is another one."""
    if velocity.data.ndim != 4 or velocity.data.shape[-1] != 3:
        raise AtlasflowError(f"init_velocity must be a 3-vector field, got shape {velocity.data.shape}")
    data = velocity.data
    if data.shape[:3] != tuple(shape) or not np.allclose(velocity.affine, affine, atol=1e-4):
        data = apply_transform(velocity, Transform.identity(), Grid(tuple(shape), affine), "linear").data
    vox = np.einsum("vw,xyzw->vxyz", np.linalg.inv(affine[:3, :3]), data.astype(np.float64))
    return torch.from_numpy(np.ascontiguousarray(vox, dtype=np.float32))[None]


def _centred_to_vox4(matrix: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """4x4 voxel matrix of the centred pull-back ``x -> M (x - c) + c + t``."""
    c = (np.array(shape, float) - 1) / 2
    out = np.eye(4)
    out[:3, :3] = matrix[:3, :3]
    out[:3, 3] = matrix[:3, 3] + c - matrix[:3, :3] @ c
    return out


def _centre_of_mass(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    weights = np.clip(np.asarray(data, np.float64), 0, None)
    total = weights.sum()
    if total <= 0:
        raise AtlasflowError("image is empty inside its mask; nothing to register")
    idx = [np.arange(n, dtype=np.float64) for n in weights.shape]
    com = np.array(
        [
            (weights.sum(axis=tuple(j for j in range(3) if j != a)) * idx[a]).sum() / total
            for a in range(3)
        ]
    )
    return affine[:3, :3] @ com + affine[:3, 3]


def _onehot(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
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


def _sample_moving(
    moving: torch.Tensor,
    vox_matrix: torch.Tensor,
    shape: tuple[int, int, int],
) -> torch.Tensor:
    """Sample ``moving`` (1, C, *moving shape) at ``vox_matrix @ ijk`` for the voxels ijk of a grid ``shape``.

    ``vox_matrix`` (4x4 torch) maps grid voxels to moving voxels; outside the moving image is zero.
    The voxel matrix is folded into one normalised affine for ``affine_grid``, half the time of
    building the coordinates by hand.
    """
    dtype, device = moving.dtype, moving.device
    grid_half = torch.tensor([max(n - 1, 1) / 2 for n in shape], dtype=dtype, device=device)
    to_moving = torch.tensor([2 / max(n - 1, 1) for n in moving.shape[2:]], dtype=dtype, device=device)
    # normalised grid u -> voxel i = (u + 1) * half -> moving voxel A i + b -> normalised 2 m / (N - 1) - 1
    linear = vox_matrix[:3, :3].to(dtype) * to_moving[:, None] * grid_half[None, :]
    offset = to_moving * (vox_matrix[:3, :3].to(dtype) @ grid_half + vox_matrix[:3, 3].to(dtype)) - 1
    # affine_grid and grid_sample order the axes x, y, z = k, j, i.
    theta = torch.cat([linear.flip(0, 1), offset.flip(0)[:, None]], 1)[None]
    grid = F.affine_grid(theta, [1, 1, *shape], align_corners=True)
    return F.grid_sample(moving, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def mask_box(mask: torch.Tensor, margin: int) -> tuple[slice, slice, slice]:
    """Bounding box (slices) of ``mask > 0`` grown by ``margin`` voxels, clipped to the grid."""
    idx = torch.nonzero(mask[0, 0] > 0)
    if idx.numel() == 0:
        return tuple(slice(0, n) for n in mask.shape[2:])
    lo = (idx.min(0).values - margin).clamp_min(0)
    hi = idx.max(0).values + margin + 1
    return tuple(
        slice(int(a), min(int(b), n)) for a, b, n in zip(lo, hi, mask.shape[2:], strict=True)
    )


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


def _global_ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask > 0
    x, y = a[m], b[m]
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / ((x.pow(2).sum() * y.pow(2).sum()).sqrt() + 1e-8))


# ------------------------------------------------------------------------------------ affine


def optimise_affine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    mask: torch.Tensor,
    base: torch.Tensor,
    steps: int,
    lr: float = AFFINE_LR,
    window: int = 5,
) -> torch.Tensor:
    """Refine a 4x4 grid-voxel -> moving-voxel matrix ``base`` by Adam on LNCC over ``fixed``'s grid.

    The update is a centred affine on the grid (translation scaled by 10 voxels so every parameter
    is of order one); returns the refined 4x4 matrix.
    """
    # Only the region around the mask matters: crop to it (the loss ignores the rest anyway).
    box = mask_box(mask, window)
    shift = torch.eye(4, dtype=base.dtype)
    shift[:3, 3] = torch.tensor([float(b.start) for b in box], dtype=base.dtype)
    base = base @ shift
    fixed, mask = fixed[(..., *box)], mask[(..., *box)]
    shape = tuple(fixed.shape[2:])
    c = torch.tensor([(n - 1) / 2 for n in shape], dtype=fixed.dtype)
    params = torch.zeros(3, 4, requires_grad=True)
    opt = Adam([params], lr=lr)
    eye = torch.eye(4, dtype=fixed.dtype)

    def matrix_of(p: torch.Tensor) -> torch.Tensor:
        lin = torch.eye(3) + p[:, :3]
        upd = torch.cat([torch.cat([lin, (10 * p[:, 3] + c - lin @ c)[:, None]], 1), eye[3:]], 0)
        return base @ upd

    stats = fixed_statistics(fixed, window)
    for _ in range(steps):
        opt.zero_grad()
        warped = _sample_moving(moving, matrix_of(params), shape)
        loss = 1 - local_ncc(fixed, warped, window, mask, fixed_stats=stats)
        loss.backward()
        opt.step()
    return matrix_of(params.detach()) @ torch.linalg.inv(shift)


# ------------------------------------------------------------------------------------ refine


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
    fixed_seg: torch.Tensor | None = None,
    moving_seg: torch.Tensor | None = None,
    seg_weight: float = 1.0,
    seg_loss: str = "dice",
) -> torch.Tensor:
    """Instance optimisation of a half-resolution velocity (Adam on 1 - LNCC + diffusion).

    Only the velocity inside the box around the mask is optimised (the rest cannot change the
    loss). Coarse-to-fine: the first ``coarse_share`` of the steps compares images at half
    resolution, the rest at full resolution. The exponential uses fewer squaring steps here than
    the final one (``REFINE_SQUARINGS``: 2 scored as 5 on IXI tuning pairs).

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
    stats_full = fixed_statistics(fixed_box, window) if steps > int(round(steps * coarse_share)) else None

    v_box = velocity[(..., *box_half)].detach().clone().requires_grad_(True)
    opt = Adam([v_box], lr=lr)
    coarse = int(round(steps * coarse_share))
    for step in range(steps):
        opt.zero_grad()
        disp_half = integrate_velocity(v_box, integration_steps)
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


# ------------------------------------------------------------------------------------ public


def register_deep(
    fixed: Image,
    moving: Image,
    *,
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
    cost_mask: np.ndarray | None = None,
    model_path: str | None = None,
    refine_steps: int = 0,
    affine_only: bool = False,
    init_affine: np.ndarray | None = None,
    init_velocity: Image | None = None,
    device: str = "cpu",
    seed: int = 0,
    affine_steps: int = AFFINE_STEPS,
    affine_network: bool = True,
    inverse: bool = True,
    full_velocity: bool = True,
    fixed_labels: np.ndarray | None = None,
    moving_labels: np.ndarray | None = None,
    label_weight: float = 1.0,
    label_term: str = "dice",
) -> DeepResult:
    """Register ``moving`` to ``fixed``; the transform maps fixed world points to moving ones.

    Masks live on their own image's grid (similarity only inside); ``cost_mask`` (fixed grid) marks
    voxels left out of the similarity (for example a tumour). ``init_affine`` (4x4, fixed world ->
    moving world) replaces the centre-of-mass initialisation; with ``affine_network=False``
    it is only refined by ``affine_steps`` of test-time optimisation (an atlas iteration, whose
    members are already affinely aligned to the template). ``fixed_labels``/``moving_labels``
    (integer maps on their image's grid) add ``label_weight`` x soft Dice over the labels present
    in both to the instance optimisation (``refine_steps`` > 0). ``label_term="distance"`` treats
    the labels as one region (label > 0) and matches clipped signed distances to its edge instead
    (:func:`signed_distance`): depth inside and distance outside are kept, so a growing region
    is mapped by an expansion of its inside, not by stretching a thin shell at its edge.
    ``init_velocity`` (world mm, typically a previous result's ``coarse_velocity``) is a deformation
    to start from, after the affine: the network sees the moving image warped by it and its
    prediction is added (a cascade; the atlas iterations carry each member's field this way).
    ``full_velocity=False`` leaves the velocity on the fixed grid out (``velocity`` is None;
    ``coarse_velocity`` holds it on the network's grid), as ``inverse=False`` does the inverse.
    """
    for name, mask, image in (
        ("fixed_mask", fixed_mask, fixed),
        ("moving_mask", moving_mask, moving),
        ("cost_mask", cost_mask, fixed),
        ("fixed_labels", fixed_labels, fixed),
        ("moving_labels", moving_labels, moving),
    ):
        if mask is not None and tuple(np.shape(mask)) != tuple(image.data.shape[:3]):
            raise AtlasflowError(
                f"{name} has shape {np.shape(mask)}, expected {image.data.shape[:3]}"
            )
    if fixed.data.ndim != 3 or moving.data.ndim != 3:
        raise AtlasflowError("register_deep needs 3-D images")
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    # Affine-only registration still works without any weights (moments + test-time optimisation).
    no_weights = affine_only and model_path is None and not DEFAULT_MODEL.exists()
    model = None if no_weights else get_model(model_path, device)
    torch.manual_seed(seed)
    deterministic_kernels()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    start = time.perf_counter()

    fmask_np = np.ones(fixed.data.shape, bool) if fixed_mask is None else np.asarray(fixed_mask) > 0
    region = None if fixed_mask is None else fmask_np.copy()
    if region is not None and fixed_labels is not None:
        region |= np.asarray(fixed_labels) > 0
    work = WorkingGrid.for_grid(fixed.grid, region=region)
    fixed_np = np.where(fmask_np, fixed.data, 0).astype(np.float32)
    cost_np = fmask_np if cost_mask is None else fmask_np & ~(np.asarray(cost_mask) > 0)
    mmask_np = (
        np.ones(moving.data.shape, bool) if moving_mask is None else np.asarray(moving_mask) > 0
    )
    moving_np = np.where(mmask_np, moving.data, 0).astype(np.float32)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(device)

    fixed_t = tensor(work.to_working(fixed_np))
    cost_t = tensor(work.to_working(cost_np))
    moving_t = tensor(moving_np)

    # 1. Initial alignment (fixed world -> moving world).
    if init_affine is not None:
        world = np.asarray(init_affine, float)
    else:
        world = np.eye(4)
        world[:3, 3] = _centre_of_mass(moving_np, moving.affine) - _centre_of_mass(
            fixed_np, fixed.affine
        )
    inv_moving = np.linalg.inv(moving.affine)

    def vox_matrix(world_map: np.ndarray, grid_affine: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(inv_moving @ world_map @ grid_affine).float()

    # 2. Deep affine on the working grid, kept only when it helps.
    half_affine = _pooled_affine(work.affine, 2)
    fixed_half = F.avg_pool3d(fixed_t, 2)
    cost_half = F.avg_pool3d(cost_t, 2)

    def blurred() -> torch.Tensor:
        return F.avg_pool3d(moving_t, 3, stride=1, padding=1, count_include_pad=False)

    with torch.no_grad():
        # (Skipped when the affine is known, as in the atlas iterations: the network would not run.)
        if model is not None and affine_network:
            blurred_moving = blurred()
            moving_w = _sample_moving(moving_t, vox_matrix(world, work.affine), work.shape)
            pred = model.affine(torch.cat([fixed_t, moving_w], 1))[0].double().numpy()
            cand = (
                world
                @ work.affine
                @ _centred_to_vox4(pred, work.shape)
                @ np.linalg.inv(work.affine)
            )
            before = _global_ncc(
                fixed_half,
                _sample_moving(
                    blurred_moving, vox_matrix(world, half_affine), fixed_half.shape[2:]
                ),
                cost_half,
            )
            after = _global_ncc(
                fixed_half,
                _sample_moving(blurred_moving, vox_matrix(cand, half_affine), fixed_half.shape[2:]),
                cost_half,
            )
            if after > before:
                world = cand
    # 3. Test-time affine optimisation at quarter resolution (8x fewer voxels than half: on IXI
    # pairs the same Dice, 0.18 s instead of 1.3 s). Grids too small for a quarter level (under
    # 16 voxels an axis) use half resolution.
    if affine_steps > 0:
        if min(work.shape) // 4 >= AFFINE_MIN_COARSE:
            moving_q = F.avg_pool3d(moving_t, 2, ceil_mode=True)
            moving_q_affine = _pooled_affine(moving.affine, 2)
            moving_q = F.avg_pool3d(moving_q, 3, stride=1, padding=1, count_include_pad=False)
            quarter_affine = _pooled_affine(work.affine, 4)
            refined = optimise_affine(
                F.avg_pool3d(fixed_half, 2),
                moving_q,
                F.avg_pool3d(cost_half, 2),
                torch.from_numpy(np.linalg.inv(moving_q_affine) @ world @ quarter_affine).float(),
                affine_steps,
                window=3,
            )
            world = moving_q_affine @ refined.double().numpy() @ np.linalg.inv(quarter_affine)
        else:
            refined = optimise_affine(
                fixed_half, blurred(), cost_half, vox_matrix(world, half_affine), affine_steps
            )
            world = moving.affine @ refined.double().numpy() @ np.linalg.inv(half_affine)

    zeros = np.zeros((*fixed.data.shape, 3), np.float32)
    if affine_only:
        seconds = time.perf_counter() - start
        return DeepResult(
            Transform(world, Image(zeros, fixed.affine.copy())),
            Image(zeros.copy(), fixed.affine.copy()),
            Image(zeros.copy(), fixed.affine.copy()),
            seconds,
        )

    # 4. Deep SVF on the affinely aligned pair (or on the pair as ``init_velocity`` leaves it).
    steps = model.config.integration_steps
    with torch.no_grad():
        moving_w = _sample_moving(moving_t, vox_matrix(world, work.affine), work.shape)
        start_velocity, moving_s = None, moving_w
        if init_velocity is not None:
            coarse_shape = tuple(n // 2 for n in work.shape)
            start_velocity = _coarse_from_world(init_velocity, _coarse_affine(work, coarse_shape), coarse_shape)
            start_velocity = start_velocity.to(device)
            start_disp = integrate_velocity(start_velocity, steps)
            moving_s = warp_tensor(moving_w, resize_displacement(start_disp, work.shape))
        velocity = model.flow(torch.cat([fixed_t, moving_s], 1)).contiguous()
        half_shape = tuple(velocity.shape[2:])
        if start_velocity is not None and tuple(start_velocity.shape[2:]) != half_shape:
            raise AtlasflowError(f"network field {half_shape} is not half the working grid {work.shape}")
        # Keep the network's field only when it improves the (masked) similarity at half
        # resolution; otherwise keep the start (the identity, or ``init_velocity``).
        fixed_h, moving_h, cost_h = (
            F.interpolate(t, size=half_shape, mode="trilinear", align_corners=True)
            for t in (fixed_t, moving_w, cost_t)
        )
        if start_velocity is not None:
            # Stationary fields add to first order (exp(u) o exp(r) ~ exp(u + r)): one field,
            # integrated once, keeps a single transform representation. The start is scored
            # like the candidate (the half-resolution image warped at half resolution): scored
            # off the full-resolution warp instead, it looked better and every residual lost.
            start_h = warp_tensor(moving_h, start_disp)
            velocity = start_velocity + velocity
        disp_half = integrate_velocity(velocity, steps)
        if local_ncc(fixed_h, warp_tensor(moving_h, disp_half), 3, cost_h) <= local_ncc(
            fixed_h, moving_h if start_velocity is None else start_h, 3, cost_h
        ):
            if start_velocity is None:
                velocity, disp_half = torch.zeros_like(velocity), torch.zeros_like(velocity)
            else:
                velocity, disp_half = start_velocity, start_disp
    # 5. Instance optimisation.
    if refine_steps > 0:
        segs = {}
        if fixed_labels is not None and moving_labels is not None:
            shared = np.intersect1d(np.unique(fixed_labels), np.unique(moving_labels))
            shared = shared[shared != 0]
            # Distances are shifted so that "far outside" is 0: the zero padding of the working
            # grid and of resampling then reads as far outside, not as the region's edge.
            far = 0.0
            if label_term == "distance" and shared.size:
                unit = float(np.mean(fixed.grid.spacing))  # fixed voxels, on both sides
                far = DISTANCE_CLIP_MM / unit
                fixed_seg = signed_distance(np.asarray(fixed_labels) > 0, fixed.grid.spacing, unit)
                moving_seg = signed_distance(np.asarray(moving_labels) > 0, moving.grid.spacing, unit)
                fixed_seg, moving_seg = fixed_seg[..., None] - far, moving_seg[..., None] - far
            elif shared.size:
                fixed_seg = _onehot(fixed_labels, shared)
                moving_seg = _onehot(moving_labels, shared)
            if shared.size:
                fixed_seg_t = torch.from_numpy(np.ascontiguousarray(work.to_working(fixed_seg)))
                with torch.no_grad():
                    segs = {
                        "fixed_seg": fixed_seg_t.permute(3, 0, 1, 2)[None].to(device) + far,
                        "moving_seg": _sample_moving(
                            torch.from_numpy(moving_seg).permute(3, 0, 1, 2)[None].to(device),
                            vox_matrix(world, work.affine),
                            work.shape,
                        )
                        + far,
                        "seg_weight": label_weight,
                        "seg_loss": label_term,
                    }
        velocity = refine_velocity(fixed_t, moving_w, cost_t, velocity, refine_steps, **segs)
        with torch.no_grad():
            disp_half = integrate_velocity(velocity, model.config.integration_steps)
    # 6. Fields in working voxels -> world mm on the fixed grid.
    with torch.no_grad():
        forward = resize_displacement(disp_half, work.shape)
        backward = resize_displacement(integrate_velocity(-velocity, steps), work.shape) if inverse else None
        velocity_full = resize_displacement(velocity, work.shape) if full_velocity else None
    linear = torch.from_numpy(work.affine[:3, :3]).float()

    def to_world(field: torch.Tensor) -> Image:
        vec = torch.einsum("wc,cxyz->xyzw", linear, field[0].cpu()).numpy()
        return Image(work.to_fixed(vec).astype(np.float32), fixed.affine.copy())

    result = DeepResult(
        Transform(world, to_world(forward)),
        to_world(backward) if backward is not None else None,
        to_world(velocity_full) if velocity_full is not None else None,
        0.0,
        _coarse_to_world(velocity, _coarse_affine(work, half_shape)),
    )
    result.seconds = time.perf_counter() - start
    return result
