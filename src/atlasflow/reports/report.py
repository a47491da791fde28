"""HTML reports: one self-contained page per subject, one for the cohort, and their QC verdicts.

This module owns
- where every report input lives (the BIDS-derivatives names the workflow writes, spelled once in
  :class:`Scan` and :class:`CohortFiles`);
- the QC verdict of a subject (``pass`` / ``flag`` / ``failed`` / ``incomplete``), where every
  check carries the threshold and the config key that decided it, and a failed scan carries the
  ``atlasflow: error:`` line of the job that failed;
- the pages: figures embedded as base64 PNGs (from :mod:`atlasflow.reports.figures`), no external files,
  scripts or styles, so a report opens offline and can be mailed as one file;
- the ``atlasflow report`` command (:func:`report_main`).

A missing or unreadable input never stops a report: its figure becomes a visible placeholder
naming the file and the reason. :func:`write_subject_report` also writes ``sub-S_qc.json`` next to
the page; :func:`write_cohort_report` reads those (or recomputes the verdict when one is absent or
older than its inputs, e.g. for a subject whose jobs failed under ``--keep-going``).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import atlasflow.reports.figures as fg
from atlasflow.errors import AtlasflowError, describe, failure_record
from atlasflow.io.atomic import atomic_write_text
from atlasflow.io.images import Image, load_image

STAGES = ("template", "atlas", "baseline")
STAGE_TITLES = {"template": "to template", "atlas": "to atlas", "baseline": "to baseline"}
STAGE_IMAGES = {"template": "template", "atlas": "atlas", "baseline": "baseline scan"}
STATUS_RANK = {"failed": 0, "incomplete": 1, "flag": 2, "pass": 3}
ERROR_PREFIX = "atlasflow: error:"
RESPONSES = (
    "progression",
    "stable",
    "partial_response",
    "complete_response",
    "baseline",
    "not_evaluable",
)


# ------------------------------------------------------------------------------------ paths


@dataclass(frozen=True)
class Scan:
    """The workflow's files of one scan (subject S, session T) under ``outdir/sub-S/ses-T/anat``."""

    outdir: Path
    subject: str
    session: str

    def file(self, suffix: str, ext: str = "nii.gz", **entities: str) -> Path:
        """BIDS-derivatives name; entity order as in the workflow (``from_`` stands for ``from``)."""
        parts = [f"sub-{self.subject}", f"ses-{self.session}"]
        for key in ("space", "from_", "to", "mode", "label", "desc"):
            if key in entities:
                parts.append(f"{key.rstrip('_')}-{entities[key]}")
        return (
            self.outdir
            / f"sub-{self.subject}"
            / f"ses-{self.session}"
            / "anat"
            / f"{'_'.join(parts)}_{suffix}.{ext}"
        )

    @property
    def preproc(self) -> Path:
        return self.file("T1w", desc="preproc")

    @property
    def brain_mask(self) -> Path:
        return self.file("mask", desc="brain")

    @property
    def tumor_mask(self) -> Path:
        return self.file("mask", label="tumor", desc="preproc")

    @property
    def atlas_dseg(self) -> Path:
        return self.file("dseg", space="atlas")

    def warped(self, stage: str) -> Path:
        """The scan resampled onto the fixed grid of a registration stage."""
        if stage == "atlas":
            return self.file("T1w", space="atlas")
        return self.file("T1w", space=stage, desc="warped")

    def warp(self, stage: str) -> Path:
        return self.file("xfm", from_="T1w", to=stage, mode="image")

    def qc_json(self, stage: str) -> Path:
        return self.file("xfm", "json", from_="T1w", to=stage, mode="image", desc="qc")

    @property
    def log_jacobian(self) -> Path:
        return self.file("map", space="baseline", desc="logjacobian")

    @property
    def difference(self) -> Path:
        return self.file("T1w", space="baseline", desc="difference")

    @property
    def displacement(self) -> Path:
        return self.file("map", space="baseline", desc="displacement")

    @property
    def tumor_in_baseline(self) -> Path:
        return self.file("mask", space="baseline", label="tumor")


@dataclass(frozen=True)
class CohortFiles:
    """Cohort-wide files: template, atlas iterations, atlas metrics, tumour frequency, logs."""

    outdir: Path

    @property
    def template(self) -> Path:
        return self.outdir / "template" / "template_T1w.nii.gz"

    @property
    def atlas(self) -> Path:
        return self.outdir / "atlas" / "atlas_T1w.nii.gz"

    @property
    def atlas_dseg(self) -> Path:
        return self.outdir / "atlas" / "atlas_dseg.nii.gz"

    @property
    def metrics(self) -> Path:
        return self.outdir / "atlas" / "metrics.tsv"

    @property
    def tumor_frequency(self) -> Path:
        return self.outdir / "atlas" / "tumor_frequency.nii.gz"

    def iteration(self, i: int) -> Path:
        return self.outdir / "atlas" / f"iter-{i}" / "template_T1w.nii.gz"

    def member_tables(self) -> list[Path]:
        """Per-member registration tables of the atlas iterations (``iter-{i}/members.tsv``)."""
        return sorted((self.outdir / "atlas").glob("iter-*/members.tsv"))

    def tumor_table(self, subject: str) -> Path:
        return self.outdir / f"sub-{subject}" / "longitudinal" / f"sub-{subject}_tumor.tsv"

    def fixed(self, stage: str, subject: str, baseline: str | None) -> Path | None:
        """The fixed image of a registration stage."""
        if stage == "template":
            return self.template
        if stage == "atlas":
            return self.atlas
        return Scan(self.outdir, subject, baseline).preproc if baseline else None

    @property
    def logs(self) -> Path:
        return self.outdir / "logs"


def _failed_member(table: Path, member: str) -> str | None:
    """The reason a member's registration failed in an atlas iteration (None: it did not)."""
    import pandas as pd

    try:
        rows = pd.read_csv(table, sep="\t", dtype=str).fillna("")
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None
    hit = rows[(rows.get("member") == member) & (rows.get("status") == "failed")] if "member" in rows else rows[:0]
    return str(hit.iloc[0].get("reason", "")) if len(hit) else None


def subject_report_inputs(
    outdir: str | Path,
    subject: str,
    sessions: Sequence[str],
    *,
    baseline: str | None = None,
    longitudinal: bool | None = None,
    labels: Collection[str] = (),
    tumour: Collection[str] = (),
) -> list[str]:
    """Every workflow output a subject's report reads: the report rule's inputs, so that a change to
    any of them (and only them) reruns the report.

    ``sessions`` in acquisition order; ``labels`` and ``tumour``: the sessions for which the
    manifest gives a label map / a tumour mask. The raw inputs (manifest paths) are not included.
    """
    outdir = Path(outdir)
    files = CohortFiles(outdir)
    longitudinal = len(sessions) > 1 if longitudinal is None else longitudinal
    baseline = baseline or (sessions[0] if sessions else None)
    paths: list[Path] = [files.template, files.atlas]
    if labels:
        paths.append(files.atlas_dseg)
    if longitudinal:
        paths.append(files.tumor_table(subject))
    for session in sessions:
        scan = Scan(outdir, subject, session)
        paths += [scan.preproc, scan.brain_mask]
        for stage in ("template", "atlas"):
            paths += [scan.warped(stage), scan.warp(stage), scan.qc_json(stage)]
        if session in labels:
            paths.append(scan.atlas_dseg)
        if longitudinal and session == baseline and session in tumour:
            paths.append(scan.tumor_mask)
        if longitudinal and session != baseline:
            paths += [
                scan.qc_json("baseline"),
                scan.warped("baseline"),
                scan.log_jacobian,
                scan.difference,
                scan.displacement,
            ]
            if session in tumour:
                paths.append(scan.tumor_in_baseline)
    return [str(p) for p in paths]


def cohort_report_inputs(outdir: str | Path, iterations: int, *, tumour: bool = False) -> list[str]:
    """The cohort-wide outputs the cohort report reads (besides the subjects' ``sub-S_qc.json``)."""
    files = CohortFiles(Path(outdir))
    paths = [files.iteration(i) for i in range(iterations + 1)] + [files.metrics]
    if tumour:
        paths.append(files.tumor_frequency)
    return [str(p) for p in paths]


# ------------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class Thresholds:
    """QC limits (config ``qc``): a check outside its limit flags the subject."""

    max_folding_fraction: float = 0.001
    min_ncc_after: float = 0.5
    min_dice: float = 0.5

    @classmethod
    def from_mapping(cls, values: Mapping[str, object] | Thresholds | None) -> Thresholds:
        """From the config's ``qc`` section (unknown keys are ignored, missing ones default)."""
        if isinstance(values, Thresholds):
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


# ------------------------------------------------------------------------------------- QC


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


METRIC_LABELS = {
    "ncc_before": "NCC before",
    "ncc_after": "NCC after",
    "ncc_change": "NCC change",
    "folding_fraction": "folding fraction",
    "dice_mean": "mean Dice",
}


# Same rule as atlasflow.registration.api.qc_flags: NCC after may not fall below NCC before by more than this.
NCC_DROP_TOLERANCE = 0.02


def format_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    if metric == "folding_fraction":
        return f"{100 * value:.3g} %"
    if metric == "ncc_change":
        return f"{value:+.3f}"
    return f"{value:.3f}"


def judge(value: float | None, threshold: float, rule: str) -> str:
    if value is None or not math.isfinite(value):
        return "flag"
    return "pass" if (value >= threshold if rule == ">=" else value <= threshold) else "flag"


def _number(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def mean_dice(labels: Path, reference: Path) -> float:
    """Mean Dice over the labels present in both maps (same grid required)."""
    from atlasflow.registration.api import dice_per_label

    a = load_image(labels, dtype=None).data
    b = load_image(reference, dtype=None).data
    if a.shape != b.shape:
        raise AtlasflowError(f"{labels}: grid {a.shape} differs from {reference} {b.shape}")
    per_label = dice_per_label(np.rint(a).astype(np.int64), np.rint(b).astype(np.int64))
    return float(np.mean(list(per_label.values()))) if per_label else float("nan")


def stage_checks(
    scan: Scan, stage: str, thresholds: Thresholds, atlas_dseg: Path | None = None
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
    checks = [Check(t, stage, "ncc_before", _number(qc.get("ncc_before")))]
    ncc = _number(qc.get("ncc_after"))
    checks.append(
        Check(
            t,
            stage,
            "ncc_after",
            ncc,
            thresholds.min_ncc_after,
            ">=",
            "qc.min_ncc_after",
            judge(ncc, thresholds.min_ncc_after, ">="),
        )
    )
    before = _number(qc.get("ncc_before"))
    change = ncc - before if ncc is not None and before is not None else None
    checks.append(
        Check(
            t,
            stage,
            "ncc_change",
            change,
            -NCC_DROP_TOLERANCE,
            ">=",
            "a registration must not lower the NCC",
            judge(change, -NCC_DROP_TOLERANCE, ">="),
        )
    )
    folding = _number(qc.get("folding_fraction"))
    checks.append(
        Check(
            t,
            stage,
            "folding_fraction",
            folding,
            thresholds.max_folding_fraction,
            "<=",
            "qc.max_folding_fraction",
            judge(folding, thresholds.max_folding_fraction, "<="),
        )
    )
    dice, note = _number(qc.get("dice_mean")), "from the registration"
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
        checks.append(
            Check(
                t,
                stage,
                "dice_mean",
                dice,
                thresholds.min_dice,
                ">=",
                "qc.min_dice",
                judge(dice, thresholds.min_dice, ">="),
                note,
            )
        )
    return checks, qc, None


def last_error_line(log: Path) -> str | None:
    """The last non-empty line of a log that starts with 'atlasflow: error:' (None if none)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.strip().startswith(ERROR_PREFIX):
            return line.strip()[len(ERROR_PREFIX) :].strip()
    return None


def logged_errors(logs: Path, name_prefixes: Sequence[str]) -> list[dict]:
    """Error lines of the logs named ``<prefix>.log`` / ``<prefix>_*.log`` anywhere under ``logs``."""
    found = []
    if not logs.is_dir():
        return found
    for log in sorted(logs.rglob("*.log")):
        stem = log.name[: -len(".log")]
        if not any(stem == p or stem.startswith(p + "_") for p in name_prefixes):
            continue
        message = last_error_line(log)
        if message:
            rule = str(log.parent.relative_to(logs)) if log.parent != logs else log.stem
            found.append(
                {"rule": rule, "log": str(log.relative_to(logs.parent)), "message": message}
            )
    return found


@dataclass
class SubjectQC:
    """The QC verdict of one subject, as written to ``sub-S_qc.json`` and read by the cohort page."""

    subject: str
    sessions: list[str]
    baseline: str | None
    longitudinal: bool
    thresholds: dict
    checks: list[Check] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)  # {session, file, reason, required}
    errors: list[dict] = field(default_factory=list)  # {session, rule, log, message}
    tumor: list[dict] = field(default_factory=list)  # rows of the tumour table
    registration: dict = field(default_factory=dict)  # "session/stage" -> backend, seconds
    sources: dict[str, bool] = field(
        default_factory=dict
    )  # file read (relative to outdir) -> existed
    status: str = "pass"
    reasons: list[str] = field(default_factory=list)
    # Set by the cohort page when this verdict was recomputed because the subject's page is older
    # than its inputs (or absent); never written to the JSON.
    recomputed: bool = False

    @property
    def response(self) -> str | None:
        """Response category of the latest follow-up in the tumour table."""
        rows = [r for r in self.tumor if r.get("response") not in (None, "", "baseline")]
        return rows[-1]["response"] if rows else None

    def summary(self) -> dict[str, dict]:
        """Worst value of each key number over the sessions, with its verdict (cohort table cells)."""
        out: dict[str, dict] = {}
        for stage in STAGES:
            for metric, worst in (
                ("ncc_after", min),
                ("dice_mean", min),
                ("folding_fraction", max),
            ):
                relevant = [
                    c
                    for c in self.checks
                    if c.stage == stage and c.metric == metric and c.value is not None
                ]
                if not relevant:
                    continue
                chosen = worst(
                    relevant, key=lambda c: c.value if math.isfinite(c.value) else -math.inf
                )
                flagged = any(c.status == "flag" for c in relevant)
                out[f"{stage}/{metric}"] = {
                    "value": chosen.value,
                    "status": "flag" if flagged else "pass",
                    "threshold": chosen.threshold,
                    "rule": chosen.rule,
                    "key": chosen.key,
                }
        return out

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("recomputed")
        data["response"] = self.response
        data["summary"] = self.summary()
        return data

    @classmethod
    def from_json(cls, data: dict) -> SubjectQC:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["checks"] = [Check(**c) for c in data.get("checks", [])]
        return cls(**fields)


def _clean(name: str, prefix: str) -> str:
    name = str(name).strip()
    return name[len(prefix) :] if name.startswith(prefix) else name


def read_tumor_table(path: Path) -> list[dict]:
    """Rows of ``sub-S_tumor.tsv`` (numbers as floats, 'n/a' and blanks as None)."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise AtlasflowError(f"{path}: not a readable table ({exc})") from None
    if rows and not {"session", "volume_mm3"} <= set(rows[0]):
        raise AtlasflowError(f"{path}: needs columns session and volume_mm3, has {sorted(rows[0])}")
    out = []
    for row in rows:
        clean = {}
        for key, value in row.items():
            if key in ("session", "acq_date", "response"):
                clean[key] = _clean(value or "", "ses-") if key == "session" else (value or "")
            else:
                number = _number(value) if value not in (None, "", "n/a", "NA") else None
                clean[key] = (
                    number
                    if number is None or math.isfinite(number) or key == "doubling_time_days"
                    else None
                )
        out.append(clean)
    return out


def subject_qc(
    outdir: str | Path,
    subject: str,
    sessions: Sequence[str],
    *,
    thresholds: Mapping[str, object] | Thresholds | None = None,
    baseline: str | None = None,
    longitudinal: bool | None = None,
) -> SubjectQC:
    """QC verdict of one subject from its QC JSONs, tumour table and (when outputs are missing) logs.

    ``sessions`` are in acquisition order; the baseline of a longitudinal subject is ``baseline``,
    else the tumour table's baseline row, else the first session. ``longitudinal`` defaults to
    "more than one session".
    """
    outdir = Path(outdir)
    subject = _clean(subject, "sub-")
    sessions = [_clean(t, "ses-") for t in sessions]
    limits = Thresholds.from_mapping(thresholds)
    files = CohortFiles(outdir)
    longitudinal = len(sessions) > 1 if longitudinal is None else longitudinal
    qc = SubjectQC(subject, sessions, None, longitudinal, asdict(limits))
    sources: list[Path] = []
    skipped: dict[str, dict] = {}

    if longitudinal:
        table = files.tumor_table(subject)
        sources.append(table)
        record = failure_record(table)
        if record is not None:
            qc.missing.append(
                {
                    "session": "",
                    "file": _rel(table, outdir),
                    "reason": f"scan skipped, {describe(record)}",
                    "required": False,
                }
            )
        elif table.exists():
            try:
                qc.tumor = read_tumor_table(table)
            except AtlasflowError as exc:
                qc.missing.append(
                    {
                        "session": "",
                        "file": _rel(table, outdir),
                        "reason": str(exc),
                        "required": False,
                    }
                )
        else:
            qc.missing.append(
                {
                    "session": "",
                    "file": _rel(table, outdir),
                    "reason": "not found",
                    "required": False,
                }
            )
        from_table = [r["session"] for r in qc.tumor if r.get("response") == "baseline"]
        qc.baseline = (
            _clean(baseline, "ses-")
            if baseline
            else (from_table[0] if from_table else sessions[0] if sessions else None)
        )

    for session in sessions:
        scan = Scan(outdir, subject, session)
        stages = ["template", "atlas"] + (
            ["baseline"] if longitudinal and session != qc.baseline else []
        )
        sources.append(scan.preproc)
        record = failure_record(scan.preproc)
        if record is not None:  # under on_scan_error: skip, the record of why this scan failed
            skipped[session] = record
        if not scan.preproc.exists() or record is not None:
            qc.missing.append(
                {
                    "session": session,
                    "file": _rel(scan.preproc, outdir),
                    "reason": f"scan skipped, {describe(record)}" if record else "not found",
                    "required": True,
                }
            )
        for stage in stages:
            sources.append(scan.qc_json(stage))
            if stage == "atlas":
                sources += [scan.atlas_dseg, files.atlas_dseg]
            checks, raw, problem = stage_checks(scan, stage, limits, files.atlas_dseg)
            if session not in skipped and (record := failure_record(scan.qc_json(stage))):
                skipped[session] = record
            qc.checks += checks
            if problem:
                qc.missing.append(
                    {
                        "session": session,
                        "file": _rel(scan.qc_json(stage), outdir),
                        "reason": problem,
                        "required": True,
                    }
                )
                qc.checks.append(
                    Check(session, stage, "ncc_after", None, status="missing", note=problem)
                )
            if raw is not None:
                qc.registration[f"{session}/{stage}"] = {
                    "backend": raw.get("backend"),
                    "seconds": _number(raw.get("seconds")),
                }
        # A member whose registration to an atlas iteration failed (under on_scan_error: skip)
        # was left out of that average, even if its later steps succeeded.
        for table in files.member_tables():
            failed = _failed_member(table, f"sub-{subject}_ses-{session}")
            if failed is None:
                continue
            sources.append(table)
            record = {"step": f"atlas {table.parent.name}", "reason": failed}
            skipped.setdefault(session, record)
            qc.missing.append(
                {
                    "session": session,
                    "file": _rel(table, outdir),
                    "reason": f"left out of the atlas, {describe(record)}",
                    "required": True,
                }
            )

    if qc.missing:  # only then can a job's error explain something
        prefixes = [f"sub-{subject}_ses-{t}" for t in sessions] + [f"sub-{subject}"]
        for error in logged_errors(files.logs, prefixes):
            stem = Path(error["log"]).name
            error["session"] = next(
                (t for t in sessions if stem.startswith(f"sub-{subject}_ses-{t}")), ""
            )
            qc.errors.append(error)
    # A skipped scan whose log is gone still carries its reason in the failure record.
    logged = {e["session"] for e in qc.errors}
    for session, record in skipped.items():
        if session not in logged:
            qc.errors.append(
                {
                    "session": session,
                    "rule": str(record.get("step", "?")),
                    "log": "",
                    "message": str(record.get("reason", "")),
                }
            )

    required = [m for m in qc.missing if m["required"]]
    flags = [c for c in qc.checks if c.status == "flag"]
    if qc.errors:
        qc.status = "failed"
    elif required:
        qc.status = "incomplete"
    elif flags:
        qc.status = "flag"
    for error in qc.errors:
        where = f"ses-{error['session']} " if error["session"] else ""
        qc.reasons.append(f"{where}{error['rule']} failed: {error['message']}")
    if required and not qc.errors:
        qc.reasons += [
            f"ses-{m['session']}: {m['file'].split('/')[-1]} {m['reason']} (no error logged)"
            for m in required
        ]
    qc.reasons += [c.reason() for c in flags]
    qc.sources = {_rel(p, outdir): p.exists() for p in sorted(set(sources))}
    return qc


def _rel(path: Path, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------- figures


class Missing(Exception):
    """A figure's input is absent or unusable; the message is the reason shown in its place."""


@dataclass
class Panel:
    """One rendered figure (or the reason it could not be drawn)."""

    name: str  # file stem for the exported PNG, e.g. sub-01_ses-1_template
    title: str
    caption: str
    png: bytes | None = None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)  # rows of the figure that were missing


class _Inputs:
    """Loads report inputs once per report, turning absence into :class:`Missing` with a reason."""

    def __init__(self, outdir: Path):
        self.outdir = outdir
        self._cache: dict[tuple[Path, bool], object] = {}

    def image(self, path: Path | None, what: str, labels: bool = False):
        if path is None:
            raise Missing(f"{what}: not available")
        key = (Path(path), labels)
        if key not in self._cache:
            if not Path(path).exists():
                raise Missing(f"{what}: {_rel(Path(path), self.outdir)} not found")
            try:
                self._cache[key] = load_image(path, dtype=None if labels else np.float32)
            except AtlasflowError as exc:
                raise Missing(f"{what}: {exc}") from None
        return self._cache[key]

    def volume(self, path: Path | None, what: str, labels: bool = False) -> fg.Volume:
        return fg.Volume.from_image(self.image(path, what, labels))

    def maybe(
        self, path: Path | None, what: str, notes: list[str], labels: bool = False
    ) -> fg.Volume | None:
        """The volume, or None with the reason appended to ``notes``."""
        try:
            return self.volume(path, what, labels)
        except Missing as exc:
            notes.append(str(exc))
            return None


def _render(panel: Panel, build: Callable[[list[str]], bytes]) -> Panel:
    try:
        panel.png = build(panel.notes)
    except Missing as exc:
        panel.reason = str(exc)
    return panel


def _on_grid(
    volume: fg.Volume | None, reference: fg.Volume, what: str, notes: list[str]
) -> fg.Volume | None:
    if volume is not None and not volume.same_grid(reference):
        notes.append(
            f"{what}: grid {volume.shape} does not match the fixed image {reference.shape}"
        )
        return None
    return volume


def subject_panels(
    outdir: Path, qc: SubjectQC, raw_inputs: Mapping[str, str] | None = None
) -> list[tuple[str, list[Panel]]]:
    """Every figure of a subject report, grouped by section (session, or 'longitudinal')."""
    from atlasflow.io.itk import read_itk_displacement
    from atlasflow.transforms import Transform, apply_transform

    inputs = _Inputs(outdir)
    files = CohortFiles(outdir)
    raw_inputs = {_clean(k, "ses-"): v for k, v in (raw_inputs or {}).items()}
    s = qc.subject
    sections: list[tuple[str, list[Panel]]] = []

    if qc.longitudinal:
        panels = [
            _render(
                Panel(
                    f"sub-{s}_tumor",
                    "Tumour volume over time",
                    "Tumour volume from the masks at every session; point colour = response category.",
                ),
                lambda notes: _tumor_plot(qc, files.tumor_table(s)),
            )
        ]
        sections.append(("longitudinal", panels))

    for session in qc.sessions:
        scan = Scan(outdir, s, session)
        stem = f"sub-{s}_ses-{session}"
        panels = []

        def build_inputs(notes: list[str], scan=scan, session=session) -> bytes:
            raw_path = raw_inputs.get(session)
            if raw_path is None:
                notes.append("input: raw input path not given to the report")
                raw = None
            else:
                raw = inputs.maybe(Path(raw_path), "input", notes)
            pre = inputs.maybe(scan.preproc, "preprocessed", notes)
            mask = (
                inputs.maybe(scan.brain_mask, "brain mask", notes, labels=True)
                if pre is not None
                else None
            )
            mask = _on_grid(mask, pre, "brain mask", notes) if pre is not None else None
            if raw is None and pre is None:
                raise Missing("; ".join(notes))
            return fg.anatomy_rows(
                [
                    ("input", raw, None),
                    ("preprocessed + brain mask", pre, None if mask is None else mask.data),
                ]
            )

        panels.append(
            _render(
                Panel(
                    f"{stem}_inputs",
                    "Input and preprocessed image",
                    "Top: the scan as given (turned to RAS for display). Bottom: after reorientation, "
                    "bias correction, intensity scaling to [0, 1] and resampling; blue outline = brain mask.",
                ),
                build_inputs,
            )
        )

        followup = qc.longitudinal and session != qc.baseline
        for stage in ("template", "atlas", "baseline") if followup else ("template", "atlas"):

            def build_overlay(notes: list[str], scan=scan, stage=stage) -> bytes:
                fixed_image = inputs.image(files.fixed(stage, s, qc.baseline), stage)
                fixed = fg.Volume.from_image(fixed_image)
                before = None
                try:
                    moving = inputs.image(scan.preproc, "preprocessed")
                    before = fg.Volume.from_image(
                        apply_transform(moving, Transform.identity(), fixed_image.grid)
                    )
                except Missing as exc:
                    notes.append(str(exc))
                after = _on_grid(
                    inputs.maybe(scan.warped(stage), "registered", notes),
                    fixed,
                    "registered",
                    notes,
                )
                if before is None and after is None:
                    raise Missing("; ".join(notes))
                return fg.registration_overlay(
                    fixed, [("before (no transform)", before), ("after registration", after)]
                )

            panels.append(
                _render(
                    Panel(
                        f"{stem}_{stage}",
                        f"Registration {STAGE_TITLES[stage]}",
                        f"Red lines: edges of the {STAGE_IMAGES[stage]}. Top: the preprocessed scan "
                        "placed on its grid as it is; bottom: after registration. Aligned when the red "
                        "edges follow the scan's own boundaries.",
                    ),
                    build_overlay,
                )
            )

        def build_jacobian(notes: list[str], scan=scan) -> bytes:
            rows = []
            for stage in ("template", "atlas"):
                what = f"displacement field {STAGE_TITLES[stage]}"
                background = inputs.maybe(files.fixed(stage, s, qc.baseline), stage, [])
                det = centre = None
                if not scan.warp(stage).exists():
                    notes.append(f"{what}: {_rel(scan.warp(stage), outdir)} not found")
                else:
                    try:
                        field = fg.ras_image(read_itk_displacement(scan.warp(stage)))
                        on_grid = (
                            background is not None and background.shape == field.data.shape[:3]
                        )
                        centre = fg.foreground_centre(background) if on_grid else None
                        det = jacobian_on_views(field, centre)
                    except AtlasflowError as exc:
                        notes.append(f"{what}: {exc}")
                rows.append((STAGE_TITLES[stage], det, background, centre))
            if all(r[1] is None for r in rows):
                raise Missing("; ".join(notes))
            return fg.jacobian_rows(rows)

        panels.append(
            _render(
                Panel(
                    f"{stem}_jacobian",
                    "Jacobian determinant",
                    "Local volume change of the deformation (after the affine part), on the fixed grid: "
                    "red = expansion, blue = contraction, bright green = folding (det J <= 0).",
                ),
                build_jacobian,
            )
        )

        if followup:
            base = Scan(outdir, s, qc.baseline)

            def build_change(notes: list[str], scan=scan, base=base) -> bytes:
                background = inputs.volume(base.preproc, "baseline preprocessed image")
                maps = [
                    ("log-Jacobian", scan.log_jacobian, "", True),
                    ("difference", scan.difference, "a.u.", True),
                    ("displacement", scan.displacement, "mm", False),
                ]
                rows = [
                    (
                        label,
                        _on_grid(inputs.maybe(path, label, notes), background, label, notes),
                        unit,
                        signed,
                    )
                    for label, path, unit, signed in maps
                ]
                if all(r[1] is None for r in rows):
                    raise Missing("; ".join(notes))
                tb = _on_grid(
                    inputs.maybe(base.tumor_mask, "baseline tumour mask", [], labels=True),
                    background,
                    "",
                    [],
                )
                tf = _on_grid(
                    inputs.maybe(scan.tumor_in_baseline, "follow-up tumour mask", [], labels=True),
                    background,
                    "",
                    [],
                )
                return fg.change_maps(
                    background,
                    rows,
                    None if tb is None else tb.data > 0,
                    None if tf is None else tf.data > 0,
                )

            panels.append(
                _render(
                    Panel(
                        f"{stem}_change",
                        f"Change since baseline (ses-{qc.baseline})",
                        "On the baseline image, sliced through the tumour: log-Jacobian (red = growth, "
                        "blue = shrinkage), intensity difference after registration, displacement "
                        "magnitude (mass effect). Outlines: baseline tumour cyan, follow-up tumour yellow.",
                    ),
                    build_change,
                )
            )
        sections.append((session, panels))
    return sections


def jacobian_on_views(field: Image, centre: Sequence[int] | None) -> fg.Volume:
    """Jacobian determinant of a RAS-ordered displacement field on the three view planes only.

    Each plane is computed from a three-voxel slab around it with
    :func:`atlasflow.transforms.jacobian_determinant` (central differences need one neighbour on
    each side), NaN elsewhere: a whole 2 mm field costs about a second, the planes milliseconds.
    """
    from atlasflow.transforms import jacobian_determinant

    shape = field.data.shape[:3]
    centre = tuple(int(c) for c in (centre if centre is not None else fg.centre_of(None, shape)))
    det = np.full(shape, np.nan, np.float32)
    for axis in range(3):
        at = int(np.clip(centre[axis], 0, shape[axis] - 1))
        lo, hi = max(at - 1, 0), min(at + 2, shape[axis])
        if hi - lo < 2:  # a single-voxel axis has no derivative along it
            continue
        slab = np.take(field.data, np.arange(lo, hi), axis=axis)
        plane = np.take(jacobian_determinant(Image(slab, field.affine)), at - lo, axis=axis)
        index = [slice(None)] * 3
        index[axis] = at
        det[tuple(index)] = plane
    return fg.Volume(det, np.sqrt((np.asarray(field.affine)[:3, :3] ** 2).sum(axis=0)))


def response_rule() -> str:
    """The volumetric response rule of :mod:`atlasflow.longitudinal.change`, in words."""
    from atlasflow.longitudinal.change import PARTIAL_RESPONSE_PCT, PROGRESSION_PCT

    return (
        "Response category (volumetric, after RANO/mRANO, relative to the baseline volume): "
        f"progression at {PROGRESSION_PCT:+g} % or more, partial response at {PARTIAL_RESPONSE_PCT:+g} % "
        "or less, complete response when no tumour is left, stable in between; not evaluable "
        "without masks."
    )


def _tumor_plot(qc: SubjectQC, table: Path) -> bytes:
    if not qc.tumor:
        raise Missing(f"tumour table: {table.name} not found or empty")
    rows = qc.tumor
    days = [
        r.get("days_since_baseline") if r.get("days_since_baseline") is not None else float(i)
        for i, r in enumerate(rows)
    ]
    volumes = [
        r.get("volume_mm3") if r.get("volume_mm3") is not None else float("nan") for r in rows
    ]
    response = qc.response or "baseline only"
    return fg.tumor_volume_plot(
        days,
        volumes,
        [r["session"] for r in rows],
        [r.get("response", "") for r in rows],
        f"sub-{qc.subject}: {response.replace('_', ' ')}",
    )


# -------------------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1320px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:1.6em;margin:.4em 0}h2{font-size:1.25em;margin:1.6em 0 .5em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
h3{font-size:1.05em;margin:1.2em 0 .4em}
a{color:#0969da}
.banner{border-radius:8px;padding:12px 16px;margin:12px 0;font-size:1.05em}
.banner ul{margin:.4em 0 0;padding-left:1.3em}
.banner.pass{background:#dafbe1;border:1px solid #1a7f37}.banner.flag{background:#ffebe9;border:1px solid #cf222e}
.banner.failed{background:#ffebe9;border:2px solid #82071e}.banner.incomplete{background:#fff8c5;border:1px solid #bf8700}
.badge{display:inline-block;border-radius:1em;padding:.05em .6em;font-weight:600;font-size:.85em;white-space:nowrap}
.badge.pass{background:#1a7f37;color:#fff}.badge.flag{background:#cf222e;color:#fff}
.badge.failed{background:#82071e;color:#fff}.badge.incomplete{background:#bf8700;color:#fff}
.badge.info,.badge.missing{background:#d0d7de;color:#1f2328}
.badge.progression{background:#cf222e;color:#fff}.badge.stable{background:#6e7781;color:#fff}
.badge.partial_response{background:#0969da;color:#fff}.badge.complete_response{background:#1a7f37;color:#fff}
.badge.not_evaluable{background:#bf8700;color:#fff}.badge.baseline{background:#d0d7de;color:#1f2328}
table{border-collapse:collapse;background:#fff;font-size:.9em;margin:.4em 0}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
td.reasons{max-width:380px;font-size:.9em}
th{background:#eaeef2;overflow-wrap:normal}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.flag{background:#ffebe9;color:#82071e;font-weight:600}td.pass{color:#1a7f37}
.limit{font-weight:400;font-size:.8em;color:#57606a;white-space:nowrap}td.missing-cell{color:#57606a;background:#f6f8fa}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \\2195";color:#8c959f}
table.sortable th[data-dir=asc]:after{content:" \\2191"}table.sortable th[data-dir=desc]:after{content:" \\2193"}
.figures{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:6px 0;background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:8px;display:flex;flex-direction:column;max-width:100%}
figure img{display:block;max-width:100%;height:auto}
figcaption{font-size:.85em;color:#57606a;margin-top:4px;width:0;min-width:100%}
.missing-figure{background:repeating-linear-gradient(45deg,#f6f8fa,#f6f8fa 10px,#eaeef2 10px,#eaeef2 20px);
border:2px dashed #8c959f;border-radius:6px;padding:14px 18px;color:#57606a;width:480px;max-width:100%;box-sizing:border-box;
overflow-wrap:anywhere}
th{font-size:.95em}
.missing-figure b{color:#1f2328}.note{font-size:.85em;color:#9a6700}
nav{font-size:.9em;margin:.3em 0}nav a{margin-right:.8em}.muted{color:#57606a;font-size:.9em}
dl.defs dt{font-weight:600}dl.defs dd{margin:0 0 .4em 1em;color:#57606a;font-size:.9em}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var dir = th.dataset.dir === 'asc' ? 'desc' : 'asc';
      table.querySelectorAll('th').forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = dir;
      var key = function (row) {
        var cell = row.cells[col];
        var raw = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
        var num = parseFloat(raw);
        return isNaN(num) ? [1, raw.toLowerCase()] : [0, num];
      };
      var body = table.tBodies[0];
      Array.from(body.rows).sort(function (a, b) {
        var x = key(a), y = key(b);
        var cmp = x[0] - y[0] || (x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0);
        return dir === 'asc' ? cmp : -cmp;
      }).forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

MARK = {
    "pass": "\u2714 pass",
    "flag": "\u2716 flag",
    "failed": "\u2716 FAILED",
    "incomplete": "\u25cc incomplete",
    "info": "info",
    "missing": "\u2014 missing",
}
RULE_TEXT = {">=": "\u2265", "<=": "\u2264"}
DEFINITIONS = [
    (
        "NCC",
        "normalised cross-correlation between the fixed image and the moving image inside the fixed brain mask; "
        "'before' places the scan on the fixed grid without any transform, 'after' uses the registration.",
    ),
    (
        "folding fraction",
        "share of voxels in the fixed brain mask where the Jacobian determinant of the deformation "
        "is \u2264 0 (the map folds over itself); a diffeomorphism has none.",
    ),
    (
        "mean Dice",
        "mean over labels of the overlap of the subject's labels warped into atlas space with the atlas label map.",
    ),
]


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def badge(status: str, text: str | None = None) -> str:
    return f'<span class="badge {_e(status)}">{_e(text if text is not None else MARK.get(status, status))}</span>'


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n"
        f"<script>{SORT_JS}</script>\n</body>\n</html>\n"
    )


def _png_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def figure_html(panel: Panel) -> str:
    if panel.png is None:
        return (
            f'<figure class="missing"><div class="missing-figure" data-missing="{_e(panel.name)}">'
            f"<b>missing: {_e(panel.title)}</b><br>{_e(panel.reason or 'no input')}</div>"
            f"<figcaption><b>{_e(panel.title)}.</b> {_e(panel.caption)}</figcaption></figure>"
        )
    notes = "".join(f'<div class="note">missing: {_e(n)}</div>' for n in panel.notes)
    return (
        f"<figure>{_png_tag(panel.png, panel.title)}<figcaption><b>{_e(panel.title)}.</b> "
        f"{_e(panel.caption)}{notes}</figcaption></figure>"
    )


def _figures(panels: Sequence[Panel]) -> str:
    return '<div class="figures">' + "".join(figure_html(p) for p in panels) + "</div>"


def _banner(qc: SubjectQC) -> str:
    heads = {
        "pass": "All QC checks passed.",
        "flag": "Flagged by QC:",
        "failed": "Processing failed:",
        "incomplete": "Outputs missing:",
    }
    items = "".join(f"<li>{_e(r)}</li>" for r in qc.reasons)
    return (
        f'<div class="banner {qc.status}">{badge(qc.status)} <b>{_e(heads[qc.status])}</b>'
        f"{f'<ul>{items}</ul>' if items else ''}</div>"
    )


def qc_table(qc: SubjectQC) -> str:
    """One row per registration; each judged number carries its mark, the header its threshold."""
    limits = Thresholds(**qc.thresholds)
    columns = [
        ("ncc_before", "NCC before", "information"),
        (
            "ncc_after",
            "NCC after",
            f"\u2265 {format_metric('ncc_after', limits.min_ncc_after)} (qc.min_ncc_after)",
        ),
        (
            "ncc_change",
            "NCC change",
            f"\u2265 {format_metric('ncc_change', -NCC_DROP_TOLERANCE)} (no loss)",
        ),
        (
            "folding_fraction",
            "folding fraction",
            f"\u2264 {format_metric('folding_fraction', limits.max_folding_fraction)} (qc.max_folding_fraction)",
        ),
        (
            "dice_mean",
            "mean Dice",
            f"\u2265 {format_metric('dice_mean', limits.min_dice)} (qc.min_dice)",
        ),
    ]
    head = "".join(
        f'<th>{_e(label)}<br><span class="limit">{_e(limit)}</span></th>'
        for _, label, limit in columns
    )
    rows = []
    for session in qc.sessions:
        for stage in STAGES:
            checks = {c.metric: c for c in qc.checks if c.session == session and c.stage == stage}
            if not checks:
                continue
            reg = qc.registration.get(f"{session}/{stage}", {})
            how = (
                f"{reg.get('backend')}, {reg['seconds']:.1f} s"
                if reg.get("seconds") is not None
                else ""
            )
            lead = f"<td>ses-{_e(session)}</td><td>{_e(STAGE_TITLES[stage])}</td>"
            missing = [
                c for c in checks.values() if c.status == "missing" and c.metric == "ncc_after"
            ]
            if missing:
                rows.append(
                    f'<tr>{lead}<td colspan="{len(columns)}" class="missing-cell">{badge("missing")} '
                    f"{_e(missing[0].note)}</td><td></td></tr>"
                )
                continue
            cells = []
            for metric, _, _ in columns:
                c = checks.get(metric)
                if c is None:
                    cells.append('<td class="num muted">\u2014</td>')
                elif c.status == "missing":
                    cells.append(
                        f'<td class="num muted" title="{_e(c.note)}">{badge("missing")}</td>'
                    )
                else:
                    mark = {"pass": "\u2714 ", "flag": "\u2716 "}.get(c.status, "")
                    title = f' title="{_e(c.note)}"' if c.note else ""
                    cells.append(
                        f'<td class="num {c.status}"{title}>{mark}{_e(format_metric(metric, c.value))}</td>'
                    )
            rows.append(f'<tr>{lead}{"".join(cells)}<td class="muted">{_e(how)}</td></tr>')
    notes = sorted(
        {c.note for c in qc.checks if c.metric == "dice_mean" and c.note and c.status != "missing"}
    )
    foot = f'<p class="muted">Mean Dice: {_e("; ".join(notes))}.</p>' if notes else ""
    return (
        f'<table class="qc"><tr><th>session</th><th>registration</th>{head}<th>backend, time</th></tr>'
        f"{''.join(rows)}</table>{foot}"
    )


def _tumor_table_html(rows: list[dict]) -> str:
    columns = [
        ("session", "session"),
        ("acq_date", "date"),
        ("days_since_baseline", "days"),
        ("volume_mm3", "volume (mm\u00b3)"),
        ("change_from_baseline_pct", "vs baseline (%)"),
        ("change_from_previous_pct", "vs previous (%)"),
        ("growth_rate_mm3_per_day", "growth (mm\u00b3/day)"),
        ("doubling_time_days", "doubling time (days)"),
        ("response", "response"),
    ]
    head = "".join(f"<th>{_e(t)}</th>" for _, t in columns)
    body = []
    for r in rows:
        cells = []
        for key, _ in columns:
            value = r.get(key)
            if key == "response":
                cells.append(f"<td>{badge(value, value.replace('_', ' ')) if value else ''}</td>")
            elif isinstance(value, float):
                shown = f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
                cells.append(f'<td class="num">{_e(shown)}</td>')
            else:
                cells.append(f"<td>{_e('' if value is None else value)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table>{'<tr>' + head + '</tr>'}{''.join(body)}</table>"


def _errors_html(errors: list[dict], missing: list[dict]) -> str:
    parts = []
    if errors:
        rows = "".join(
            f"<tr><td>{_e(('ses-' + e['session']) if e['session'] else '')}</td><td>{_e(e['rule'])}</td>"
            f"<td>{_e(e['message'])}</td><td><code>{_e(e['log'])}</code></td></tr>"
            for e in errors
        )
        parts.append(
            f"<h3>Errors logged</h3><table><tr><th>session</th><th>step</th><th>error</th><th>log</th></tr>{rows}</table>"
        )
    if missing:
        rows = "".join(
            f"<tr><td>{_e(('ses-' + m['session']) if m['session'] else '')}</td><td><code>{_e(m['file'])}</code></td>"
            f"<td>{_e(m['reason'])}</td><td>{'required' if m['required'] else 'optional'}</td></tr>"
            for m in missing
        )
        parts.append(
            f"<h3>Missing outputs</h3><table><tr><th>session</th><th>file</th><th>reason</th><th></th></tr>{rows}</table>"
        )
    return "".join(parts)


def subject_html(qc: SubjectQC, sections: list[tuple[str, list[Panel]]]) -> str:
    s = qc.subject
    nav = "".join(
        f'<a href="#{_e(name)}">{_e("ses-" + name if name != "longitudinal" else name)}</a>'
        for name, _ in sections
    )
    body = [
        f'<nav><a href="cohort.html">\u2190 cohort report</a> {nav}</nav>',
        f"<h1>sub-{_e(s)}</h1>",
        f'<p class="muted">Sessions: {", ".join("ses-" + _e(t) for t in qc.sessions)}'
        + (f"; longitudinal, baseline ses-{_e(qc.baseline)}" if qc.longitudinal else "")
        + "</p>",
        _banner(qc),
        "<h2>QC numbers</h2>",
        qc_table(qc)
        if qc.checks
        else '<p class="muted">No QC numbers: the registrations have not produced their QC files.</p>',
        _errors_html(qc.errors, qc.missing),
    ]
    for name, panels in sections:
        if name == "longitudinal":
            response = qc.response
            body.append(
                f'<h2 id="longitudinal">Tumour over time {badge(response, response.replace("_", " ")) if response else ""}</h2>'
            )
            body.append(_figures(panels))
            if qc.tumor:
                body.append(_tumor_table_html(qc.tumor))
            body.append(f'<p class="muted">{_e(response_rule())}</p>')
        else:
            role = (
                " (baseline)"
                if qc.longitudinal and name == qc.baseline
                else (" (follow-up)" if qc.longitudinal else "")
            )
            body.append(f'<h2 id="{_e(name)}">ses-{_e(name)}{role}</h2>')
            body.append(_figures(panels))
    body.append(
        '<h2>Definitions</h2><dl class="defs">'
        + "".join(f"<dt>{_e(t)}</dt><dd>{_e(d)}</dd>" for t, d in DEFINITIONS)
        + "</dl>"
    )
    return _page(f"atlasflow: sub-{s}", "\n".join(body))


# ----------------------------------------------------------------------------- subject report


def save_figures(panels: Sequence[Panel], figures_dir: str | Path) -> list[Path]:
    """Write every panel as ``<name>.png`` (a grey 'missing' PNG when it could not be drawn)."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in panels:
        png = (
            panel.png
            if panel.png is not None
            else fg.placeholder_png(panel.title, panel.reason or "no input")
        )
        path = figures_dir / f"{panel.name}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(png)
        tmp.replace(path)
        written.append(path)
    return written


def write_subject_report(
    outdir: str | Path,
    subject: str,
    sessions: Sequence[str],
    out_html: str | Path,
    *,
    raw_inputs: Mapping[str, str] | None = None,
    thresholds: Mapping[str, object] | Thresholds | None = None,
    baseline: str | None = None,
    longitudinal: bool | None = None,
    figures_dir: str | Path | None = None,
    qc_json: str | Path | None = None,
) -> dict:
    """Write ``sub-S.html`` and ``sub-S_qc.json`` (default: next to the page); return the QC summary.

    ``sessions`` in acquisition order (the first is the baseline unless ``baseline`` says otherwise);
    ``raw_inputs`` maps session -> the manifest's T1w path. With ``figures_dir`` the figures are also
    written there as PNGs (for Snakemake's ``report()``).
    """
    outdir, out_html = Path(outdir), Path(out_html)
    qc = subject_qc(
        outdir,
        subject,
        sessions,
        thresholds=thresholds,
        baseline=baseline,
        longitudinal=longitudinal,
    )
    sections = subject_panels(outdir, qc, raw_inputs)
    atomic_write_text(out_html, subject_html(qc, sections))
    summary = qc.to_json()
    summary["report"] = out_html.name
    json_path = Path(qc_json) if qc_json else out_html.with_name(f"sub-{qc.subject}_qc.json")
    atomic_write_text(json_path, json.dumps(summary, indent=1, sort_keys=True) + "\n")
    if figures_dir is not None:
        save_figures([p for _, panels in sections for p in panels], figures_dir)
    return summary


def save_subject_figures(
    outdir: str | Path, subject: str, sessions: Sequence[str], figures_dir: str | Path, **options
) -> list[Path]:
    """Only the figures of a subject report, as PNG files (for Snakemake's ``report()``)."""
    raw_inputs = options.pop("raw_inputs", None)
    qc = subject_qc(outdir, subject, sessions, **options)
    sections = subject_panels(Path(outdir), qc, raw_inputs)
    return save_figures([p for _, panels in sections for p in panels], figures_dir)


# ------------------------------------------------------------------------------ cohort report


def _fresh_summary(
    path: Path, outdir: Path, limits: Thresholds, sessions: Sequence[str] | None
) -> SubjectQC | None:
    """The subject's QC JSON if no input it read appeared, vanished or changed since it was written."""
    if not path.exists():
        return None
    try:
        qc = SubjectQC.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if qc.thresholds != asdict(limits) or (sessions and list(sessions) != qc.sessions):
        return None
    stamp = path.stat().st_mtime
    for source, existed in qc.sources.items():
        p = outdir / source
        if p.exists() != existed or (existed and p.stat().st_mtime > stamp):
            return None
    return qc


def _discover_sessions(outdir: Path, subject: str) -> list[str]:
    sessions = {p.name[4:] for p in (outdir / f"sub-{subject}").glob("ses-*") if p.is_dir()}
    logs = outdir / "logs"
    if logs.is_dir():
        for log in logs.rglob(f"sub-{subject}_ses-*.log"):
            sessions.add(log.name[len(f"sub-{subject}_ses-") : -4].split("_")[0])
    return sorted(sessions)


def cohort_verdicts(
    outdir: str | Path,
    subjects: Sequence[str],
    reports_dir: str | Path,
    *,
    thresholds: Mapping[str, object] | Thresholds | None = None,
    sessions: Mapping[str, Sequence[str]] | None = None,
) -> list[SubjectQC]:
    """Every subject's verdict: its report's QC JSON when fresh, else recomputed from the outputs."""
    outdir, reports_dir = Path(outdir), Path(reports_dir)
    limits = Thresholds.from_mapping(thresholds)
    sessions = {_clean(k, "sub-"): list(v) for k, v in (sessions or {}).items()}
    verdicts = []
    for subject in (_clean(s, "sub-") for s in subjects):
        given = [_clean(t, "ses-") for t in sessions.get(subject, [])]
        qc = _fresh_summary(reports_dir / f"sub-{subject}_qc.json", outdir, limits, given)
        if qc is None:
            qc = subject_qc(
                outdir, subject, given or _discover_sessions(outdir, subject), thresholds=limits
            )
            qc.recomputed = True
            if not qc.sessions:
                qc.status = "failed" if qc.errors else "incomplete"
                qc.reasons = qc.reasons or [
                    f"no outputs and no logs found for sub-{subject} under {outdir}"
                ]
        verdicts.append(qc)
    return verdicts


def cohort_panels(outdir: Path, iterations: int | None = None) -> list[Panel]:
    """Atlas at every iteration, convergence curves and the tumour-frequency map."""
    files = CohortFiles(outdir)
    inputs = _Inputs(outdir)
    found = [int(p.name[5:]) for p in (outdir / "atlas").glob("iter-*") if p.name[5:].isdigit()]
    metrics = _read_metrics(files.metrics)
    last = max(
        [
            iterations or 0,
            *found,
            *[int(r["iteration"]) for r in metrics if r.get("iteration") is not None],
        ]
    )
    panels = []

    def build_iterations(notes: list[str]) -> bytes:
        columns = [
            (f"iter-{i}", inputs.maybe(files.iteration(i), f"iter-{i}", notes))
            for i in range(last + 1)
        ]
        if all(v is None for _, v in columns):
            raise Missing("; ".join(notes) or "no atlas iterations found")
        return fg.atlas_iterations(columns)

    panels.append(
        _render(
            Panel(
                "atlas_iterations",
                "Atlas at every iteration",
                "Iteration 0 is the affine mean of the cohort; each later iteration registers every member "
                "to the previous template, averages and pulls the average to the cohort's centre. "
                "Sharper columns to the right mean the members agree.",
            ),
            build_iterations,
        )
    )

    def build_convergence(notes: list[str]) -> bytes:
        if not files.metrics.exists():
            raise Missing(f"atlas metrics: {_rel(files.metrics, outdir)} not found")
        if not metrics:
            raise Missing(f"atlas metrics: {_rel(files.metrics, outdir)} has no rows")
        x = [r["iteration"] for r in metrics]
        groups = [
            ("template change (RMS)", {"rms": "template_change_rms"}),
            (
                "mean velocity norm (mm)",
                {"mean": "mean_velocity_norm_mean_mm", "max": "mean_velocity_norm_max_mm"},
            ),
            ("NCC of members to template", {"mean": "ncc_to_template_mean"}),
            ("folding fraction", {"max": "folding_fraction_max", "mean": "folding_fraction_mean"}),
        ]
        series = []
        for title, keys in groups:
            curves = {
                label: [np.nan if r.get(k) is None else r[k] for r in metrics]
                for label, k in keys.items()
                if any(r.get(k) is not None for r in metrics)
            }
            if curves:
                series.append((title, curves))
        if not series:
            raise Missing(
                f"atlas metrics: {_rel(files.metrics, outdir)} has none of the expected columns"
            )
        return fg.convergence_plot(x, series)

    panels.append(
        _render(
            Panel(
                "atlas_convergence",
                "Atlas convergence",
                "Per-iteration metrics from atlas/metrics.tsv: the template change and the mean velocity "
                "should shrink, the members' NCC to the template should rise and level off.",
            ),
            build_convergence,
        )
    )

    def build_frequency(notes: list[str]) -> bytes:
        frequency = inputs.volume(files.tumor_frequency, "tumour frequency map")
        background = inputs.maybe(files.atlas, "atlas", notes)
        unit = "fraction of subjects" if float(np.nanmax(frequency.data)) <= 1.0 else "subjects"
        return fg.frequency_map(background, frequency, unit)

    panels.append(
        _render(
            Panel(
                "tumor_frequency",
                "Tumour frequency in atlas space",
                "Tumour masks of the cohort carried into atlas space: how often each voxel is tumour "
                "(red rarely, yellow always); sliced through the most frequent voxel.",
            ),
            build_frequency,
        )
    )
    return panels


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
    out = [{k: _number(v) for k, v in r.items()} for r in rows]
    return sorted((r for r in out if r.get("iteration") is not None), key=lambda r: r["iteration"])


def _metrics_table(path: Path) -> str:
    rows = _read_metrics(path)
    if not rows:
        return ""
    keys = list(rows[0])
    head = "".join(f"<th>{_e(k).replace('_', '_<wbr>')}</th>" for k in keys)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{_e("" if r[k] is None else f"{r[k]:.4g}")}</td>' for k in keys)
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _cohort_errors(outdir: Path) -> list[dict]:
    """Errors in the cohort-wide logs (not per subject): template, atlas iterations, final atlas."""
    logs = outdir / "logs"
    if not logs.is_dir():
        return []
    found = []
    for log in sorted(logs.rglob("*.log")):
        if log.name.startswith("sub-"):
            continue
        message = last_error_line(log)
        if message:
            found.append({"log": str(log.relative_to(outdir)), "message": message})
    return found


def _cell(summary: dict, key: str, metric: str) -> str:
    item = summary.get(key)
    if not item:
        return '<td class="num" data-sort="">\u2014</td>'
    value = item["value"]
    shown = format_metric(metric, value)
    title = f"{RULE_TEXT.get(item['rule'], '')} {format_metric(metric, item['threshold'])} ({item['key']})"
    mark = "\u2716 " if item["status"] == "flag" else ""
    return (
        f'<td class="num {item["status"]}" data-sort="{_e(value)}" title="threshold {_e(title)}">'
        f"{mark}{_e(shown)}</td>"
    )


def cohort_html(
    verdicts: list[SubjectQC],
    panels: list[Panel],
    outdir: Path,
    reports_dir: Path,
    limits: Thresholds,
) -> str:
    counts = {s: sum(q.status == s for q in verdicts) for s in STATUS_RANK}
    ordered = sorted(verdicts, key=lambda q: (STATUS_RANK[q.status], q.subject))
    attention = [q for q in ordered if q.status != "pass"]
    body = [
        "<h1>atlasflow cohort report</h1>",
        '<nav><a href="#subjects">subjects</a><a href="#failed">failed</a><a href="#atlas">atlas</a>'
        '<a href="#tumour">tumour frequency</a><a href="#definitions">definitions</a></nav>',
        f"<p>{len(verdicts)} subjects: "
        + " ".join(
            badge(s, f"{counts[s]} {s}")
            for s in ("pass", "flag", "failed", "incomplete")
            if counts[s] or s == "pass"
        )
        + "</p>",
    ]
    if attention:
        items = []
        for q in attention:
            link = (
                f'<a href="sub-{_e(q.subject)}.html">sub-{_e(q.subject)}</a>'
                if (reports_dir / f"sub-{q.subject}.html").exists()
                else f"sub-{_e(q.subject)}"
            )
            reasons = "; ".join(q.reasons) or q.status
            items.append(f"<li>{badge(q.status)} <b>{link}</b>: {_e(reasons)}</li>")
        body.append(
            f'<div class="banner flag"><b>Needs attention ({len(attention)} of {len(verdicts)}):</b><ul>{"".join(items)}</ul></div>'
        )
    else:
        body.append(
            '<div class="banner pass">' + badge("pass") + " <b>All subjects passed QC.</b></div>"
        )

    body.append(
        '<h2 id="subjects">Subjects</h2><p class="muted">Click a column header to sort. '
        "Numbers are the worst over the subject's sessions; \u2716 marks a value outside its threshold "
        "(hover for the threshold).</p>"
    )
    head = [
        "subject",
        "sessions",
        "QC",
        "reasons",
        "NCC to template",
        "NCC to atlas",
        "NCC to baseline",
        "folding (max)",
        "Dice to atlas",
        "tumour response",
        "report",
    ]
    rows = []
    for q in ordered:
        summary = q.summary()
        folding = [v for k, v in summary.items() if k.endswith("/folding_fraction")]
        fold_item = max(folding, key=lambda v: v["value"], default=None)
        if fold_item and any(v["status"] == "flag" for v in folding):
            fold_item = {**fold_item, "status": "flag"}
        report = reports_dir / f"sub-{q.subject}.html"
        if not report.exists():
            link = '<span class="muted">none</span>'
        elif q.recomputed:
            # The page predates the outputs it describes (a rerun failed before reaching it).
            link = (
                f'<a href="sub-{_e(q.subject)}.html" title="written before the current outputs; '
                'the verdict here is recomputed">older page</a>'
            )
        else:
            link = f'<a href="sub-{_e(q.subject)}.html">open</a>'
        response = q.response
        rows.append(
            f'<tr class="{q.status}"><td>sub-{_e(q.subject)}</td><td class="num">{len(q.sessions)}</td>'
            f'<td data-sort="{STATUS_RANK[q.status]}">{badge(q.status)}</td>'
            f'<td class="reasons">{"<br>".join(_e(r) for r in q.reasons)}</td>'
            + _cell(summary, "template/ncc_after", "ncc_after")
            + _cell(summary, "atlas/ncc_after", "ncc_after")
            + _cell(summary, "baseline/ncc_after", "ncc_after")
            + _cell({"f": fold_item} if fold_item else {}, "f", "folding_fraction")
            + _cell(summary, "atlas/dice_mean", "dice_mean")
            + f"<td>{badge(response, response.replace('_', ' ')) if response else ''}</td><td>{link}</td></tr>"
        )
    body.append(
        '<table class="sortable" id="subject-table"><thead><tr>'
        + "".join(f"<th>{_e(h)}</th>" for h in head)
        + f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )

    body.append('<h2 id="failed">Failed subjects</h2>')
    failed = [q for q in ordered if q.status in ("failed", "incomplete")]
    if failed:
        rows = []
        for q in failed:
            if q.errors:
                for e in q.errors:
                    rows.append(
                        f"<tr><td>sub-{_e(q.subject)}</td><td>{_e(('ses-' + e['session']) if e['session'] else '')}</td>"
                        f"<td>{_e(e['rule'])}</td><td>{_e(e['message'])}</td><td><code>{_e(e['log'])}</code></td></tr>"
                    )
            else:
                for reason in q.reasons:
                    rows.append(
                        f"<tr><td>sub-{_e(q.subject)}</td><td></td><td>{badge(q.status)}</td><td>{_e(reason)}</td><td></td></tr>"
                    )
        body.append(
            "<table><tr><th>subject</th><th>session</th><th>step</th><th>reason</th><th>log</th></tr>"
            + "".join(rows)
            + "</table>"
        )
    else:
        body.append('<p class="muted">None: every subject has all its outputs.</p>')

    files = CohortFiles(outdir)
    by_name = {p.name: p for p in panels}
    body.append('<h2 id="atlas">Atlas</h2>')
    body.append(_figures([by_name["atlas_iterations"], by_name["atlas_convergence"]]))
    body.append(_metrics_table(files.metrics))
    if not files.atlas.exists():
        errors = _cohort_errors(outdir)
        if errors:
            body.append(
                "<h3>Cohort-wide errors logged</h3><table><tr><th>log</th><th>error</th></tr>"
                + "".join(
                    f"<tr><td><code>{_e(e['log'])}</code></td><td>{_e(e['message'])}</td></tr>"
                    for e in errors
                )
                + "</table>"
            )
    body.append('<h2 id="tumour">Tumour frequency</h2>')
    body.append(_figures([by_name["tumor_frequency"]]))
    body.append(
        '<h2 id="definitions">Thresholds and definitions</h2>'
        f"<p>A subject is flagged when any registration has folding fraction &gt; "
        f"{_e(format_metric('folding_fraction', limits.max_folding_fraction))} (qc.max_folding_fraction), "
        f"NCC after &lt; {limits.min_ncc_after:.3f} (qc.min_ncc_after) or mean Dice &lt; {limits.min_dice:.3f} "
        "(qc.min_dice). It has failed when a required output is missing and a job logged an error; "
        'incomplete when an output is missing without a logged error.</p><dl class="defs">'
        + "".join(f"<dt>{_e(t)}</dt><dd>{_e(d)}</dd>" for t, d in DEFINITIONS)
        + "</dl>"
    )
    return _page("atlasflow: cohort report", "\n".join(body))


def write_cohort_report(
    outdir: str | Path,
    subjects: Sequence[str],
    out_html: str | Path,
    *,
    thresholds: Mapping[str, object] | Thresholds | None = None,
    sessions: Mapping[str, Sequence[str]] | None = None,
    iterations: int | None = None,
    figures_dir: str | Path | None = None,
) -> list[SubjectQC]:
    """Write ``cohort.html``: verdict table linking the subject pages, failed list, atlas, tumour map.

    Subject pages and their ``sub-S_qc.json`` are looked up next to ``out_html``. ``sessions``
    (subject -> sessions) and ``iterations`` (the configured atlas iterations) let the page name
    what is missing; without them they are discovered from the files. Returns the verdicts.
    """
    outdir, out_html = Path(outdir), Path(out_html)
    limits = Thresholds.from_mapping(thresholds)
    verdicts = cohort_verdicts(
        outdir, subjects, out_html.parent, thresholds=limits, sessions=sessions
    )
    panels = cohort_panels(outdir, iterations)
    atomic_write_text(out_html, cohort_html(verdicts, panels, outdir, out_html.parent, limits))
    if figures_dir is not None:
        save_figures(panels, figures_dir)
    return verdicts


# ------------------------------------------------------------------------------------- CLI


def _add_thresholds(p: argparse.ArgumentParser) -> None:
    defaults = Thresholds()
    p.add_argument("--max-folding-fraction", type=float, default=defaults.max_folding_fraction)
    p.add_argument("--min-ncc-after", type=float, default=defaults.min_ncc_after)
    p.add_argument("--min-dice", type=float, default=defaults.min_dice)


def _thresholds(args: argparse.Namespace) -> Thresholds:
    return Thresholds.from_mapping(
        {
            "max_folding_fraction": args.max_folding_fraction,
            "min_ncc_after": args.min_ncc_after,
            "min_dice": args.min_dice,
        }
    )


def report_main(argv: Sequence[str]) -> int:
    """``atlasflow report subject|cohort ...``: write one subject's report or the cohort report."""
    parser = argparse.ArgumentParser(prog="atlasflow report", description=report_main.__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("subject", help="one subject's report (sub-S.html + sub-S_qc.json)")
    p.add_argument("--outdir", required=True, help="the workflow's output folder")
    p.add_argument("--subject", required=True)
    p.add_argument(
        "--sessions", nargs="+", required=True, help="in acquisition order (first = baseline)"
    )
    p.add_argument("--baseline", default=None)
    p.add_argument(
        "--raw",
        nargs="*",
        default=[],
        metavar="SESSION=PATH",
        help="the manifest's T1w per session",
    )
    p.add_argument(
        "--cross-sectional",
        action="store_true",
        help="no longitudinal part even with several sessions",
    )
    p.add_argument("--out", required=True, help="HTML page to write")
    p.add_argument("--qc-json", default=None, help="default: sub-S_qc.json next to the page")
    p.add_argument("--figures-dir", default=None, help="also write the figures here as PNGs")
    _add_thresholds(p)
    p = sub.add_parser("cohort", help="the cohort report (cohort.html)")
    p.add_argument("--outdir", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--subjects", nargs="+", help="subject labels (sessions discovered)")
    group.add_argument(
        "--scans", nargs="+", metavar="SUBJECT:SESSION", help="every scan of the cohort"
    )
    p.add_argument("--iterations", type=int, default=None, help="configured atlas iterations")
    p.add_argument("--out", required=True)
    p.add_argument("--figures-dir", default=None)
    _add_thresholds(p)
    args = parser.parse_args(list(argv))

    if args.kind == "subject":
        raw = {}
        for item in args.raw:
            session, sep, path = item.partition("=")
            if not sep or not path:
                raise AtlasflowError(f"--raw {item!r}: expected SESSION=PATH")
            raw[_clean(session, "ses-")] = path
        summary = write_subject_report(
            args.outdir,
            args.subject,
            args.sessions,
            args.out,
            raw_inputs=raw,
            thresholds=_thresholds(args),
            baseline=args.baseline,
            longitudinal=False if args.cross_sectional else None,
            figures_dir=args.figures_dir,
            qc_json=args.qc_json,
        )
        print(f"sub-{summary['subject']}: {summary['status']}; report {args.out}")
        return 0
    if args.scans:
        sessions: dict[str, list[str]] = {}
        for item in args.scans:
            subject, sep, session = item.partition(":")
            if not sep or not subject or not session:
                raise AtlasflowError(f"--scans {item!r}: expected SUBJECT:SESSION")
            sessions.setdefault(_clean(subject, "sub-"), []).append(_clean(session, "ses-"))
        subjects = list(sessions)
    else:
        subjects, sessions = args.subjects, {}
    verdicts = write_cohort_report(
        args.outdir,
        subjects,
        args.out,
        thresholds=_thresholds(args),
        sessions=sessions,
        iterations=args.iterations,
        figures_dir=args.figures_dir,
    )
    counts = {s: sum(v.status == s for v in verdicts) for s in STATUS_RANK}
    print(f"cohort report {args.out}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0
