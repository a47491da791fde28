"""The QC checks of one registration: its numbers, each judged by the one rule of
:mod:`atlasflow.registration.qc`, with the threshold and config key that decided it; and the
checks of a contrast's alignment to its session's T1w (stage ``align-<column>``), judged against
the thresholds its QC JSON records (config ``contrasts``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlasflow.contrasts.plan import TRANSFORM_LABELS, ContrastFiles
from atlasflow.errors import AtlasflowError, describe, failure_record
from atlasflow.io.images import load_image
from atlasflow.layout import Scan
from atlasflow.registration.qc import LIMITS, QCThresholds, dice_per_label, judge
from atlasflow.reports.inputs import as_number, session_prefix

STAGE_TITLES = {"template": "to template", "atlas": "to atlas", "baseline": "to baseline"}
METRIC_LABELS = {
    "ncc_before": "NCC before",
    "ncc_after": "NCC after",
    "ncc_change": "NCC change",
    "nmi_change": "NMI change",
    "folding_fraction": "folding fraction",
    "dice_mean": "mean Dice",
    "nmi_scanner": "NMI at scanner alignment",
    "nmi_after": "NMI after",
    "shift_mm": "shift",
    "rotation_deg": "rotation",
    "qc_pass": "alignment QC",
}
#: The stage of a contrast's alignment to its session's T1w: ``align-<column>``.
ALIGN_PREFIX = "align-"


def align_stage(column: str) -> str:
    return f"{ALIGN_PREFIX}{column}"


def contrast_of(stage: str) -> str | None:
    """The contrast column of an alignment stage (None for a registration stage)."""
    return stage[len(ALIGN_PREFIX) :] if stage.startswith(ALIGN_PREFIX) else None


def contrast_label(column: str) -> str:
    """A contrast's name on the pages: ``FLAIR``, ``T2w``, ``ceT1w``, ``PDw``."""
    return TRANSFORM_LABELS.get(column, column)


def stage_title(stage: str, reference: str = "t1w") -> str:
    """``to atlas``, or ``FLAIR to T1w`` for a contrast's alignment to the session's
    ``reference`` (``T1w to FLAIR`` when the FLAIR is the reference)."""
    column = contrast_of(stage)
    if column is not None:
        return f"{contrast_label(column)} to {contrast_label(reference)}"
    return STAGE_TITLES.get(stage, stage)


def format_metric(metric: str, value: float | None) -> str:
    """A QC number as the pages show it (folding fraction in per cent, NCC change signed)."""
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    if metric == "folding_fraction":
        return f"{100 * value:.3g} %"
    if metric in ("ncc_change", "nmi_change"):
        return f"{value:+.3f}"
    if metric == "shift_mm":
        return f"{value:.1f} mm"
    if metric == "rotation_deg":
        return f"{value:.1f}\u00b0"
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
    reference: str = "t1w"  # what a contrast's alignment is to (the session's reference)

    @property
    def label(self) -> str:
        return METRIC_LABELS.get(self.metric, self.metric)

    def reason(self) -> str:
        """Why this check flagged, e.g. 'ses-2 to atlas: NCC after 0.412 < 0.500 (qc.min_ncc_after)'
        ('to atlas: ...' for a scan without a session)."""
        where = f"{session_prefix(self.session)}{stage_title(self.stage, self.reference)}"
        if self.metric == "qc_pass":
            return f"{where}: {self.note or 'the alignment failed its QC'}"
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


def read_qc_json(path: Path) -> tuple[dict | None, str | None]:
    """A registration's QC JSON, or None and why it cannot be used (missing, the failure record of
    a skipped scan, not a JSON object)."""
    if not path.exists():
        return None, f"{path.name} not found"
    record = failure_record(path)
    if record is not None:
        return None, f"{path.name}: scan skipped, {describe(record)}"
    try:
        qc = json.loads(path.read_text())
        if not isinstance(qc, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return None, f"{path.name} is not readable JSON ({exc})"
    return qc, None


def stage_checks(
    scan: Scan, stage: str, thresholds: QCThresholds, atlas_dseg: Path | None = None
) -> tuple[list[Check], dict | None, str | None]:
    """Checks of one registration from its QC JSON; (checks, raw JSON, problem when unreadable)."""
    path = scan.qc_json(stage)
    qc, problem = read_qc_json(path)
    if qc is None:
        return [], None, problem
    t = scan.session
    before, ncc = as_number(qc.get("ncc_before")), as_number(qc.get("ncc_after"))
    change = ncc - before if ncc is not None and before is not None else None
    checks = [Check(t, stage, "ncc_before", before)]
    if qc.get("same_contrast") is False:
        # two contrasts (registration.qc.qc_flags): the NCC informs, the mutual information judges
        note = "two contrasts: judged by the mutual information"
        checks += [
            Check(t, stage, "ncc_after", ncc, note=note),
            Check(t, stage, "ncc_change", change, note=note),
        ]
        nmi_before, nmi_after = as_number(qc.get("nmi_before")), as_number(qc.get("nmi_after"))
        if nmi_before is not None and nmi_after is not None:
            checks.append(judged(t, stage, "nmi_change", nmi_after - nmi_before, thresholds))
    else:
        checks += [
            judged(t, stage, "ncc_after", ncc, thresholds),
            judged(t, stage, "ncc_change", change, thresholds),
        ]
    checks.append(
        judged(t, stage, "folding_fraction", as_number(qc.get("folding_fraction")), thresholds)
    )
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


def contrast_checks(scan: Scan, column: str) -> tuple[list[Check], dict | None, str | None]:
    """Checks of one contrast's alignment to its session's T1w from its QC JSON (written by
    :func:`atlasflow.contrasts.session.run_align`); (checks, raw JSON, problem when unreadable).

    NMI after alignment and the shift from the scanner's alignment are judged against the
    ``qc_thresholds`` the JSON records; a JSON saying ``qc_pass: false`` flags even when the
    numbers pass (it was judged by a rule the report does not know).
    """
    files = ContrastFiles(str(scan.outdir), reference=scan.reference)
    path = Path(files.session_qc(column, scan.subject, scan.session))
    qc, problem = read_qc_json(path)
    if qc is None:
        return [], None, problem
    t, stage = scan.session, align_stage(column)
    limits = qc.get("qc_thresholds") if isinstance(qc.get("qc_thresholds"), dict) else {}
    checks = [Check(t, stage, "nmi_scanner", as_number(qc.get("nmi_scanner")))]
    for metric, bound, rule in (("nmi_after", "min_nmi", ">="), ("shift_mm", "max_shift_mm", "<=")):
        value, threshold = as_number(qc.get(metric)), as_number(limits.get(bound))
        if threshold is None:
            checks.append(Check(t, stage, metric, value))
        else:
            status = judge(value, threshold, rule)
            checks.append(
                Check(t, stage, metric, value, threshold, rule, f"contrasts.{bound}", status)
            )
    checks.append(Check(t, stage, "rotation_deg", as_number(qc.get("rotation_deg"))))
    if qc.get("qc_pass") is False and not any(c.status == "flag" for c in checks):
        flags = qc.get("qc_flags")
        note = "; ".join(map(str, flags)) if isinstance(flags, list) and flags else ""
        checks.append(Check(t, stage, "qc_pass", 0.0, status="flag", note=note))
    for check in checks:
        check.reference = scan.reference
    return checks, qc, None
