"""The engine's working grid, and the pair of images brought onto it.

The networks run on the fixed grid cropped to the region that matters, its voxel axes reordered
to RAS (a permutation, no resampling) and padded to a multiple of 16 (:class:`WorkingGrid`), so
they always see brains the way round they were trained. :func:`prepare_pair` masks both images
and makes the tensors every stage of :func:`~atlasflow.registration.engine.register_deep` starts
from (:class:`WorkingPair`). Also here: the moving image sampled through a voxel matrix, the
coarser grids (pooled, and the network's half-resolution one) and mask bounding boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Grid, Image
from atlasflow.transforms import Transform, apply_transform


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
        affine_c[:3, 3] = (
            fixed.affine[:3, :3] @ np.array([b.start for b in crop], float) + fixed.affine[:3, 3]
        )
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


@dataclass
class WorkingPair:
    """A pair ready for the engine: the fixed image and the similarity mask on the working grid,
    the moving image on its own grid (both masked, float32 tensors of shape (1, 1, X, Y, Z))."""

    work: WorkingGrid
    fixed_np: np.ndarray  # the masked fixed image, fixed grid
    moving_np: np.ndarray  # the masked moving image, moving grid
    moving_affine: np.ndarray
    fixed_t: torch.Tensor
    cost_t: torch.Tensor  # where the similarity counts: the fixed mask less the cost mask
    moving_t: torch.Tensor
    inv_moving: np.ndarray  # moving world -> moving voxels
    device: str

    def vox_matrix(self, world_map: np.ndarray, grid_affine: np.ndarray) -> torch.Tensor:
        """Voxels of the grid ``grid_affine`` -> moving voxels, through ``world_map`` (fixed world
        -> moving world), as the 4x4 float32 matrix :func:`sample_moving` takes."""
        return torch.from_numpy(self.inv_moving @ world_map @ grid_affine).float()


def prepare_pair(
    fixed: Image,
    moving: Image,
    fixed_mask: np.ndarray | None,
    moving_mask: np.ndarray | None,
    cost_mask: np.ndarray | None,
    fixed_labels: np.ndarray | None,
    device: str,
) -> WorkingPair:
    """Mask both images, choose the working grid (cropped to the fixed mask and the fixed labels
    when a mask is given) and make the tensors on ``device``."""
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

    return WorkingPair(
        work,
        fixed_np,
        moving_np,
        moving.affine,
        tensor(work.to_working(fixed_np)),
        tensor(work.to_working(cost_np)),
        tensor(moving_np),
        np.linalg.inv(moving.affine),
        device,
    )


# ------------------------------------------------------------------------------ other grids


def pooled_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Voxel -> world of a grid pooled by ``factor`` (voxel k covers fine voxels k*f .. k*f+f-1)."""
    out = affine @ np.diag([float(factor)] * 3 + [1.0])
    out[:3, 3] = affine[:3, :3] @ np.full(3, (factor - 1) / 2) + affine[:3, 3]
    return out


def coarse_affine(work: WorkingGrid, shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel -> world of a field on ``shape`` covering the working grid corner to corner (the
    ``align_corners`` sampling of :func:`resize_displacement`)."""
    scale = [(n - 1) / max(c - 1, 1) for n, c in zip(work.shape, shape, strict=True)]
    return work.affine @ np.diag([*scale, 1.0])


def coarse_to_world(velocity: torch.Tensor, affine: np.ndarray) -> Image:
    """(1, 3, X, Y, Z) voxel units on the grid of ``affine`` -> world mm vectors on that grid."""
    linear = torch.from_numpy(affine[:3, :3]).float()
    return Image(torch.einsum("wc,cxyz->xyzw", linear, velocity[0].cpu()).numpy(), affine.copy())


def coarse_from_world(
    velocity: Image, affine: np.ndarray, shape: tuple[int, int, int]
) -> torch.Tensor:
    """World mm vector field (any grid) -> (1, 3, *shape) voxel units on the grid of ``affine``;
    resampled only when its grid is another one."""
    if velocity.data.ndim != 4 or velocity.data.shape[-1] != 3:
        raise AtlasflowError(
            f"init_velocity must be a 3-vector field, got shape {velocity.data.shape}"
        )
    data = velocity.data
    if data.shape[:3] != tuple(shape) or not np.allclose(velocity.affine, affine, atol=1e-4):
        data = apply_transform(
            velocity, Transform.identity(), Grid(tuple(shape), affine), "linear"
        ).data
    vox = np.einsum("vw,xyzw->vxyz", np.linalg.inv(affine[:3, :3]), data.astype(np.float64))
    return torch.from_numpy(np.ascontiguousarray(vox, dtype=np.float32))[None]


# ------------------------------------------------------------------------------- sampling


def sample_moving(
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
    to_moving = torch.tensor(
        [2 / max(n - 1, 1) for n in moving.shape[2:]], dtype=dtype, device=device
    )
    # normalised grid u -> voxel i = (u + 1) * half -> moving voxel A i + b -> normalised 2 m / (N - 1) - 1
    linear = vox_matrix[:3, :3].to(dtype) * to_moving[:, None] * grid_half[None, :]
    offset = (
        to_moving * (vox_matrix[:3, :3].to(dtype) @ grid_half + vox_matrix[:3, 3].to(dtype)) - 1
    )
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
