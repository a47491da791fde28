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


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Global normalised cross-correlation inside ``mask``."""
    if mask is not None:
        a, b = a[mask > 0], b[mask > 0]
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


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
    field: str | None = None  # the QCThresholds field holding the bound; None: -NCC_DROP_TOLERANCE

    def bound(self, thresholds: QCThresholds) -> float:
        return getattr(thresholds, self.field) if self.field else -NCC_DROP_TOLERANCE

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
}


def qc_flags(metrics: dict, thresholds: QCThresholds) -> list[str]:
    """Reasons to distrust a registration; empty when it passes every check."""
    flags = []
    folding, after = metrics["folding_fraction"], metrics["ncc_after"]
    before = metrics["ncc_before"]
    if LIMITS["folding_fraction"].judge(folding, thresholds) == "flag":
        flags.append(f"folding fraction {folding:.5f} > {thresholds.max_folding_fraction}")
    if LIMITS["ncc_after"].judge(after, thresholds) == "flag":
        flags.append(f"NCC after registration {after:.3f} < {thresholds.min_ncc_after}")
    if LIMITS["ncc_change"].judge(after - before, thresholds) == "flag":
        flags.append(f"registration lowered the similarity ({before:.3f} -> {after:.3f})")
    return flags


def add_verdict(metrics: dict, thresholds: QCThresholds) -> None:
    """Record in a registration's metrics the thresholds, :func:`qc_flags` and ``qc_pass``."""
    metrics["qc_thresholds"] = {
        "max_folding_fraction": thresholds.max_folding_fraction,
        "min_ncc_after": thresholds.min_ncc_after,
    }
    metrics["qc_flags"] = qc_flags(metrics, thresholds)
    metrics["qc_pass"] = not metrics["qc_flags"]
