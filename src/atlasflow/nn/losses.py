"""Losses for registration: LNCC, MSE, soft Dice, diffusion regulariser, inverse consistency.

Every image loss takes an optional ``mask`` (B, 1, X, Y, Z) of voxels that count, so that tumour
voxels (no true correspondence) or the outside of a brain mask can be excluded. Losses are written
to be *minimised*: an image loss of 0 means a perfect match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _BoxFilter(torch.autograd.Function):
    """Box filter whose backward is the same box filter.

    With an odd window centred on each voxel and zero padding, the filter is a symmetric linear
    map, so it is its own adjoint. Autograd through the cumulative sums instead allocated and
    zero-filled a full-size tensor per slice: about a third of a refinement step.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, window: int) -> torch.Tensor:  # type: ignore[override]
        ctx.window = window
        return _box_filter(x, window)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _box_filter(grad, ctx.window), None


def box_filter(x: torch.Tensor, window: int) -> torch.Tensor:
    """Local mean over a window^3 box (zero padding), by cumulative sums along each axis.

    Two subtractions per voxel and axis whatever the window, instead of window^3 multiply-adds for
    a dense kernel; measured ~2.5x faster (forward + backward) than three separable average pools.
    """
    if window % 2 == 1 and x.requires_grad:
        return _BoxFilter.apply(x, window)
    return _box_filter(x, window)


def _box_filter(x: torch.Tensor, window: int) -> torch.Tensor:
    if window == 3:
        return _box_filter_3(x)
    pad = window // 2
    for axis in (2, 3, 4):
        n = x.shape[axis]
        widths = [0, 0] * 3
        widths[2 * (4 - axis)] = pad + 1
        widths[2 * (4 - axis) + 1] = window - pad - 1
        c = F.pad(x, widths).cumsum(axis)
        x = (c.narrow(axis, window, n) - c.narrow(axis, 0, n)) / window
    return x


def _box_filter_3(x: torch.Tensor) -> torch.Tensor:
    """The 3-voxel box as each voxel plus its two neighbours, per axis: for so small a window that
    is cheaper than the cumulative sums (on the registration network's 27-channel correlation
    features, 32 instead of 97 ms), and it keeps the input's memory format (channels-last)."""
    for axis in (2, 3, 4):
        n = x.shape[axis]
        total = x.clone()
        total.narrow(axis, 1, n - 1).add_(x.narrow(axis, 0, n - 1))
        total.narrow(axis, 0, n - 1).add_(x.narrow(axis, 1, n - 1))
        x = total
    return x / 27


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    weight = mask.to(values.dtype).expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def fixed_statistics(fixed: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean and variance of a constant image, for repeated :func:`local_ncc` calls."""
    with torch.no_grad():
        c = fixed.shape[1]
        mf, ff = box_filter(torch.cat([fixed, fixed * fixed], 1), window).split(c, 1)
        return mf, (ff - mf * mf).clamp_min(0)


def local_ncc(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    window: int = 7,
    mask: torch.Tensor | None = None,
    eps: float = 1e-7,
    fixed_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean local squared normalised cross-correlation in [0, 1] (1 = identical up to local scale).

    Local means, variances and covariance come from box filters on stacked channels, so one pass of
    the separable filter serves all the statistics. When only ``moving`` carries gradients, the
    fixed image's local mean and variance (``fixed_statistics``, or computed here) stay out of the
    differentiated filter: three channels instead of five.
    """
    c = fixed.shape[1]
    if fixed.requires_grad:
        stats = torch.cat([fixed, moving, fixed * fixed, moving * moving, fixed * moving], 1)
        mf, mm, ff, mmm, fm = box_filter(stats, window).split(c, 1)
        var_f = (ff - mf * mf).clamp_min(0)
    else:
        mf, var_f = fixed_statistics(fixed, window) if fixed_stats is None else fixed_stats
        stats = torch.cat([moving, moving * moving, fixed * moving], 1)
        mm, mmm, fm = box_filter(stats, window).split(c, 1)
    var_m = (mmm - mm * mm).clamp_min(0)
    cov = fm - mf * mm
    cc = cov * cov / (var_f * var_m + eps)
    return _masked_mean(cc.clamp(0, 1), mask)


def lncc_loss(
    fixed: torch.Tensor, moving: torch.Tensor, window: int = 7, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - LNCC (0 for identical images)."""
    return 1.0 - local_ncc(fixed, moving, window, mask)


def mse_loss(
    fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared intensity difference inside ``mask``."""
    return _masked_mean((fixed - moving) ** 2, mask)


def soft_dice_loss(
    fixed_onehot: torch.Tensor, moving_onehot: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - mean soft Dice over label channels, channel 0 (background) excluded."""
    f, m = fixed_onehot[:, 1:], moving_onehot[:, 1:]
    if mask is not None:
        f, m = f * mask, m * mask
    dims = (2, 3, 4)
    inter = (f * m).sum(dims)
    total = f.sum(dims) + m.sum(dims)
    present = total > 0
    dice = 2 * inter / total.clamp_min(1e-6)
    return 1.0 - dice[present].mean() if present.any() else dice.sum() * 0.0


def diffusion_loss(field: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of a vector field (B, 3, X, Y, Z), in its own voxel units."""
    dx = field[:, :, 1:] - field[:, :, :-1]
    dy = field[:, :, :, 1:] - field[:, :, :, :-1]
    dz = field[:, :, :, :, 1:] - field[:, :, :, :, :-1]
    return (dx.pow(2).mean() + dy.pow(2).mean() + dz.pow(2).mean()) / 3.0


def inverse_consistency_loss(
    forward_disp: torch.Tensor, backward_disp: torch.Tensor
) -> torch.Tensor:
    """Mean squared residual of ``forward o backward`` (identity for an inverse-consistent pair)."""
    from atlasflow.nn.layers import compose_displacements

    residual = compose_displacements(forward_disp, backward_disp)
    return residual.pow(2).sum(1).mean()
