"""The QC verdict of a subject (``pass`` / ``flag`` / ``failed`` / ``incomplete``) and of a cohort.

A subject's verdict gathers its registrations' checks (:mod:`atlasflow.reports.checks`), the
checks of its other contrasts' alignment to each session's T1w, the files it misses, the failure records of skipped scans and the ``atlasflow: error:`` line of every job
that failed; its reasons name the file, threshold or error that decided it. The verdict is written
as ``sub-S_qc.json`` next to the subject's page; the cohort page reuses it while no input it read
has changed (:func:`cohort_verdicts`), and recomputes it otherwise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from atlasflow.contrasts.plan import ContrastFiles
from atlasflow.errors import AtlasflowError, describe, failure_record
from atlasflow.layout import (
    CONTRASTS,
    DEFAULT_REFERENCE,
    STAGES,
    CohortFiles,
    Scan,
    job_log,
    scan_id,
)
from atlasflow.layout import subject_qc as subject_qc_name
from atlasflow.registration.qc import QCThresholds
from atlasflow.reports.checks import Check, align_stage, contrast_checks, contrast_of, stage_checks
from atlasflow.reports.inputs import (
    as_number,
    failed_member,
    logged_errors,
    read_tumor_table,
    relative,
    session_prefix,
    strip_prefix,
)

STATUS_RANK = {"failed": 0, "incomplete": 1, "flag": 2, "pass": 3}


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
    # session -> its other contrasts (cohort columns, e.g. "flair"), aligned to its reference
    contrasts: dict[str, list[str]] = field(default_factory=dict)
    # the session's reference contrast (config contrasts.reference): whose files are the scan's own
    reference: str = DEFAULT_REFERENCE
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
        aligned = [
            c
            for c in self.checks
            if contrast_of(c.stage) and c.metric == "nmi_after" and c.value is not None
        ]
        if aligned:
            chosen = min(aligned, key=lambda c: c.value if math.isfinite(c.value) else -math.inf)
            flagged = any(c.status == "flag" for c in self.checks if contrast_of(c.stage))
            out["contrast/nmi_after"] = {
                "value": chosen.value,
                "status": "flag" if flagged else "pass",
                "threshold": chosen.threshold,
                "rule": chosen.rule,
                "key": chosen.key,
                "stage": chosen.stage,
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


def subject_qc(
    outdir: str | Path,
    subject: str,
    sessions: Sequence[str],
    *,
    thresholds: Mapping[str, object] | QCThresholds | None = None,
    baseline: str | None = None,
    longitudinal: bool | None = None,
    contrasts: Mapping[str, Sequence[str]] | None = None,
    reference: str = DEFAULT_REFERENCE,
) -> SubjectQC:
    """QC verdict of one subject from its QC JSONs, tumour table and (when outputs are missing) logs.

    ``sessions`` are in acquisition order; the baseline of a longitudinal subject is ``baseline``,
    else the tumour table's baseline row, else the first session. ``longitudinal`` defaults to
    "more than one session". ``contrasts``: session -> its other contrasts (cohort columns); by
    default those whose alignment left a file or a log (:func:`found_contrasts`). ``reference``:
    the session's reference contrast (the scan's preprocessed and registered images are its).
    """
    outdir = Path(outdir)
    subject = strip_prefix(subject, "sub-")
    sessions = [strip_prefix(t, "ses-") for t in sessions]
    limits = QCThresholds.from_mapping(thresholds)
    files = CohortFiles(outdir, reference)
    longitudinal = len(sessions) > 1 if longitudinal is None else longitudinal
    qc = SubjectQC(subject, sessions, None, longitudinal, asdict(limits), reference=reference)
    if contrasts is None:
        qc.contrasts = {
            t: cs for t in sessions if (cs := found_contrasts(outdir, subject, t, reference))
        }
    else:
        given = {strip_prefix(k, "ses-"): list(v) for k, v in contrasts.items()}
        qc.contrasts = {t: given[t] for t in sessions if given.get(t)}
    found = _Found(outdir)

    if longitudinal:
        _read_tumour(qc, files.tumor_table(subject), found)
        from_table = [r["session"] for r in qc.tumor if r.get("response") == "baseline"]
        qc.baseline = (
            strip_prefix(baseline, "ses-")
            if baseline
            else (from_table[0] if from_table else sessions[0] if sessions else None)
        )
    for session in sessions:
        _check_session(qc, files.scan(subject, session), limits, files, found)
    if qc.missing:  # only then can a job's error explain something
        prefixes = [scan_id(subject, t) for t in sessions] + [f"sub-{subject}"]
        for error in logged_errors(files.logs, prefixes):
            stem = Path(error["log"]).name
            error["session"] = next(
                (t for t in sessions if stem.startswith(scan_id(subject, t))), ""
            )
            qc.errors.append(error)
    # A skipped scan whose log is gone still carries its reason in the failure record.
    logged = {e["session"] for e in qc.errors}
    for session, record in found.skipped.items():
        if session not in logged:
            qc.errors.append(
                {
                    "session": session,
                    "rule": str(record.get("step", "?")),
                    "log": "",
                    "message": str(record.get("reason", "")),
                }
            )
    _decide(qc)
    qc.sources = {relative(p, outdir): p.exists() for p in sorted(set(found.sources))}
    return qc


@dataclass
class _Found:
    """What :func:`subject_qc` met on its way: the files it read, the scans that were skipped."""

    outdir: Path
    sources: list[Path] = field(default_factory=list)
    skipped: dict[str, dict] = field(default_factory=dict)  # session -> failure record

    def miss(self, qc: SubjectQC, session: str, path: Path, reason: str, required: bool) -> None:
        qc.missing.append(
            {
                "session": session,
                "file": relative(path, self.outdir),
                "reason": reason,
                "required": required,
            }
        )


def _read_tumour(qc: SubjectQC, table: Path, found: _Found) -> None:
    found.sources.append(table)
    record = failure_record(table)
    if record is not None:
        found.miss(qc, "", table, f"scan skipped, {describe(record)}", False)
    elif table.exists():
        try:
            qc.tumor = read_tumor_table(table)
        except AtlasflowError as exc:
            found.miss(qc, "", table, str(exc), False)
    else:
        found.miss(qc, "", table, "not found", False)


def _check_session(
    qc: SubjectQC, scan: Scan, limits: QCThresholds, files: CohortFiles, found: _Found
) -> None:
    """The checks of one session's registrations, and what it misses."""
    session = scan.session
    stages = ["template", "atlas"] + (
        ["baseline"] if qc.longitudinal and session != qc.baseline else []
    )
    found.sources.append(scan.preproc)
    record = failure_record(scan.preproc)
    if record is not None:  # under on_scan_error: skip, the record of why this scan failed
        found.skipped[session] = record
    if not scan.preproc.exists() or record is not None:
        reason = f"scan skipped, {describe(record)}" if record else "not found"
        found.miss(qc, session, scan.preproc, reason, True)
    for stage in stages:
        found.sources.append(scan.qc_json(stage))
        if stage == "atlas":
            found.sources += [scan.atlas_dseg, files.atlas_dseg]
        checks, raw, problem = stage_checks(scan, stage, limits, files.atlas_dseg)
        if session not in found.skipped and (record := failure_record(scan.qc_json(stage))):
            found.skipped[session] = record
        qc.checks += checks
        if problem:
            found.miss(qc, session, scan.qc_json(stage), problem, True)
            qc.checks.append(
                Check(session, stage, "ncc_after", None, status="missing", note=problem)
            )
        if raw is not None:
            qc.registration[f"{session}/{stage}"] = {
                "backend": raw.get("backend"),
                "seconds": as_number(raw.get("seconds")),
            }
    if session not in found.skipped:
        for column in qc.contrasts.get(session, []):
            _check_contrast(qc, scan, column, found)
    # A member whose registration to an atlas iteration failed (under on_scan_error: skip)
    # was left out of that average, even if its later steps succeeded.
    for table in files.member_tables():
        failed = failed_member(table, scan_id(scan.subject, session))
        if failed is None:
            continue
        found.sources.append(table)
        record = {"step": f"atlas {table.parent.name}", "reason": failed}
        found.skipped.setdefault(session, record)
        found.miss(qc, session, table, f"left out of the atlas, {describe(record)}", True)


def found_contrasts(
    outdir: Path, subject: str, session: str, reference: str = DEFAULT_REFERENCE
) -> list[str]:
    """The other contrasts of a scan whose alignment left an output or a log (cohort order)."""
    files = ContrastFiles(str(outdir), reference=reference)
    return [
        c
        for c in CONTRASTS
        if c != reference  # the reference's desc-preproc image is the scan's own
        and (
            Path(files.session_qc(c, subject, session)).exists()
            or Path(files.preproc(c, subject, session)).exists()
            or Path(job_log(outdir, f"align_{c}", scan_id(subject, session))).exists()
        )
    ]


def _check_contrast(qc: SubjectQC, scan: Scan, column: str, found: _Found) -> None:
    """The checks of one contrast's alignment to the session's reference, and what it misses."""
    path = Path(
        ContrastFiles(str(scan.outdir), reference=scan.reference).session_qc(
            column, scan.subject, scan.session
        )
    )
    found.sources.append(path)
    checks, raw, problem = contrast_checks(scan, column)
    qc.checks += checks
    stage = align_stage(column)
    if problem:
        found.miss(qc, scan.session, path, problem, True)
        qc.checks.append(
            Check(scan.session, stage, "nmi_after", None, status="missing", note=problem)
        )
    if raw is not None:
        qc.registration[f"{scan.session}/{stage}"] = {
            "backend": raw.get("transform"),
            "seconds": as_number(raw.get("seconds")),
        }


def _decide(qc: SubjectQC) -> None:
    """Status and reasons: an error fails, a missing required output leaves it incomplete."""
    required = [m for m in qc.missing if m["required"]]
    flags = [c for c in qc.checks if c.status == "flag"]
    if qc.errors:
        qc.status = "failed"
    elif required:
        qc.status = "incomplete"
    elif flags:
        qc.status = "flag"
    for error in qc.errors:
        where = session_prefix(error["session"])
        qc.reasons.append(f"{where}{error['rule']} failed: {error['message']}")
    if required and not qc.errors:
        qc.reasons += [
            f"{session_prefix(m['session'], ': ')}{m['file'].split('/')[-1]} {m['reason']} "
            "(no error logged)"
            for m in required
        ]
    qc.reasons += [c.reason() for c in flags]


def _fresh_summary(
    path: Path, outdir: Path, limits: QCThresholds, sessions: Sequence[str] | None
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
    """A subject's sessions from its output folders (``ses-*``, or ``anat`` for a scan without a
    session: "") and the names of its scans' logs."""
    folder = outdir / f"sub-{subject}"
    sessions = {p.name[4:] for p in folder.glob("ses-*") if p.is_dir()}
    if (folder / "anat").is_dir():
        sessions.add("")
    logs = CohortFiles(outdir).logs
    if logs.is_dir():
        stem = scan_id(subject, "*")  # sub-S_ses-*
        for log in logs.rglob(f"{stem}.log"):
            sessions.add(log.name[len(stem) - 1 : -4].split("_")[0])
    return sorted(sessions)


def cohort_verdicts(
    outdir: str | Path,
    subjects: Sequence[str],
    reports_dir: str | Path,
    *,
    thresholds: Mapping[str, object] | QCThresholds | None = None,
    sessions: Mapping[str, Sequence[str]] | None = None,
    reference: str = DEFAULT_REFERENCE,
) -> list[SubjectQC]:
    """Every subject's verdict: its report's QC JSON when fresh, else recomputed from the outputs
    (``reference``: the sessions' reference contrast)."""
    outdir, reports_dir = Path(outdir), Path(reports_dir)
    limits = QCThresholds.from_mapping(thresholds)
    sessions = {strip_prefix(k, "sub-"): list(v) for k, v in (sessions or {}).items()}
    verdicts = []
    for subject in (strip_prefix(s, "sub-") for s in subjects):
        given = [strip_prefix(t, "ses-") for t in sessions.get(subject, [])]
        qc = _fresh_summary(reports_dir / subject_qc_name(subject), outdir, limits, given)
        if qc is None:
            qc = subject_qc(
                outdir,
                subject,
                given or _discover_sessions(outdir, subject),
                thresholds=limits,
                reference=reference,
            )
            qc.recomputed = True
            if not qc.sessions:
                qc.status = "failed" if qc.errors else "incomplete"
                qc.reasons = qc.reasons or [
                    f"no outputs and no logs found for sub-{subject} under {outdir}"
                ]
        verdicts.append(qc)
    return verdicts
