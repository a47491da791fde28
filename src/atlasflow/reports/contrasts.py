"""What the pages show of a session's other contrasts (T2w, FLAIR, post-contrast T1w, PDw).

The workflow aligns each contrast to its session's T1w (:mod:`atlasflow.contrasts`) and carries
it into every space; this module turns those outputs into figures and a table:

- per session and contrast, an alignment figure: the contrast on the T1w grid at the scanner's
  alignment and after alignment, with the T1w's outlines in red, and a checkerboard of the two;
- per follow-up and contrast, its difference to the baseline's (in baseline space) over the
  baseline's image of that contrast, with the tumour outlines, as the T1w's change figure;
- the within-session alignment table (NMI at the scanner's alignment and after, shift, rotation,
  each judged number with its mark);
- on the cohort page, each per-contrast atlas beside the T1w atlas.

Files are named by :class:`atlasflow.contrasts.plan.ContrastFiles`; a missing one becomes the
figure's placeholder with its reason (:mod:`atlasflow.reports.panels`).
"""

from __future__ import annotations

from pathlib import Path

import atlasflow.reports.figures as fg
from atlasflow.contrasts.plan import ContrastFiles
from atlasflow.layout import (
    CONTRASTS,
    DEFAULT_REFERENCE,
    CohortFiles,
    Scan,
    atlas_contrast,
    scan_id,
    session_entity,
)
from atlasflow.reports.checks import align_stage, contrast_label, format_metric
from atlasflow.reports.html import badge, esc
from atlasflow.reports.montage import Volume
from atlasflow.reports.panels import Missing, Panel, _Inputs, _on_grid, _render
from atlasflow.reports.qc import SubjectQC

# ------------------------------------------------------------------------------ subject


def alignment_caption(qc: SubjectQC, session: str, column: str) -> str:
    """The figure caption's numbers: NMI before and after, shift and rotation (where known)."""
    checks = {
        c.metric: c for c in qc.checks if c.session == session and c.stage == align_stage(column)
    }
    parts = []
    before, after = checks.get("nmi_scanner"), checks.get("nmi_after")
    if after is not None and after.value is not None:
        start = f"{format_metric('nmi_scanner', before.value)} \u2192 " if before else ""
        parts.append(f"NMI {start}{format_metric('nmi_after', after.value)}")
    for metric in ("shift_mm", "rotation_deg"):
        c = checks.get(metric)
        if c is not None and c.value is not None:
            parts.append(f"{c.label} {format_metric(metric, c.value)}")
    return f" ({', '.join(parts)})" if parts else ""


def contrast_panels(outdir: Path, qc: SubjectQC) -> dict[str, tuple[list[Panel], list[Panel]]]:
    """Per session: (alignment figures, change figures) of its other contrasts."""
    from atlasflow.transforms import Transform, apply_transform

    inputs = _Inputs(outdir)
    files = ContrastFiles(str(outdir), reference=qc.reference)
    ref = contrast_label(qc.reference)
    s = qc.subject
    out: dict[str, tuple[list[Panel], list[Panel]]] = {}
    for session in qc.sessions:
        columns = qc.contrasts.get(session, [])
        scan = Scan(outdir, s, session, qc.reference)
        stem = scan_id(s, session)
        aligned, changes = [], []
        for c in columns:
            name = contrast_label(c)

            def build_alignment(notes: list[str], c=c, name=name, scan=scan) -> bytes:
                t1w_image = inputs.image(scan.preproc, f"preprocessed {ref}")
                t1w = Volume.from_image(t1w_image)
                scanner = None
                try:
                    native = inputs.image(
                        Path(files.native(c, s, scan.session)), f"{name} (own grid)"
                    )
                    scanner = Volume.from_image(
                        apply_transform(native, Transform.identity(), t1w_image.grid)
                    )
                except Missing as exc:
                    notes.append(str(exc))
                after = _on_grid(
                    inputs.maybe(Path(files.preproc(c, s, scan.session)), f"{name} aligned", notes),
                    t1w,
                    f"{name} aligned",
                    notes,
                )
                if scanner is None and after is None:
                    raise Missing("; ".join(notes))
                rows = [(f"{name} at scanner alignment", scanner), (f"{name} aligned", after)]
                return fg.contrast_alignment(t1w, rows, after, name, ref)

            aligned.append(
                _render(
                    Panel(
                        f"{stem}_{c}",
                        f"{name} aligned to the {ref}{alignment_caption(qc, session, c)}",
                        f"Red lines: edges of the session's preprocessed {ref}. Top: the {name} placed on "
                        f"the {ref} grid as the scanner left it; middle: after the within-session "
                        f"alignment (mutual information); bottom: squares of {ref} and {name} "
                        "alternating, where misalignment breaks the boundaries at the squares' edges.",
                    ),
                    build_alignment,
                )
            )
            followup = qc.longitudinal and session != qc.baseline
            if not (followup and c in qc.contrasts.get(qc.baseline or "", [])):
                continue
            base = Scan(outdir, s, qc.baseline, qc.reference)

            def build_change(notes: list[str], c=c, name=name, scan=scan, base=base) -> bytes:
                background = inputs.volume(
                    Path(files.preproc(c, s, base.session)), f"baseline {name}"
                )
                difference = _on_grid(
                    inputs.maybe(
                        Path(files.difference(c, "baseline", s, scan.session)),
                        f"{name} difference",
                        notes,
                    ),
                    background,
                    f"{name} difference",
                    notes,
                )
                if difference is None:
                    raise Missing("; ".join(notes))
                outlines = [
                    _on_grid(inputs.maybe(path, what, [], labels=True), background, "", [])
                    for path, what in (
                        (base.tumor_mask, "baseline tumour mask"),
                        (scan.tumor_in_baseline, "follow-up tumour mask"),
                    )
                ]
                return fg.change_maps(
                    background,
                    [(f"{name} difference", difference, "a.u.", True)],
                    *(None if m is None else m.data > 0 for m in outlines),
                )

            changes.append(
                _render(
                    Panel(
                        f"{stem}_{c}_change",
                        f"{name} change since baseline ({session_entity(qc.baseline or '')})",
                        f"On the baseline's {name}: the follow-up's {name} in baseline space minus the "
                        f"baseline's (red = brighter now, blue = darker), after the {ref}'s registration "
                        "to the baseline composed with both sessions' alignments. Outlines: baseline "
                        "tumour cyan, follow-up tumour yellow.",
                    ),
                    build_change,
                )
            )
        if columns:
            out[session] = (aligned, changes)
    return out


def alignment_table(qc: SubjectQC) -> str:
    """One row per session and contrast: NMI at the scanner's alignment and after, shift,
    rotation, transform and time, verdict; empty when the subject has no other contrast."""
    rows, heads = [], {"nmi_after": "", "shift_mm": ""}
    for session in qc.sessions:
        for column in qc.contrasts.get(session, []):
            stage = align_stage(column)
            checks = {c.metric: c for c in qc.checks if c.session == session and c.stage == stage}
            lead = f"<td>{esc(session_entity(session))}</td><td>{esc(contrast_label(column))}</td>"
            missing = [c for c in checks.values() if c.status == "missing"]
            if missing:
                rows.append(
                    f'<tr>{lead}<td colspan="5" class="missing-cell">{badge("missing")} '
                    f"{esc(missing[0].note)}</td><td></td></tr>"
                )
                continue
            cells = []
            for metric in ("nmi_scanner", "nmi_after", "shift_mm", "rotation_deg"):
                c = checks.get(metric)
                if c is None or c.value is None:
                    cells.append('<td class="num muted">\u2014</td>')
                    continue
                if c.threshold is not None and metric in heads and not heads[metric]:
                    rule = "\u2265" if c.rule == ">=" else "\u2264"
                    heads[metric] = f"{rule} {format_metric(metric, c.threshold)} ({c.key})"
                mark = {"pass": "\u2714 ", "flag": "\u2716 "}.get(c.status, "")
                cells.append(
                    f'<td class="num {c.status}">{mark}{esc(format_metric(metric, c.value))}</td>'
                )
            reg = qc.registration.get(f"{session}/{stage}", {})
            how = (
                f"{reg.get('backend') or ''}, {reg['seconds']:.1f} s"
                if reg.get("seconds") is not None
                else ""
            )
            cells.append(f'<td class="muted">{esc(how)}</td>')
            flagged = [c for c in checks.values() if c.status == "flag"]
            verdict = badge("flag") if flagged else badge("pass")
            title = f' title="{esc("; ".join(c.reason() for c in flagged))}"' if flagged else ""
            rows.append(f"<tr>{lead}{''.join(cells)}<td{title}>{verdict}</td></tr>")
    if not rows:
        return ""
    columns = [
        ("NMI at scanner alignment", "information"),
        ("NMI after", heads["nmi_after"]),
        ("shift from scanner", heads["shift_mm"]),
        ("rotation", "information"),
    ]
    head = "".join(
        f'<th>{esc(label)}<br><span class="limit">{esc(limit)}</span></th>'
        for label, limit in columns
    )
    ref = esc(contrast_label(qc.reference))
    return (
        '<h3 id="contrast-alignment">Within-session alignment of the other contrasts</h3>'
        f'<p class="muted">Each contrast aligned to its session\'s {ref} by normalised mutual '
        f"information (NMI, on the 2 mm grid in the {ref}'s brain: about 1.07 for the same head, "
        "lower for another). Shift: mean displacement over the brain from where the scanner put "
        "the scan.</p>"
        f'<table class="qc"><tr><th>session</th><th>contrast</th>{head}'
        f"<th>transform, time</th><th>QC</th></tr>{''.join(rows)}</table>"
    )


# ------------------------------------------------------------------------------- cohort


def atlas_contrast_panel(outdir: Path, reference: str = DEFAULT_REFERENCE) -> Panel | None:
    """The atlas (of the reference contrast) beside every per-contrast atlas the run made (None
    when it made none)."""
    found = [
        (contrast_label(c), Path(atlas_contrast(outdir, c)))
        for c in CONTRASTS
        if c != reference and Path(atlas_contrast(outdir, c)).exists()
    ]
    if not found:
        return None
    inputs = _Inputs(outdir)
    atlas = CohortFiles(outdir, reference).atlas
    name = contrast_label(reference)

    def build(notes: list[str]) -> bytes:
        rows = [(name, inputs.maybe(atlas, f"{name} atlas", notes), None)]
        rows += [(name, inputs.maybe(path, f"{name} atlas", notes), None) for name, path in found]
        if all(volume is None for _, volume, _ in rows):
            raise Missing("; ".join(notes))
        return fg.anatomy_rows(rows, same_slices=True)

    names = ", ".join(name for name, _ in found)
    return _render(
        Panel(
            "atlas_contrasts",
            "Atlas of every contrast",
            f"The T1w atlas and the {names} atlas: each member's contrast carried into atlas space "
            "through its T1w's deformation and its within-session alignment (one interpolation), "
            "then averaged. Sharp, aligned boundaries in every row mean the contrasts agree.",
        ),
        build,
    )
