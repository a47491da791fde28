"""The QC checks of one registration: its numbers, each judged by the one rule of
:mod:`atlasflow.registration.qc`, with the threshold and config key that decided it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlasflow.errors import AtlasflowError, describe, failure_record
from atlasflow.io.images import load_image
from atlasflow.layout import Scan
from atlasflow.registration.qc import LIMITS, QCThresholds, dice_per_label
from atlasflow.reports.inputs import as_number

STAGE_TITLES = {"template": "to template", "atlas": "to atlas", "baseline": "to baseline"}
METRIC_LABELS = {
    "ncc_before": "NCC before",
    "ncc_after": "NCC after",
    "ncc_change": "NCC change",
    "folding_fraction": "folding fraction",
    "dice_mean": "mean Dice",
}


def format_metric(metric: str, value: float | None) -> str:
    """A QC number as the pages show it (folding fraction in per cent, NCC change signed)."""
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    if metric == "folding_fraction":
        return f"{100 * value:.3g} %"
    if metric == "ncc_change":
        return f"{value:+.3f}"
    return f"{value:.3f}"


@dataclass
class Check:
    """One QC number of one registration, with its verdict and the limit that decided it."""

    session: str
    stage: str
    metric: str
    value: float | None
    threshold: float | None = None
    rule: str = ""  # ">=" or "<=" against ``threshold``; "" for information only
    key: str = ""  # the config key of the threshold
    status: str = "info"  # pass | flag | info | missing
    note: str = ""

    @property
    def label(self) -> str:
        return METRIC_LABELS.get(self.metric, self.metric)

    def reason(self) -> str:
        """Why this check flagged, e.g. 'ses-2 to atlas: NCC after 0.412 < 0.500 (qc.min_ncc_after)'."""
        where = f"ses-{self.session} {STAGE_TITLES.get(self.stage, self.stage)}"
        if self.value is None or not math.isfinite(self.value):
            return f"{where}: {self.label} is not a number"
        bad = "<" if self.rule == ">=" else ">"
        return (
            f"{where}: {self.label} {format_metric(self.metric, self.value)} {bad} "
            f"{format_metric(self.metric, self.threshold)} ({self.key})"
        )


def judged(
    session: str, stage: str, metric: str, value: float | None, limits: QCThresholds, note: str = ""
) -> Check:
    """A check of ``metric`` judged against its :data:`~atlasflow.registration.qc.LIMITS` entry."""
    limit = LIMITS[metric]
    return Check(
        session,
        stage,
        metric,
        value,
        limit.bound(limits),
        limit.rule,
        limit.key,
        limit.judge(value, limits),
        note,
    )


def mean_dice(labels: Path, reference: Path) -> float:
    """Mean Dice over the labels present in both maps (same grid required)."""
    a = load_image(labels, dtype=None).data
    b = load_image(reference, dtype=None).data
    if a.shape != b.shape:
        raise AtlasflowError(f"{labels}: grid {a.shape} differs from {reference} {b.shape}")
    per_label = dice_per_label(np.rint(a).astype(np.int64), np.rint(b).astype(np.int64))
    return float(np.mean(list(per_label.values()))) if per_label else float("nan")


def stage_checks(
    scan: Scan, stage: str, thresholds: QCThresholds, atlas_dseg: Path | None = None
) -> tuple[list[Check], dict | None, str | None]:
    """Checks of one registration from its QC JSON; (checks, raw JSON, problem when unreadable)."""
    path = scan.qc_json(stage)
    if not path.exists():
        return [], None, f"{path.name} not found"
    record = failure_record(path)
    if record is not None:
        return [], None, f"{path.name}: scan skipped, {describe(record)}"
    try:
        qc = json.loads(path.read_text())
        if not isinstance(qc, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return [], None, f"{path.name} is not readable JSON ({exc})"
    t = scan.session
    before, ncc = as_number(qc.get("ncc_before")), as_number(qc.get("ncc_after"))
    change = ncc - before if ncc is not None and before is not None else None
    checks = [
        Check(t, stage, "ncc_before", before),
        judged(t, stage, "ncc_after", ncc, thresholds),
        judged(t, stage, "ncc_change", change, thresholds),
        judged(t, stage, "folding_fraction", as_number(qc.get("folding_fraction")), thresholds),
    ]
    dice, note = as_number(qc.get("dice_mean")), "from the registration"
    if (
        dice is None
        and stage == "atlas"
        and atlas_dseg is not None
        and atlas_dseg.exists()
        and scan.atlas_dseg.exists()
    ):
        try:
            dice, note = (
                mean_dice(scan.atlas_dseg, atlas_dseg),
                "subject labels in atlas space vs atlas labels",
            )
        except AtlasflowError as exc:
            checks.append(Check(t, stage, "dice_mean", None, status="missing", note=str(exc)))
    if dice is not None:
        checks.append(judged(t, stage, "dice_mean", dice, thresholds, note))
    return checks, qc, None
