"""The cohort page: every subject's verdict in one sortable table linking the subject pages, the
failed subjects with the error each job logged, the cohort's inputs that were skipped, the atlas at
every iteration with its convergence and the atlas of every other contrast, and the
tumour-frequency map; :func:`write_cohort_report`
writes it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from atlasflow.io.atomic import atomic_write_text
from atlasflow.layout import (
    DEFAULT_REFERENCE,
    STAGES,
    CohortFiles,
    session_entity,
    skipped_inputs,
    subject_page,
)
from atlasflow.registration.qc import QCThresholds
from atlasflow.reports.checks import contrast_of, format_metric
from atlasflow.reports.contrasts import atlas_contrast_panel
from atlasflow.reports.html import badge, definitions_html, esc, figures_html, page
from atlasflow.reports.inputs import cohort_errors, read_metrics, read_skipped_inputs
from atlasflow.reports.panels import Panel, cohort_panels, save_figures
from atlasflow.reports.qc import STATUS_RANK, SubjectQC, cohort_verdicts

RULE_TEXT = {">=": "\u2265", "<=": "\u2264"}


def _metrics_table(path: Path) -> str:
    rows = read_metrics(path)
    if not rows:
        return ""
    keys = list(rows[0])
    head = "".join(f"<th>{esc(k).replace('_', '_<wbr>')}</th>" for k in keys)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{esc("" if r[k] is None else f"{r[k]:.4g}")}</td>' for k in keys
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(summary: dict, key: str, metric: str) -> str:
    item = summary.get(key)
    if not item:
        return '<td class="num" data-sort="">\u2014</td>'
    value = item["value"]
    shown = format_metric(metric, value)
    title = f"{RULE_TEXT.get(item['rule'], '')} {format_metric(metric, item['threshold'])} ({item['key']})"
    mark = "\u2716 " if item["status"] == "flag" else ""
    return (
        f'<td class="num {item["status"]}" data-sort="{esc(value)}" title="threshold {esc(title)}">'
        f"{mark}{esc(shown)}</td>"
    )


def _summary_html(ordered: list[SubjectQC], reports_dir: Path) -> str:
    """Counts per status, then the subjects that need attention with their reasons."""
    counts = {s: sum(q.status == s for q in ordered) for s in STATUS_RANK}
    attention = [q for q in ordered if q.status != "pass"]
    parts = [
        f"<p>{len(ordered)} subjects: "
        + " ".join(
            badge(s, f"{counts[s]} {s}")
            for s in ("pass", "flag", "failed", "incomplete")
            if counts[s] or s == "pass"
        )
        + "</p>"
    ]
    if not attention:
        return (
            parts[0]
            + "\n"
            + (
                '<div class="banner pass">'
                + badge("pass")
                + " <b>All subjects passed QC.</b></div>"
            )
        )
    items = []
    for q in attention:
        name = subject_page(q.subject)
        link = (
            f'<a href="{esc(name)}">sub-{esc(q.subject)}</a>'
            if (reports_dir / name).exists()
            else f"sub-{esc(q.subject)}"
        )
        reasons = "; ".join(q.reasons) or q.status
        items.append(f"<li>{badge(q.status)} <b>{link}</b>: {esc(reasons)}</li>")
    parts.append(
        f'<div class="banner flag"><b>Needs attention ({len(attention)} of {len(ordered)}):</b><ul>{"".join(items)}</ul></div>'
    )
    return "\n".join(parts)


SUBJECT_COLUMNS = [
    "subject",
    "sessions",
    "QC",
    "reasons",
    "NCC to template",
    "NCC to atlas",
    "NCC to baseline",
    "folding (max)",
    "Dice to atlas",
    "contrast NMI (min)",
    "tumour response",
    "report",
]


def _subject_row(q: SubjectQC, reports_dir: Path) -> str:
    """One subject's row: verdict, reasons, worst numbers, tumour response, link to its page."""
    summary = q.summary()
    folding = [v for k, v in summary.items() if k.endswith("/folding_fraction")]
    fold_item = max(folding, key=lambda v: v["value"], default=None)
    if fold_item and any(v["status"] == "flag" for v in folding):
        fold_item = {**fold_item, "status": "flag"}
    name = subject_page(q.subject)
    if not (reports_dir / name).exists():
        link = '<span class="muted">none</span>'
    elif q.recomputed:
        # The page predates the outputs it describes (a rerun failed before reaching it).
        link = (
            f'<a href="{esc(name)}" title="written before the current outputs; '
            'the verdict here is recomputed">older page</a>'
        )
    else:
        link = (
            f'<a href="{esc(name)}">open</a> \u00b7 '
            f'<a href="{esc(name)}#{esc(viewer_anchor(q))}" title="open the interactive viewer'
            f'{" at the flagged registration" if q.status == "flag" else ""}">viewer</a>'
        )
    response = q.response
    return (
        f'<tr class="{q.status}"><td>sub-{esc(q.subject)}</td><td class="num">{len(q.sessions)}</td>'
        f'<td data-sort="{STATUS_RANK[q.status]}">{badge(q.status)}</td>'
        f'<td class="reasons">{"<br>".join(esc(r) for r in q.reasons)}</td>'
        + _cell(summary, "template/ncc_after", "ncc_after")
        + _cell(summary, "atlas/ncc_after", "ncc_after")
        + _cell(summary, "baseline/ncc_after", "ncc_after")
        + _cell({"f": fold_item} if fold_item else {}, "f", "folding_fraction")
        + _cell(summary, "atlas/dice_mean", "dice_mean")
        + _cell(summary, "contrast/nmi_after", "nmi_after")
        + f"<td>{badge(response, response.replace('_', ' ')) if response else ''}</td><td>{link}</td></tr>"
    )


def viewer_anchor(q: SubjectQC) -> str:
    """The subject page's anchor for its viewer: the first flagged registration's scene, at the
    most compressed voxel when folding flagged it (see :mod:`atlasflow.reports.viewer`)."""
    for c in q.checks:
        if c.status == "flag" and c.stage in STAGES:
            mark = "&mark=min-jacobian" if c.metric == "folding_fraction" else ""
            return f"view={c.session}/{c.stage}{mark}"
    for c in q.checks:  # a contrast's alignment: the session's scene flickers T1w and contrast
        if c.status == "flag" and contrast_of(c.stage):
            return f"view={c.session}/native"
    return "viewer"


def _failed_html(ordered: list[SubjectQC]) -> str:
    """Failed and incomplete subjects: the error each job logged, else the reasons."""
    failed = [q for q in ordered if q.status in ("failed", "incomplete")]
    if not failed:
        return '<p class="muted">None: every subject has all its outputs.</p>'
    rows = []
    for q in failed:
        if q.errors:
            for e in q.errors:
                rows.append(
                    f"<tr><td>sub-{esc(q.subject)}</td><td>{esc(session_entity(e['session']))}</td>"
                    f"<td>{esc(e['rule'])}</td><td>{esc(e['message'])}</td><td><code>{esc(e['log'])}</code></td></tr>"
                )
        else:
            for reason in q.reasons:
                rows.append(
                    f"<tr><td>sub-{esc(q.subject)}</td><td></td><td>{badge(q.status)}</td><td>{esc(reason)}</td><td></td></tr>"
                )
    return (
        "<table><tr><th>subject</th><th>session</th><th>step</th><th>reason</th><th>log</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _cohort_errors_html(outdir: Path) -> str:
    errors = cohort_errors(outdir)
    if not errors:
        return ""
    return (
        "<h3>Cohort-wide errors logged</h3><table><tr><th>log</th><th>error</th></tr>"
        + "".join(
            f"<tr><td><code>{esc(e['log'])}</code></td><td>{esc(e['message'])}</td></tr>"
            for e in errors
        )
        + "</table>"
    )


#: Skipped inputs listed in the cohort report; the rest are counted (all are in the TSV).
MAX_SKIPPED_ROWS = 200


def _skipped_html(outdir: Path) -> str:
    """ "Inputs skipped": what the cohort's folder held that looked like an input but was not used
    (``provenance/skipped_inputs.tsv``); empty when nothing was."""
    path = Path(skipped_inputs(outdir))
    rows = read_skipped_inputs(path)
    if not rows:
        return ""
    shown = "".join(
        f"<tr><td><code>{esc(r['path'])}</code></td><td>{esc(r['status'])}</td>"
        f"<td>{esc(r['reason'])}</td></tr>"
        for r in rows[:MAX_SKIPPED_ROWS]
    )
    more = len(rows) - MAX_SKIPPED_ROWS
    tail = (
        f'<p class="muted">... and {more} more in <code>{esc(path)}</code>.</p>' if more > 0 else ""
    )
    return (
        f'<h2 id="skipped">Inputs skipped ({len(rows)})</h2><p class="muted">Files and folders of '
        "the cohort that look like inputs but were not used, or were passed over for another file "
        "of the same session (README, BIDS folders).</p>"
        "<table><tr><th>path</th><th>status</th><th>reason</th></tr>" + shown + "</table>" + tail
    )


def cohort_html(
    verdicts: list[SubjectQC],
    panels: list[Panel],
    outdir: Path,
    reports_dir: Path,
    limits: QCThresholds,
) -> str:
    ordered = sorted(verdicts, key=lambda q: (STATUS_RANK[q.status], q.subject))
    files = CohortFiles(outdir)
    by_name = {p.name: p for p in panels}
    body = [
        "<h1>atlasflow cohort report</h1>",
        '<nav><a href="#subjects">subjects</a><a href="#failed">failed</a><a href="#atlas">atlas</a>'
        '<a href="#tumour">tumour frequency</a><a href="#definitions">definitions</a></nav>',
        _summary_html(ordered, reports_dir),
        '<h2 id="subjects">Subjects</h2><p class="muted">Click a column header to sort. '
        "Numbers are the worst over the subject's sessions; \u2716 marks a value outside its threshold "
        "(hover for the threshold).</p>",
        '<table class="sortable" id="subject-table"><thead><tr>'
        + "".join(f"<th>{esc(h)}</th>" for h in SUBJECT_COLUMNS)
        + f"</tr></thead><tbody>{''.join(_subject_row(q, reports_dir) for q in ordered)}</tbody></table>",
        '<h2 id="failed">Failed subjects</h2>',
        _failed_html(ordered),
        _skipped_html(outdir),
        '<h2 id="atlas">Atlas</h2>',
        figures_html([by_name["atlas_iterations"], by_name["atlas_convergence"]]),
        _metrics_table(files.metrics),
    ]
    if "atlas_contrasts" in by_name:
        body.append(figures_html([by_name["atlas_contrasts"]]))
    if not files.atlas.exists():
        errors = _cohort_errors_html(outdir)
        if errors:
            body.append(errors)
    body += [
        '<h2 id="tumour">Tumour frequency</h2>',
        figures_html([by_name["tumor_frequency"]]),
        '<h2 id="definitions">Thresholds and definitions</h2>'
        f"<p>A subject is flagged when any registration has folding fraction &gt; "
        f"{esc(format_metric('folding_fraction', limits.max_folding_fraction))} (qc.max_folding_fraction), "
        f"NCC after &lt; {limits.min_ncc_after:.3f} (qc.min_ncc_after) or mean Dice &lt; {limits.min_dice:.3f} "
        "(qc.min_dice), or when another contrast's alignment to its session's T1w reaches a "
        "mutual information under contrasts.min_nmi or moved further than contrasts.max_shift_mm. "
        "It has failed when a required output is missing and a job logged an error; "
        "incomplete when an output is missing without a logged error.</p>" + definitions_html(),
    ]
    return page("atlasflow: cohort report", "\n".join(body))


def write_cohort_report(
    outdir: str | Path,
    subjects: Sequence[str],
    out_html: str | Path,
    *,
    thresholds: Mapping[str, object] | QCThresholds | None = None,
    sessions: Mapping[str, Sequence[str]] | None = None,
    iterations: int | None = None,
    figures_dir: str | Path | None = None,
    reference: str = DEFAULT_REFERENCE,
) -> list[SubjectQC]:
    """Write ``cohort.html``: verdict table linking the subject pages, failed list, atlas, tumour map.

    Subject pages and their ``sub-S_qc.json`` are looked up next to ``out_html``. ``sessions``
    (subject -> sessions) and ``iterations`` (the configured atlas iterations) let the page name
    what is missing; without them they are discovered from the files. ``reference``: the
    sessions' reference contrast (that of the atlas). Returns the verdicts.
    """
    outdir, out_html = Path(outdir), Path(out_html)
    limits = QCThresholds.from_mapping(thresholds)
    verdicts = cohort_verdicts(
        outdir, subjects, out_html.parent, thresholds=limits, sessions=sessions, reference=reference
    )
    panels = cohort_panels(outdir, iterations, reference)
    contrasts = atlas_contrast_panel(outdir, reference)
    if contrasts is not None:
        panels.append(contrasts)
    atomic_write_text(out_html, cohort_html(verdicts, panels, outdir, out_html.parent, limits))
    if figures_dir is not None:
        save_figures(panels, figures_dir)
    return verdicts
