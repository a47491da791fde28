"""The markup both pages share: the page shell with its style sheet and table-sorting script
(package data under ``assets/``, inlined so a page opens offline and can be mailed as one file),
status badges, embedded figures and their placeholders, and the definitions of the QC numbers."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from functools import cache
from importlib.resources import files

from atlasflow.reports.panels import Panel

MARK = {
    "pass": "\u2714 pass",
    "flag": "\u2716 flag",
    "failed": "\u2716 FAILED",
    "incomplete": "\u25cc incomplete",
    "info": "info",
    "missing": "\u2014 missing",
}

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
    (
        "NMI",
        "normalised mutual information, (H(A) + H(B)) / H(A, B), of a contrast and its session's "
        "reference scan (the T1w unless the run anchored the sessions by another) inside the "
        "reference's brain mask: 1 for unrelated images, higher the better the intensities of "
        "one predict the other's whatever the contrast (a correlation would not).",
    ),
]


@cache
def asset(name: str) -> str:
    """The text of ``atlasflow/reports/assets/<name>`` (read once)."""
    return files("atlasflow.reports").joinpath("assets").joinpath(name).read_text(encoding="utf-8")


def esc(text: object) -> str:
    """Text for HTML, quotes escaped too (it goes into attributes)."""
    return html.escape(str(text), quote=True)


def badge(status: str, text: str | None = None) -> str:
    return f'<span class="badge {esc(status)}">{esc(text if text is not None else MARK.get(status, status))}</span>'


def page(title: str, body: str) -> str:
    """A whole self-contained HTML page."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>\n{asset('report.css')}</style>\n</head>\n<body>\n"
        f"<main>\n{body}\n</main>\n<script>\n{asset('sort.js')}</script>\n</body>\n</html>\n"
    )


def png_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def figure_html(panel: Panel) -> str:
    if panel.png is None:
        return (
            f'<figure class="missing"><div class="missing-figure" data-missing="{esc(panel.name)}">'
            f"<b>missing: {esc(panel.title)}</b><br>{esc(panel.reason or 'no input')}</div>"
            f"<figcaption><b>{esc(panel.title)}.</b> {esc(panel.caption)}</figcaption></figure>"
        )
    notes = "".join(f'<div class="note">missing: {esc(n)}</div>' for n in panel.notes)
    return (
        f"<figure>{png_tag(panel.png, panel.title)}<figcaption><b>{esc(panel.title)}.</b> "
        f"{esc(panel.caption)}{notes}</figcaption></figure>"
    )


def figures_html(panels: Sequence[Panel]) -> str:
    return '<div class="figures">' + "".join(figure_html(p) for p in panels) + "</div>"


def definitions_html() -> str:
    """The definitions of the QC numbers, as a definition list."""
    return (
        '<dl class="defs">'
        + "".join(f"<dt>{esc(t)}</dt><dd>{esc(d)}</dd>" for t, d in DEFINITIONS)
        + "</dl>"
    )
