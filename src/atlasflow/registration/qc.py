"""Registration QC: the similarity and overlap numbers, their limits, and how a number is judged.

One rule for everybody: the ``register`` command flags its own result with :func:`qc_flags`, the
reports judge every registration's QC JSON with :data:`LIMITS` and :func:`judge`, both against one
:class:`QCThresholds` (config ``qc``). numpy only, so the reports can import it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from atlasflow.errors import AtlasflowError

# A registration may lower the NCC (after - before) by at most this much; more flags it.
NCC_DROP_TOLERANCE = 0.02
# ... and the normalised mutual information by at most this much.
NMI_DROP_TOLERANCE = 0.005
# Two images show one contrast when the moving image's mean intensity per fixed-intensity bin
# rises with the fixed intensity (Spearman correlation at least this): T1w on T1w does, T2w or
# FLAIR on T1w does not (bright CSF against dark, or white matter darker than grey).
SAME_CONTRAST_AGREEMENT = 0.7


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Global normalised cross-correlation inside ``mask``."""
    if mask is not None:
        a, b = a[mask > 0], b[mask > 0]
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def _unit_range(values: np.ndarray) -> np.ndarray:
    low, high = np.percentile(values, [1, 99]) if values.size else (0.0, 0.0)
    return np.clip((values - low) / (high - low), 0, 1) if high > low else np.zeros_like(values)


def _pair_values(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    inside = (mask > 0) if mask is not None else np.ones(a.shape, bool)
    return _unit_range(np.asarray(a, np.float64)[inside]), _unit_range(np.asarray(b, np.float64)[inside])


def nmi(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, bins: int = 32) -> float:
    """Normalised mutual information (H(A) + H(B)) / H(A, B) inside ``mask``: 1 when the images
    say nothing about each other, 2 when one determines the other, whatever their contrasts."""
    x, y = _pair_values(a, b, mask)
    if x.size == 0:
        return 1.0
    ix = np.minimum((x * bins).astype(np.int64), bins - 1)
    iy = np.minimum((y * bins).astype(np.int64), bins - 1)
    joint = np.bincount(ix * bins + iy, minlength=bins * bins).astype(np.float64)
    joint /= joint.sum()

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    both = entropy(joint)
    grid = joint.reshape(bins, bins)
    return (entropy(grid.sum(1)) + entropy(grid.sum(0))) / both if both > 0 else 1.0


def intensity_agreement(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, bins: int = 16) -> float:
    """Spearman correlation between the fixed intensity (``a``, in bins) and the moving image's
    mean intensity in each bin: about 1 for one contrast, low or negative across contrasts."""
    x, y = _pair_values(a, b, mask)
    ix = np.minimum((x * bins).astype(np.int64), bins - 1)
    counts = np.bincount(ix, minlength=bins)
    sums = np.bincount(ix, weights=y, minlength=bins)
    used = counts >= max(10, x.size // 1000)  # bins with enough voxels to mean something
    if used.sum() < 3:
        return 0.0
    means = sums[used] / counts[used]
    ranks = np.argsort(np.argsort(means)).astype(np.float64)
    order = np.arange(len(means), dtype=np.float64)
    return float(np.corrcoef(order, ranks)[0, 1])


def dice_per_label(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    """Dice of every non-zero label present in both maps."""
    labels = np.intersect1d(np.unique(a), np.unique(b))
    out = {}
    for lab in labels[labels != 0]:
        x, y = a == lab, b == lab
        out[int(lab)] = float(2 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return out


@dataclass(frozen=True)
class QCThresholds:
    """Bounds outside which a registration is flagged (config ``qc``)."""

    max_folding_fraction: float = 0.001
    min_ncc_after: float = 0.5
    min_dice: float = 0.5

    @classmethod
    def from_mapping(cls, values: Mapping[str, object] | QCThresholds | None) -> QCThresholds:
        """From the config's ``qc`` section (unknown keys are ignored, missing ones default)."""
        if isinstance(values, QCThresholds):
            return values
        out = {}
        for key in cls.__dataclass_fields__:
            if values is not None and values.get(key) is not None:
                value = values[key]
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    raise AtlasflowError(f"qc.{key}: expected a number, got {value!r}") from None
                if not math.isfinite(number):
                    raise AtlasflowError(f"qc.{key}: expected a finite number, got {value!r}")
                out[key] = number
        return cls(**out)


def judge(value: float | None, threshold: float, rule: str) -> str:
    """``"pass"`` when ``value rule threshold`` holds (rule ``">="`` or ``"<="``), else ``"flag"``;
    a missing or non-finite value is flagged."""
    if value is None or not math.isfinite(value):
        return "flag"
    return "pass" if (value >= threshold if rule == ">=" else value <= threshold) else "flag"


@dataclass(frozen=True)
class Limit:
    """How one QC number is judged: ``value rule bound``, the bound taken from the thresholds."""

    metric: str
    rule: str  # ">=" or "<="
    key: str  # where the bound comes from: the config key, or why it is fixed
    field: str | None = None  # the QCThresholds field holding the bound; None: ``fixed``
    fixed: float = -NCC_DROP_TOLERANCE

    def bound(self, thresholds: QCThresholds) -> float:
        return getattr(thresholds, self.field) if self.field else self.fixed

    def judge(self, value: float | None, thresholds: QCThresholds) -> str:
        return judge(value, self.bound(thresholds), self.rule)


LIMITS = {
    "ncc_after": Limit("ncc_after", ">=", "qc.min_ncc_after", "min_ncc_after"),
    # ncc_change = ncc_after - ncc_before
    "ncc_change": Limit("ncc_change", ">=", "a registration must not lower the NCC"),
    "folding_fraction": Limit(
        "folding_fraction", "<=", "qc.max_folding_fraction", "max_folding_fraction"
    ),
    "dice_mean": Limit("dice_mean", ">=", "qc.min_dice", "min_dice"),
    # nmi_change = nmi_after - nmi_before: how a pair of two contrasts is judged (qc_flags)
    "nmi_change": Limit(
        "nmi_change", ">=", "a registration must not lower the mutual information", None,
        -NMI_DROP_TOLERANCE,
    ),
}


def qc_flags(metrics: dict, thresholds: QCThresholds) -> list[str]:
    """Reasons to distrust a registration; empty when it passes every check.

    The NCC limits hold only for a pair of one contrast (``same_contrast``, default true): across
    contrasts a good alignment can have a low or negative NCC. The mutual information, when
    measured, must not drop whatever the contrasts.
    """
    flags = []
    folding, after = metrics["folding_fraction"], metrics["ncc_after"]
    before = metrics["ncc_before"]
    if LIMITS["folding_fraction"].judge(folding, thresholds) == "flag":
        flags.append(f"folding fraction {folding:.5f} > {thresholds.max_folding_fraction}")
    if metrics.get("same_contrast", True):
        if LIMITS["ncc_after"].judge(after, thresholds) == "flag":
            flags.append(f"NCC after registration {after:.3f} < {thresholds.min_ncc_after}")
        if LIMITS["ncc_change"].judge(after - before, thresholds) == "flag":
            flags.append(f"registration lowered the similarity ({before:.3f} -> {after:.3f})")
    if "nmi_before" in metrics and "nmi_after" in metrics:
        nmi_before, nmi_after = metrics["nmi_before"], metrics["nmi_after"]
        if not nmi_after - nmi_before >= -NMI_DROP_TOLERANCE:
            flags.append(f"registration lowered the mutual information ({nmi_before:.3f} -> {nmi_after:.3f})")
    return flags


def add_verdict(metrics: dict, thresholds: QCThresholds) -> None:
    """Record in a registration's metrics the thresholds, :func:`qc_flags` and ``qc_pass``."""
    metrics["qc_thresholds"] = {
        "max_folding_fraction": thresholds.max_folding_fraction,
        "min_ncc_after": thresholds.min_ncc_after,
    }
    metrics["qc_flags"] = qc_flags(metrics, thresholds)
    metrics["qc_pass"] = not metrics["qc_flags"]
