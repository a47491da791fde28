"""The engine's affine stages: initial alignment, the affine network, test-time optimisation.

:func:`align_affine` takes a :class:`~atlasflow.registration.working_grid.WorkingPair` from a
starting fixed world -> moving world affine (the engine's searched start or a known one) to the
refined one: the network's 12 parameters around the identity, kept only when they
raise the similarity, then Adam on LNCC at quarter resolution (:func:`optimise_affine`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from atlasflow.errors import AtlasflowError
from atlasflow.nn.losses import fixed_statistics, local_ncc
from atlasflow.nn.networks import RegistrationModel
from atlasflow.nn.optim import Adam
from atlasflow.registration.working_grid import WorkingPair, mask_box, pooled_affine, sample_moving

#: Defaults of the test-time optimisation, chosen on synthetic pairs (not on the benchmark).
AFFINE_STEPS = 40
AFFINE_LR = 0.01
AFFINE_MIN_COARSE = 16  # voxels per axis below which the quarter-resolution affine level is skipped


def align_affine(
    pair: WorkingPair, world: np.ndarray, model: RegistrationModel | None, steps: int
) -> np.ndarray:
    """``world`` refined by the affine network (``model``; None skips it) and ``steps`` of
    test-time optimisation."""
    work = pair.work
    half_affine = pooled_affine(work.affine, 2)
    fixed_half = F.avg_pool3d(pair.fixed_t, 2)
    cost_half = F.avg_pool3d(pair.cost_t, 2)
    with torch.no_grad():
        # (Skipped when the affine is known, as in the atlas iterations: the network would not run.)
        if model is not None:
            world = _network_affine(pair, world, model, fixed_half, cost_half, half_affine)
    # Test-time affine optimisation at quarter resolution (8x fewer voxels than half: on IXI
    # pairs the same Dice, 0.18 s instead of 1.3 s). Grids too small for a quarter level (under
    # 16 voxels an axis) use half resolution.
    if steps <= 0:
        return world
    if min(work.shape) // 4 >= AFFINE_MIN_COARSE:
        moving_q = F.avg_pool3d(pair.moving_t, 2, ceil_mode=True)
        moving_q_affine = pooled_affine(pair.moving_affine, 2)
        moving_q = F.avg_pool3d(moving_q, 3, stride=1, padding=1, count_include_pad=False)
        quarter_affine = pooled_affine(work.affine, 4)
        refined = optimise_affine(
            F.avg_pool3d(fixed_half, 2),
            moving_q,
            F.avg_pool3d(cost_half, 2),
            torch.from_numpy(np.linalg.inv(moving_q_affine) @ world @ quarter_affine).float(),
            steps,
            window=3,
        )
        return moving_q_affine @ refined.double().numpy() @ np.linalg.inv(quarter_affine)
    refined = optimise_affine(
        fixed_half, _blurred(pair.moving_t), cost_half, pair.vox_matrix(world, half_affine), steps
    )
    return pair.moving_affine @ refined.double().numpy() @ np.linalg.inv(half_affine)


def _blurred(moving: torch.Tensor) -> torch.Tensor:
    return F.avg_pool3d(moving, 3, stride=1, padding=1, count_include_pad=False)


def _network_affine(
    pair: WorkingPair,
    world: np.ndarray,
    model: RegistrationModel,
    fixed_half: torch.Tensor,
    cost_half: torch.Tensor,
    half_affine: np.ndarray,
) -> np.ndarray:
    """The affine network's prediction composed onto ``world``, when it raises the global NCC at
    half resolution; else ``world``."""
    work = pair.work
    blurred_moving = _blurred(pair.moving_t)
    moving_w = sample_moving(pair.moving_t, pair.vox_matrix(world, work.affine), work.shape)
    pred = model.affine(torch.cat([pair.fixed_t, moving_w], 1))[0].double().numpy()
    cand = world @ work.affine @ centred_to_vox4(pred, work.shape) @ np.linalg.inv(work.affine)
    before = global_ncc(
        fixed_half,
        sample_moving(blurred_moving, pair.vox_matrix(world, half_affine), fixed_half.shape[2:]),
        cost_half,
    )
    after = global_ncc(
        fixed_half,
        sample_moving(blurred_moving, pair.vox_matrix(cand, half_affine), fixed_half.shape[2:]),
        cost_half,
    )
    return cand if after > before else world


def centred_to_vox4(matrix: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """4x4 voxel matrix of the centred pull-back ``x -> M (x - c) + c + t``."""
    c = (np.array(shape, float) - 1) / 2
    out = np.eye(4)
    out[:3, :3] = matrix[:3, :3]
    out[:3, 3] = matrix[:3, 3] + c - matrix[:3, :3] @ c
    return out


def centre_of_mass(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
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


def global_ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask > 0
    x, y = a[m], b[m]
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / ((x.pow(2).sum() * y.pow(2).sum()).sqrt() + 1e-8))


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
        warped = sample_moving(moving, matrix_of(params), shape)
        loss = 1 - local_ncc(fixed, warped, window, mask, fixed_stats=stats)
        loss.backward()
        opt.step()
    return matrix_of(params.detach()) @ torch.linalg.inv(shift)
