"""Report figures: the named PNGs of the pages, from volumes (or tables) to PNG bytes.

Each function here draws one kind of figure with the toolkit of :mod:`atlasflow.reports.montage`:
anatomy rows, registration overlays (edges of the fixed image on the moving one), Jacobian maps,
longitudinal change maps, atlas iterations, tumour frequency, and the two line plots (tumour
volume over time, atlas convergence), which use matplotlib's object API on the Agg canvas. Every
function is pure: arrays in, PNG bytes out, no timestamps, so the same input gives the same bytes.
:mod:`atlasflow.reports.panels` decides which files feed which figure.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from atlasflow.layout import session_entity
from atlasflow.reports.montage import (
    SMALL_FONT,
    VIEWS,
    Cell,
    Volume,
    blend,
    boundary,
    centre_of,
    colorbar,
    compose,
    encode_png,
    foreground_centre,
    grey_rgb,
    load_font,
    paint,
    panel_scale,
    resample,
    view_sizes,
    window,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Fixed colours so the same thing looks the same in every figure.
EDGE_COLOUR = (255, 77, 77)
MASK_COLOUR = (53, 196, 255)
BASELINE_TUMOR_COLOUR = (53, 196, 255)
FOLLOWUP_TUMOR_COLOUR = (255, 214, 10)
FOLDING_COLOUR = (57, 255, 20)
RESPONSE_COLOURS = {
    "baseline": "#444444",
    "stable": "#6e7781",
    "progression": "#cf222e",
    "partial_response": "#0969da",
    "complete_response": "#1a7f37",
    "not_evaluable": "#bf8700",
}
# The side of the subject at the right edge of each view.
ORIENTATION_MARK = {"sagittal": "A", "coronal": "R", "axial": "R"}


def anatomy_rows(
    rows: Sequence[tuple[str, Volume | None, np.ndarray | None]], same_slices: bool = False
) -> bytes:
    """Rows of three orthogonal views: (label, image, optional mask drawn as an outline).

    Each row has its own grid and scale (a raw scan and its preprocessed version differ); a row
    whose volume is None is drawn as panels saying 'missing'. ``same_slices``: rows on the first
    row's grid are cut through the same voxel (images of one space, such as atlases).
    """
    grid, sizes = [], []
    reference = next((v for _, v, _ in rows if v is not None), None)
    shared = foreground_centre(reference) if same_slices and reference is not None else None
    for label, volume, mask in rows:
        if volume is None:
            grid.append([Cell(None, label if c == 0 else "") for c in range(3)])
            sizes.append(
                view_sizes(reference, panel_scale(reference))
                if reference is not None
                else [(120, 120)] * 3
            )
            continue
        scale = panel_scale(volume)
        lo, hi = window(volume.data)
        same = shared is not None and volume.same_grid(reference)
        centre = shared if same else foreground_centre(volume)
        cells = []
        for view in VIEWS:
            plane, pixel = volume.slice(view, centre)
            rgb = grey_rgb(resample(plane, pixel, scale, True), lo, hi)
            if mask is not None:
                mplane, _ = Volume(mask.astype(np.float32), volume.spacing).slice(view, centre)
                rgb = paint(rgb, boundary(resample(mplane, pixel, scale, True) >= 0.5), MASK_COLOUR)
            cells.append(Cell(rgb, corner=ORIENTATION_MARK[view]))
        cells[0].label = label
        grid.append(cells)
        sizes.append([c.rgb.shape[:2] for c in cells])
    return compose(grid, sizes=sizes)


def edge_levels(fixed: np.ndarray) -> list[float]:
    """Two intensity levels of the fixed image whose outlines trace tissue boundaries."""
    lo, hi = window(fixed)
    values = fixed[fixed > lo + 0.1 * (hi - lo)]  # the head, not background noise
    if values.size < 10:
        return []
    return sorted({float(v) for v in np.percentile(values, [30, 75])})


def _fixed_edges(fixed: Volume, scale: float, centre: Sequence[int]) -> list[np.ndarray]:
    """The fixed image's tissue outlines in each view, at the panel's pixel size."""
    levels = edge_levels(fixed.data)
    edges = []
    for view in VIEWS:
        fplane, pixel = fixed.slice(view, centre)
        up = resample(fplane, pixel, scale, True)
        edge = np.zeros(up.shape, bool)
        for level in levels:
            edge |= boundary(up > level)
        edges.append(edge)
    return edges


def _edge_row(
    label: str, moving: Volume | None, edges: list[np.ndarray], scale: float, centre: Sequence[int]
) -> list[Cell]:
    """One row: ``moving`` in three views with the fixed image's outlines in red."""
    if moving is None:
        return [Cell(None, label if c == 0 else "") for c in range(3)]
    lo, hi = window(moving.data)
    cells = []
    for view, edge in zip(VIEWS, edges, strict=True):
        plane, pixel = moving.slice(view, centre)
        rgb = paint(grey_rgb(resample(plane, pixel, scale, True), lo, hi), edge, EDGE_COLOUR)
        cells.append(Cell(rgb, corner=ORIENTATION_MARK[view]))
    cells[0].label = label
    return cells


def registration_overlay(fixed: Volume, rows: Sequence[tuple[str, Volume | None]]) -> bytes:
    """Moving images on the fixed grid (before / after) with the fixed image's edges in red.

    Every row is a volume on the fixed grid sliced at the same voxel, so alignment shows as the red
    edges of the fixed image lying on the moving image's own boundaries.
    """
    scale = panel_scale(fixed)
    centre = foreground_centre(fixed)
    edges = _fixed_edges(fixed, scale, centre)
    grid = [_edge_row(label, moving, edges, scale, centre) for label, moving in rows]
    return compose(grid, sizes=[view_sizes(fixed, scale)] * len(rows))


CHECKER_TILES = 8  # squares along the longest side of a view


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = CHECKER_TILES) -> np.ndarray:
    """Alternating squares of two RGB images of the same size (``a`` in the top-left square)."""
    side = max(1, max(a.shape[:2]) // tiles)
    rows, cols = np.indices(a.shape[:2]) // side
    return np.where(((rows + cols) % 2 == 0)[..., None], a, b)


def contrast_alignment(
    reference: Volume,
    rows: Sequence[tuple[str, Volume | None]],
    aligned: Volume | None,
    name: str,
    reference_name: str = "T1w",
) -> bytes:
    """A contrast against its session's T1w (``reference``, called ``reference_name``): each row the contrast on the T1w
    grid with the T1w's outlines in red (at the scanner's alignment, after alignment), then a
    checkerboard of the T1w and the aligned contrast (``name``), where a misalignment breaks
    every boundary at the squares' edges."""
    scale = panel_scale(reference)
    centre = foreground_centre(reference)
    edges = _fixed_edges(reference, scale, centre)
    grid = [_edge_row(label, moving, edges, scale, centre) for label, moving in rows]
    if aligned is not None:
        lo, hi = window(reference.data)
        clo, chi = window(aligned.data)
        cells = []
        for view in VIEWS:
            plane, pixel = reference.slice(view, centre)
            t1 = grey_rgb(resample(plane, pixel, scale, True), lo, hi)
            plane, pixel = aligned.slice(view, centre)
            other = grey_rgb(resample(plane, pixel, scale, True), clo, chi)
            cells.append(Cell(checkerboard(t1, other), corner=ORIENTATION_MARK[view]))
        cells[0].label = f"checkerboard {reference_name} / {name}"
        grid.append(cells)
    return compose(grid, sizes=[view_sizes(reference, scale)] * len(grid))


JACOBIAN_LIMIT = float(np.log(3.0))  # colour scale saturates at 3x expansion / contraction


def jacobian_rows(
    rows: Sequence[tuple[str, Volume | None, Volume | None, Sequence[int] | None]],
) -> bytes:
    """Jacobian determinant maps (log scale, red = expansion, blue = contraction) over the fixed image.

    Each row is (label, determinant on the fixed grid, fixed image, voxel the views go through or
    None for the head's centre). The determinant only needs values on the three view planes (NaN
    elsewhere is fine). Voxels where it is <= 0 (folding) are painted bright green; outside the
    fixed image's head the map is not drawn.
    """
    grid, sizes = [], []
    reference = next((r[1] for r in rows if r[1] is not None), None)
    for label, det, background, centre in rows:
        if det is None:
            grid.append([Cell(None, label if c == 0 else "") for c in range(3)])
            sizes.append(view_sizes(reference, panel_scale(reference)))
            continue
        if background is not None and not background.same_grid(det):
            background = None
        scale = panel_scale(det)
        if centre is None:
            centre = (
                foreground_centre(background)
                if background is not None
                else centre_of(None, det.shape)
            )
        if background is not None:
            lo, hi = window(background.data)
            inside = background.data > lo + 0.1 * (hi - lo)
        else:
            lo, hi, inside = 0.0, 1.0, np.ones(det.shape, bool)
        log_det = Volume(
            np.where(inside, np.log(np.clip(det.data, 1e-3, None)), np.nan), det.spacing
        )
        with np.errstate(invalid="ignore"):
            folded = Volume((det.data <= 0).astype(np.float32), det.spacing)
        cells = []
        for view in VIEWS:
            plane, pixel = log_det.slice(view, centre)
            base = (
                grey_rgb(resample(background.slice(view, centre)[0], pixel, scale, True), lo, hi)
                if background is not None
                else np.zeros((*resample(plane, pixel, scale, False).shape, 3), np.uint8)
            )
            values = resample(plane, pixel, scale, False)
            # Opacity grows with the change, so unchanged tissue still shows the anatomy underneath.
            alpha = 0.9 * np.clip(np.abs(np.nan_to_num(values)) / (0.4 * JACOBIAN_LIMIT), 0.15, 1.0)
            rgb = blend(base, values, "RdBu_r", -JACOBIAN_LIMIT, JACOBIAN_LIMIT, alpha)
            fplane, _ = folded.slice(view, centre)
            rgb = paint(rgb, resample(fplane, pixel, scale, False) > 0.5, FOLDING_COLOUR)
            cells.append(Cell(rgb, corner=ORIENTATION_MARK[view]))
        cells[0].label = label
        shown = np.concatenate([det.slice(view, centre)[0].ravel() for view in VIEWS])
        shown = shown[np.isfinite(shown)]
        if shown.size:
            cells[2].note = (
                f"det J {shown.min():.2f} to {shown.max():.2f} in these views, "
                f"{int((shown <= 0).sum())} folded"
            )
        grid.append(cells)
        sizes.append([c.rgb.shape[:2] for c in cells])
    bar = colorbar(
        "RdBu_r",
        [
            ((np.log(v) + JACOBIAN_LIMIT) / (2 * JACOBIAN_LIMIT), t)
            for v, t in ((1 / 3, "1/3"), (0.5, "1/2"), (1, "1"), (2, "2"), (3, "3"))
        ],
        "det J (log scale)",
        height=min(200, sum(s[0][0] for s in sizes)),
    )
    return compose(grid, colorbar=bar, sizes=sizes)


def change_maps(
    background: Volume,
    maps: Sequence[tuple[str, Volume | None, str, bool]],
    tumor_baseline: np.ndarray | None,
    tumor_followup: np.ndarray | None,
) -> bytes:
    """Longitudinal change maps over the baseline image, sliced through the tumour.

    ``maps`` rows are (label, map on the baseline grid, unit, signed). Signed maps use a symmetric
    diverging scale (red positive), unsigned ones a sequential scale from zero; each row's range is
    written in its label. Tumour outlines: baseline cyan, follow-up yellow.
    """
    scale = panel_scale(background)
    tumour = (
        tumor_followup if tumor_followup is not None and np.any(tumor_followup) else tumor_baseline
    )
    centre = (
        centre_of(tumour, background.shape)
        if tumour is not None and np.any(tumour)
        else foreground_centre(background)
    )
    lo, hi = window(background.data)
    head = background.data > lo + 0.1 * (hi - lo)
    outlines = [
        (Volume(m.astype(np.float32), background.spacing), colour)
        for m, colour in (
            (tumor_baseline, BASELINE_TUMOR_COLOUR),
            (tumor_followup, FOLLOWUP_TUMOR_COLOUR),
        )
        if m is not None and m.shape == background.shape
    ]
    grid = []
    for label, volume, unit, signed in maps:
        if volume is None:
            grid.append([Cell(None, label if c == 0 else "") for c in range(3)])
            continue
        values = volume.data[head & np.isfinite(volume.data)]
        limit = float(np.percentile(np.abs(values), 99.5)) if values.size else 1.0
        limit = limit if limit > 0 else 1.0
        # Near-zero change and everything outside the head (noise there) stay transparent.
        shown = Volume(
            np.where(head & (np.abs(volume.data) >= 0.05 * limit), volume.data, np.nan),
            volume.spacing,
        )
        cells = []
        for view in VIEWS:
            bplane, pixel = background.slice(view, centre)
            rgb = grey_rgb(resample(bplane, pixel, scale, True), lo, hi)
            plane = resample(shown.slice(view, centre)[0], pixel, scale, False)
            # Opacity follows the size of the change: small changes leave the anatomy readable.
            alpha = 0.9 * np.clip(np.abs(np.nan_to_num(plane)) / (0.5 * limit), 0.0, 1.0)
            rgb = (
                blend(rgb, plane, "RdBu_r", -limit, limit, alpha)
                if signed
                else blend(rgb, plane, "inferno", 0.0, limit, alpha)
            )
            for outline, colour in outlines:
                mplane = resample(outline.slice(view, centre)[0], pixel, scale, True)
                rgb = paint(rgb, boundary(mplane >= 0.5), colour)
            cells.append(Cell(rgb, corner=ORIENTATION_MARK[view]))
        span = f"\u00b1{limit:.3g}" if signed else f"0 to {limit:.3g}"
        cells[0].label = f"{label} ({span}{' ' + unit if unit else ''})"
        grid.append(cells)
    return compose(grid, sizes=[view_sizes(background, scale)] * len(maps))


def atlas_iterations(templates: Sequence[tuple[str, Volume | None]]) -> bytes:
    """The template at every iteration side by side: one column per iteration, one row per view."""
    present = [v for _, v in templates if v is not None]
    reference = present[-1]
    # About 640 px in all whatever the number of iterations, never larger than a subject panel.
    scale = min(1.0, 3.6 / max(len(templates), 1)) * panel_scale(*present)
    centre = foreground_centre(reference)
    columns = []
    for label, volume in templates:
        if volume is None:
            columns.append([Cell(None, label if r == 0 else "") for r in range(3)])
            continue
        lo, hi = window(volume.data)
        at = centre if volume.same_grid(reference) else foreground_centre(volume)
        cells = [
            Cell(grey_rgb(resample(*volume.slice(view, at), scale, True), lo, hi)) for view in VIEWS
        ]
        cells[0].label = label
        columns.append(cells)
    grid = [[columns[c][r] for c in range(len(columns))] for r in range(3)]
    size = view_sizes(reference, scale)
    return compose(grid, sizes=[[size[r]] * len(columns) for r in range(3)])


def frequency_map(background: Volume | None, frequency: Volume, label: str) -> bytes:
    """Tumour frequency (red to yellow, zero transparent) over the atlas, sliced through its maximum.

    A fraction (maximum <= 1) is drawn on a fixed 0..1 scale so cohorts compare; counts on 0..max.
    """
    data = frequency.data
    if background is not None and not background.same_grid(frequency):
        background = None
    if np.any(data > 0):
        centre = tuple(int(v) for v in np.unravel_index(int(np.argmax(data)), data.shape))
    else:
        centre = (
            foreground_centre(background)
            if background is not None
            else centre_of(None, frequency.shape)
        )
    peak = float(data.max())
    vmax = 1.0 if peak <= 1.0 else peak
    overlay = Volume(np.where(data > 0, data, np.nan), frequency.spacing)
    scale = panel_scale(frequency)
    cells = []
    for view in VIEWS:
        plane, pixel = overlay.slice(view, centre)
        values = resample(plane, pixel, scale, False)
        if background is not None:
            lo, hi = window(background.data)
            rgb = grey_rgb(resample(background.slice(view, centre)[0], pixel, scale, True), lo, hi)
        else:
            rgb = np.zeros((*values.shape, 3), np.uint8)
        cells.append(
            Cell(blend(rgb, values, "autumn", 0.0, vmax, 0.85), corner=ORIENTATION_MARK[view])
        )
    cells[0].label = f"max {peak:.3g}"
    bar = colorbar(
        "autumn",
        [(0, "0"), (0.5, f"{vmax / 2:.3g}"), (1, f"{vmax:.3g}")],
        label,
        height=min(200, cells[0].rgb.shape[0]),
    )
    return compose([cells], colorbar=bar)


def placeholder_png(title: str, reason: str) -> bytes:
    """A small grey PNG saying what is missing and why (for figure files that must exist)."""
    image = PILImage.new("RGB", (640, 70), (238, 238, 238))
    draw = ImageDraw.Draw(image)
    draw.text((12, 12), f"missing: {title}", fill=(87, 96, 106), font=load_font(14))
    draw.text((12, 40), reason[:100], fill=(87, 96, 106), font=SMALL_FONT)
    return encode_png(image)


# ------------------------------------------------------------------------------- line plots


def _figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None})
    return buf.getvalue()


#: Line colours of the tumour compartments (BraTS names); others take matplotlib's cycle.
COMPARTMENT_COLOURS = {"necrosis": "#8250df", "oedema": "#1f9e89", "enhancing": "#e36209"}


def tumor_volume_plot(
    days: Sequence[float],
    volumes_mm3: Sequence[float],
    sessions: Sequence[str],
    responses: Sequence[str],
    title: str,
    compartments: Mapping[str, Sequence[float]] | None = None,
) -> bytes:
    """Tumour volume (mL) over days since baseline; each point coloured by its response category.

    ``compartments`` (name -> volume in mL per session, NaN where unknown) adds one line per
    compartment of multi-label masks (necrosis, oedema, enhancing) under the whole tumour's.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 2.8), dpi=100)
    ax = fig.add_axes((0.12, 0.18, 0.6, 0.68))
    x = np.asarray(days, float)
    y = np.asarray(volumes_mm3, float) / 1000.0
    ax.plot(x, y, color="#57606a", linewidth=1.2, zorder=1)
    seen = {}
    for xi, yi, session, response in zip(x, y, sessions, responses, strict=True):
        handle = ax.scatter(
            [xi],
            [yi],
            s=40,
            color=RESPONSE_COLOURS.get(response, "#8250df"),
            zorder=2,
            edgecolor="white",
            linewidth=0.6,
        )
        seen.setdefault(response or "n/a", handle)
        if np.isfinite(yi):
            ax.annotate(
                session_entity(session),
                (xi, yi),
                textcoords="offset points",
                xytext=(4, 5),
                fontsize=7,
            )
    lines, peaks = [], [y]
    for name, values in (compartments or {}).items():
        v = np.asarray(values, float)
        peaks.append(v)
        (line,) = ax.plot(
            x,
            v,
            color=COMPARTMENT_COLOURS.get(name),
            linewidth=1.6,
            marker="s",
            markersize=3.5,
            zorder=1.5,
            label=name,
        )
        lines.append(line)
    ax.set_xlabel("days since baseline", fontsize=8)
    ax.set_ylabel("tumour volume (mL)", fontsize=8)
    ax.tick_params(labelsize=7)
    finite = np.concatenate(peaks)
    finite = finite[np.isfinite(finite)]
    ax.set_ylim(0, float(finite.max()) * 1.25 if finite.size and finite.max() > 0 else 1.0)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.legend(
        list(seen.values()),
        [r.replace("_", " ") for r in seen],
        loc="upper right" if lines else "center right",
        fontsize=7,
        frameon=False,
        title="response (whole tumour)" if lines else "response",
        title_fontsize=7,
    )
    if lines:
        fig.legend(
            lines,
            [line.get_label() for line in lines],
            loc="lower right",
            fontsize=7,
            frameon=False,
            title="compartments",
            title_fontsize=7,
        )
    return _figure_png(fig)


def convergence_plot(
    iterations: Sequence[float], series: Sequence[tuple[str, dict[str, Sequence[float]]]]
) -> bytes:
    """Small line plots of atlas metrics against the iteration: (title, {curve label: values})."""
    n = max(1, len(series))
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.5 * n, 2.3), dpi=100)
    axes = fig.subplots(1, n, squeeze=False)[0]
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.2, top=0.86, wspace=0.45)
    x = np.asarray(iterations, float)
    for ax, (title, curves) in zip(axes, series, strict=False):
        for label, values in curves.items():
            ax.plot(
                x, np.asarray(values, float), marker="o", markersize=3, linewidth=1.2, label=label
            )
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("iteration", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=6, frameon=False)
    return _figure_png(fig)
