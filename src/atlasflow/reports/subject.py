"""A subject's page: verdict banner, QC table, the other contrasts' within-session alignment,
errors and missing outputs, figures per session (each contrast's alignment and, for a follow-up,
its change since baseline among them) and, for a longitudinal subject, the tumour over time; :func:`write_subject_report` writes it with
its QC verdict (``sub-S_qc.json``) and, for Snakemake's ``report()``, its figures as PNGs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from atlasflow.io.atomic import atomic_write_text
from atlasflow.layout import COHORT_PAGE, DEFAULT_REFERENCE, STAGES, session_entity
from atlasflow.layout import subject_qc as subject_qc_name
from atlasflow.registration.qc import NCC_DROP_TOLERANCE, QCThresholds
from atlasflow.reports.checks import STAGE_TITLES, format_metric
from atlasflow.reports.contrasts import alignment_table, contrast_panels
from atlasflow.reports.html import badge, definitions_html, esc, figures_html, page
from atlasflow.reports.inputs import session_name
from atlasflow.reports.panels import Panel, save_figures, subject_panels
from atlasflow.reports.qc import SubjectQC, subject_qc
from atlasflow.reports.viewer import viewer_html


def response_rule() -> str:
    """The volumetric response rule of :mod:`atlasflow.longitudinal.change`, in words."""
    from atlasflow.longitudinal.change import PARTIAL_RESPONSE_PCT, PROGRESSION_PCT
    from atlasflow.longitudinal.compartments import AGREEMENT_MIN_CHANGE_PCT, AGREEMENT_RATIO

    low, high = AGREEMENT_RATIO

    return (
        "Response category (volumetric, after RANO/mRANO, relative to the baseline volume): "
        f"progression at {PROGRESSION_PCT:+g} % or more, partial response at {PARTIAL_RESPONSE_PCT:+g} % "
        "or less, complete response when no tumour is left, stable in between; not evaluable "
        "without masks. Judged on the enhancing compartment where the masks are multi-label and "
        "the baseline has enhancing tumour (RANO 2.0), on the whole mask otherwise. Jacobian / "
        "mask: the registration's volume change of the baseline tumour against the masks' change; "
        f"flagged when their ratio is outside {low:g}-{high:g} (opposite signs included), unless "
        f"both changes are under {AGREEMENT_MIN_CHANGE_PCT:g} %."
    )


def _banner(qc: SubjectQC) -> str:
    heads = {
        "pass": "All QC checks passed.",
        "flag": "Flagged by QC:",
        "failed": "Processing failed:",
        "incomplete": "Outputs missing:",
    }
    items = "".join(f"<li>{esc(r)}</li>" for r in qc.reasons)
    return (
        f'<div class="banner {qc.status}">{badge(qc.status)} <b>{esc(heads[qc.status])}</b>'
        f"{f'<ul>{items}</ul>' if items else ''}</div>"
    )


def qc_table(qc: SubjectQC) -> str:
    """One row per registration; each judged number carries its mark, the header its threshold."""
    limits = QCThresholds(**qc.thresholds)
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
        f'<th>{esc(label)}<br><span class="limit">{esc(limit)}</span></th>'
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
            lead = f"<td>{esc(session_entity(session))}</td><td>{esc(STAGE_TITLES[stage])}</td>"
            missing = [
                c for c in checks.values() if c.status == "missing" and c.metric == "ncc_after"
            ]
            if missing:
                rows.append(
                    f'<tr>{lead}<td colspan="{len(columns)}" class="missing-cell">{badge("missing")} '
                    f"{esc(missing[0].note)}</td><td></td></tr>"
                )
                continue
            cells = []
            for metric, _, _ in columns:
                c = checks.get(metric)
                if c is None:
                    cells.append('<td class="num muted">\u2014</td>')
                elif c.status == "missing":
                    cells.append(
                        f'<td class="num muted" title="{esc(c.note)}">{badge("missing")}</td>'
                    )
                else:
                    mark = {"pass": "\u2714 ", "flag": "\u2716 "}.get(c.status, "")
                    title = f' title="{esc(c.note)}"' if c.note else ""
                    cells.append(
                        f'<td class="num {c.status}"{title}>{mark}{esc(format_metric(metric, c.value))}</td>'
                    )
            rows.append(f'<tr>{lead}{"".join(cells)}<td class="muted">{esc(how)}</td></tr>')
    notes = sorted(
        {c.note for c in qc.checks if c.metric == "dice_mean" and c.note and c.status != "missing"}
    )
    foot = f'<p class="muted">Mean Dice: {esc("; ".join(notes))}.</p>' if notes else ""
    return (
        f'<table class="qc"><tr><th>session</th><th>registration</th>{head}<th>backend, time</th></tr>'
        f"{''.join(rows)}</table>{foot}"
    )


#: Badge of each verdict of the Jacobian-vs-mask volume check.
_CHECK_BADGE = {"agree": "pass", "disagree": "flag"}


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
    ]
    # Compartments of multi-label masks (columns <name>_volume_ml), where the table has values.
    columns += [
        (key, f"{key[: -len('_volume_ml')]} (ml)")
        for key in (rows[0] if rows else {})
        if key.endswith("_volume_ml") and any(r.get(key) is not None for r in rows)
    ]
    columns += [
        ("response", "response"),
        ("jacobian_volume_change_pct", "Jacobian vs baseline (%)"),
        ("jacobian_mask_flag", "Jacobian / mask"),
    ]
    head = "".join(f"<th>{esc(t)}</th>" for _, t in columns)
    body = []
    for r in rows:
        cells = []
        for key, _ in columns:
            value = r.get(key)
            if key == "response":
                on = r.get("response_compartment")
                shown = (value or "").replace("_", " ") + (
                    f" ({on})" if value and on not in (None, "", "whole") else ""
                )
                cells.append(f"<td>{badge(value, shown) if value else ''}</td>")
            elif key == "jacobian_mask_flag":
                ratio = r.get("jacobian_mask_agreement")
                shown = (value or "").replace("_", " ") + (
                    f" (\u00d7{ratio:.2g})" if ratio is not None else ""
                )
                cells.append(
                    f"<td>{badge(_CHECK_BADGE.get(value, 'info'), shown) if value else ''}</td>"
                )
            elif isinstance(value, float):
                shown = f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
                cells.append(f'<td class="num">{esc(shown)}</td>')
            else:
                cells.append(f"<td>{esc('' if value is None else value)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table>{'<tr>' + head + '</tr>'}{''.join(body)}</table>"


def _errors_html(errors: list[dict], missing: list[dict]) -> str:
    parts = []
    if errors:
        rows = "".join(
            f"<tr><td>{esc(session_entity(e['session']))}</td><td>{esc(e['rule'])}</td>"
            f"<td>{esc(e['message'])}</td><td><code>{esc(e['log'])}</code></td></tr>"
            for e in errors
        )
        parts.append(
            f"<h3>Errors logged</h3><table><tr><th>session</th><th>step</th><th>error</th><th>log</th></tr>{rows}</table>"
        )
    if missing:
        rows = "".join(
            f"<tr><td>{esc(session_entity(m['session']))}</td><td><code>{esc(m['file'])}</code></td>"
            f"<td>{esc(m['reason'])}</td><td>{'required' if m['required'] else 'optional'}</td></tr>"
            for m in missing
        )
        parts.append(
            f"<h3>Missing outputs</h3><table><tr><th>session</th><th>file</th><th>reason</th><th></th></tr>{rows}</table>"
        )
    return "".join(parts)


def _anchor(section: str) -> str:
    """The id of a section of the page: the session, ``scan`` for a scan without one."""
    return section or "scan"


def _sessions_line(qc: SubjectQC) -> str:
    if not any(qc.sessions):
        return '<p class="muted">One scan, without a session.</p>'
    return (
        f'<p class="muted">Sessions: {", ".join("ses-" + esc(t) for t in qc.sessions)}'
        + (f"; longitudinal, baseline ses-{esc(qc.baseline)}" if qc.longitudinal else "")
        + "</p>"
    )


def subject_html(qc: SubjectQC, sections: list[tuple[str, list[Panel]]], viewer: str = "") -> str:
    """The page; ``viewer`` is the interactive viewer's section (:mod:`atlasflow.reports.viewer`)."""
    s = qc.subject
    nav = ('<a href="#viewer">viewer</a>' if viewer else "") + "".join(
        f'<a href="#{esc(_anchor(name))}">{esc(session_name(name) if name != "longitudinal" else name)}</a>'
        for name, _ in sections
    )
    body = [
        f'<nav><a href="{COHORT_PAGE}">\u2190 cohort report</a> {nav}</nav>',
        f"<h1>sub-{esc(s)}</h1>",
        _sessions_line(qc),
        _banner(qc),
        "<h2>QC numbers</h2>",
        qc_table(qc)
        if qc.checks
        else '<p class="muted">No QC numbers: the registrations have not produced their QC files.</p>',
        alignment_table(qc),
        _errors_html(qc.errors, qc.missing),
        viewer,
    ]
    for name, panels in sections:
        if name == "longitudinal":
            response = qc.response
            body.append(
                f'<h2 id="longitudinal">Tumour over time {badge(response, response.replace("_", " ")) if response else ""}</h2>'
            )
            body.append(figures_html(panels))
            if qc.tumor:
                body.append(_tumor_table_html(qc.tumor))
            body.append(f'<p class="muted">{esc(response_rule())}</p>')
        else:
            role = (
                " (baseline)"
                if qc.longitudinal and name == qc.baseline
                else (" (follow-up)" if qc.longitudinal else "")
            )
            body.append(f'<h2 id="{esc(_anchor(name))}">{esc(session_name(name))}{role}</h2>')
            body.append(figures_html(panels))
    body.append("<h2>Definitions</h2>" + definitions_html())
    return page(f"atlasflow: sub-{s}", "\n".join(body))


def all_panels(
    outdir: Path, qc: SubjectQC, raw_inputs: Mapping[str, str] | None
) -> list[tuple[str, list[Panel]]]:
    """The T1w's figures by section, each session's contrast alignments after its input figure
    and, for a follow-up, each contrast's change since baseline after the T1w's."""
    sections = subject_panels(outdir, qc, raw_inputs)
    extra = contrast_panels(outdir, qc)
    for name, panels in sections:
        aligned, changes = extra.get(name, ([], []))
        panels[1:1] = aligned
        panels += changes
    return sections


def write_subject_report(
    outdir: str | Path,
    subject: str,
    sessions: Sequence[str],
    out_html: str | Path,
    *,
    raw_inputs: Mapping[str, str] | None = None,
    thresholds: Mapping[str, object] | QCThresholds | None = None,
    baseline: str | None = None,
    longitudinal: bool | None = None,
    figures_dir: str | Path | None = None,
    qc_json: str | Path | None = None,
    with_viewer: bool = True,
    contrasts: Mapping[str, Sequence[str]] | None = None,
    reference: str = DEFAULT_REFERENCE,
) -> dict:
    """Write ``sub-S.html`` and ``sub-S_qc.json`` (default: next to the page); return the QC summary.

    ``sessions`` in acquisition order (the first is the baseline unless ``baseline`` says otherwise);
    ``raw_inputs`` maps session -> the manifest's T1w path. With ``figures_dir`` the figures are also
    written there as PNGs (for Snakemake's ``report()``). ``with_viewer=False`` leaves out the
    interactive viewer (its embedded volumes and script), keeping only the static figures.
    ``contrasts``: session -> its other contrasts (cohort columns); by default those found.
    ``reference``: the session's reference contrast (config ``contrasts.reference``), whose
    images are the scan's own; ``raw_inputs`` are then that contrast's files.
    """
    outdir, out_html = Path(outdir), Path(out_html)
    qc = subject_qc(
        outdir,
        subject,
        sessions,
        thresholds=thresholds,
        baseline=baseline,
        longitudinal=longitudinal,
        contrasts=contrasts,
        reference=reference,
    )
    sections = all_panels(outdir, qc, raw_inputs)
    viewer = ""
    if with_viewer:  # the volumes get what the figures and markup leave of the page budget
        viewer = viewer_html(outdir, qc, other_bytes=len(subject_html(qc, sections)))
    atomic_write_text(out_html, subject_html(qc, sections, viewer))
    summary = qc.to_json()
    summary["report"] = out_html.name
    json_path = Path(qc_json) if qc_json else out_html.with_name(subject_qc_name(qc.subject))
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
    sections = all_panels(Path(outdir), qc, raw_inputs)
    return save_figures([p for _, panels in sections for p in panels], figures_dir)
