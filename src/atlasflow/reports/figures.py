"""Report figures: small PNGs of 3-D images in three orthogonal views, overlays and plots.

Everything here is pure: arrays (or :class:`~atlasflow.io.images.Image`) in, PNG bytes out. Slice
montages are composed directly as RGB arrays (numpy, matplotlib's colour maps, Pillow for
resampling, text and PNG encoding): building matplotlib axes for every panel cost about 0.1 s each,
this costs milliseconds. Only the line plots (tumour volume, atlas convergence) use matplotlib's
object API on the Agg canvas. No timestamps go into a PNG: same input, same bytes.

Views follow the neurological convention (subject's left on the viewer's left) with superior and
anterior up; every volume is first turned to the closest RAS voxel order, so scans stored in any
orientation look the same, and voxels are drawn at their physical size (anisotropic spacing is
respected). :mod:`atlasflow.reports.report` decides which files feed which figure.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nibabel.orientations as nio
import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from atlasflow.io.images import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# matplotlib (~0.5 s to import) is imported where a figure is drawn: the workflow imports this
# module (through atlasflow.reports.report) every time Snakemake plans.

VIEWS = ("sagittal", "coronal", "axial")
PANEL_PX = 176  # longest physical side of a volume, in pixels (two figures fit side by side)
GAP = 3
BACKGROUND = (17, 17, 17)
MISSING_GREY = (52, 52, 52)
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


def _font(size: int) -> ImageFont.ImageFont:
    try:  # Pillow's bundled scalable font: the same glyphs on every machine
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


FONT = _font(12)
SMALL_FONT = _font(10)


@dataclass
class Volume:
    """A 3-D array in RAS voxel order with its voxel spacing (mm), ready to slice for display."""

    data: np.ndarray
    spacing: np.ndarray

    @classmethod
    def from_image(cls, image: Image) -> Volume:
        """Reorder (and flip) the voxel axes to the closest RAS order; keep the values."""
        ras = ras_image(image)
        return cls(ras.data, np.sqrt((ras.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[:3])

    @property
    def extent_mm(self) -> float:
        return float(max(np.asarray(self.shape) * self.spacing))

    def same_grid(self, other: Volume) -> bool:
        return self.shape == other.shape and np.allclose(self.spacing, other.spacing, atol=1e-3)

    def slice(self, view: str, centre: Sequence[int]) -> tuple[np.ndarray, tuple[float, float]]:
        """2-D slice as an image (row 0 at the top) and its pixel size (row mm, column mm)."""
        i, j, k = (int(np.clip(c, 0, s - 1)) for c, s in zip(centre, self.shape, strict=True))
        sx, sy, sz = (float(s) for s in self.spacing)
        if view == "sagittal":  # columns posterior -> anterior, rows superior -> inferior
            return self.data[i, :, ::-1].T, (sz, sy)
        if view == "coronal":  # columns left -> right
            return self.data[:, j, ::-1].T, (sz, sx)
        if view == "axial":  # rows anterior -> posterior
            return self.data[:, ::-1, k].T, (sy, sx)
        raise ValueError(f"unknown view {view!r}")


def ras_image(image: Image) -> Image:
    """The image with its voxel axes reordered and flipped to the closest RAS order, affine to match.

    Values are untouched, so a vector field in world millimetres stays valid.
    """
    ornt = nio.io_orientation(image.affine)
    data = nio.apply_orientation(np.asarray(image.data), ornt)
    affine = np.asarray(image.affine, float) @ nio.inv_ornt_aff(ornt, image.data.shape[:3])
    return Image(np.ascontiguousarray(data), affine)


def window(data: np.ndarray, low: float = 1.0, high: float = 99.5) -> tuple[float, float]:
    """Robust display range: percentiles of the finite non-zero voxels (all finite voxels if none)."""
    finite = data[np.isfinite(data)]
    values = finite[finite != 0] if np.any(finite != 0) else finite
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def centre_of(data: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """Voxel at the centre of mass of ``data > 0`` (the middle of the grid if empty or None)."""
    if data is not None and np.any(data > 0):
        return tuple(int(round(c)) for c in np.argwhere(data > 0).mean(axis=0))
    return tuple(int(s) // 2 for s in shape)


def foreground_centre(volume: Volume) -> tuple[int, int, int]:
    """Centre of the head/brain: centre of mass of voxels above a tenth of the robust maximum."""
    lo, hi = window(volume.data)
    return centre_of(volume.data > lo + 0.1 * (hi - lo), volume.shape)


# ------------------------------------------------------------------------- pixel primitives


def _resample(
    plane: np.ndarray, pixel_mm: tuple[float, float], px_per_mm: float, smooth: bool
) -> np.ndarray:
    height = max(1, int(round(plane.shape[0] * pixel_mm[0] * px_per_mm)))
    width = max(1, int(round(plane.shape[1] * pixel_mm[1] * px_per_mm)))
    image = PILImage.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    method = PILImage.Resampling.BILINEAR if smooth else PILImage.Resampling.NEAREST
    return np.asarray(image.resize((width, height), method), dtype=np.float32)


def _grey(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = np.clip((np.nan_to_num(values, nan=lo) - lo) / (hi - lo), 0, 1)
    return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _blend(
    rgb: np.ndarray,
    values: np.ndarray,
    cmap: str,
    vmin: float,
    vmax: float,
    alpha: float | np.ndarray,
) -> np.ndarray:
    """Colour ``values`` with ``cmap`` over ``rgb`` where they are finite (``alpha`` may vary per pixel)."""
    shown = np.isfinite(values)
    if not shown.any():
        return rgb
    colours = (
        _colormap(cmap)(np.clip((np.where(shown, values, vmin) - vmin) / (vmax - vmin), 0, 1))[
            ..., :3
        ]
        * 255
    )
    weight = np.where(shown, alpha, 0.0)[..., None]
    return ((1 - weight) * rgb + weight * colours).astype(np.uint8)


def _boundary(inside: np.ndarray) -> np.ndarray:
    """Pixels inside a region with a 4-neighbour outside it: a one-pixel outline."""
    edge = np.zeros_like(inside)
    edge[1:, :] |= inside[1:, :] & ~inside[:-1, :]
    edge[:-1, :] |= inside[:-1, :] & ~inside[1:, :]
    edge[:, 1:] |= inside[:, 1:] & ~inside[:, :-1]
    edge[:, :-1] |= inside[:, :-1] & ~inside[:, 1:]
    return edge


def _paint(rgb: np.ndarray, where: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    out = rgb.copy()
    out[where] = colour
    return out


@dataclass
class Cell:
    """One panel of a montage: an RGB image or None (drawn as 'missing'), with optional labels."""

    rgb: np.ndarray | None
    label: str = ""
    corner: str = ""  # small mark at the lower right (orientation)
    note: str = ""  # text at the upper right


def _text_box(
    draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, anchor: str, font=FONT
) -> None:
    box = draw.textbbox(xy, text, font=font, anchor=anchor)
    draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
    draw.text(xy, text, fill=(255, 255, 255), font=font, anchor=anchor)


def compose(
    grid: Sequence[Sequence[Cell]],
    colorbar: PILImage.Image | None = None,
    sizes: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> bytes:
    """Lay cells out in rows (each column as wide as its widest cell), add labels, encode PNG.

    ``sizes`` gives the (height, width) of missing cells; by default they take the size of the
    other cells of their column/row.
    """
    n_rows, n_cols = len(grid), max(len(r) for r in grid)
    heights = [0] * n_rows
    widths = [0] * n_cols
    for r, row in enumerate(grid):
        for c, cell in enumerate(row):
            h, w = (
                cell.rgb.shape[:2] if cell.rgb is not None else (sizes[r][c] if sizes else (0, 0))
            )
            heights[r], widths[c] = max(heights[r], h), max(widths[c], w)
    heights = [h or 120 for h in heights]
    widths = [w or 120 for w in widths]
    extra = colorbar.width + 2 * GAP if colorbar is not None else 0
    total_w = sum(widths) + GAP * (n_cols + 1) + extra
    total_h = max(sum(heights) + GAP * (n_rows + 1), colorbar.height + 2 * GAP if colorbar else 0)
    canvas = PILImage.new("RGB", (total_w, total_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = GAP
    for r, row in enumerate(grid):
        x = GAP
        for c, cell in enumerate(row):
            w, h = widths[c], heights[r]
            if cell.rgb is None:
                draw.rectangle((x, y, x + w - 1, y + h - 1), fill=MISSING_GREY)
                draw.text(
                    (x + w // 2, y + h // 2),
                    "missing",
                    fill=(190, 190, 190),
                    font=FONT,
                    anchor="mm",
                )
            else:
                ch, cw = cell.rgb.shape[:2]
                canvas.paste(PILImage.fromarray(cell.rgb), (x + (w - cw) // 2, y + (h - ch) // 2))
            if cell.label:
                _text_box(draw, (x + 4, y + 4), cell.label, "la")
            if cell.note:
                _text_box(draw, (x + w - 4, y + 4), cell.note, "ra", SMALL_FONT)
            if cell.corner and cell.rgb is not None:
                _text_box(draw, (x + w - 4, y + h - 4), cell.corner, "rd", SMALL_FONT)
            x += w + GAP
        y += heights[r] + GAP
    if colorbar is not None:
        canvas.paste(colorbar, (total_w - colorbar.width - GAP, (total_h - colorbar.height) // 2))
    return encode_png(canvas)


def encode_png(image: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def colorbar(
    cmap: str, ticks: Sequence[tuple[float, str]], title: str, height: int = 200
) -> PILImage.Image:
    """A vertical colour bar image; ``ticks`` are (position 0..1 from the bottom, text)."""
    bar_w, text_w = 14, 44
    image = PILImage.new("RGB", (bar_w + text_w + 18, height + 20), BACKGROUND)
    ramp = _colormap(cmap)(np.linspace(1, 0, height))[:, :3] * 255
    image.paste(
        PILImage.fromarray(np.repeat(ramp.astype(np.uint8)[:, None, :], bar_w, axis=1)), (2, 10)
    )
    draw = ImageDraw.Draw(image)
    for pos, text in ticks:
        yy = 10 + int(round((1 - pos) * (height - 1)))
        draw.line((2 + bar_w, yy, 6 + bar_w, yy), fill=(220, 220, 220))
        draw.text((9 + bar_w, yy), text, fill=(230, 230, 230), font=SMALL_FONT, anchor="lm")
    vertical = PILImage.new("RGB", (height + 20, 14), BACKGROUND)
    ImageDraw.Draw(vertical).text(
        ((height + 20) // 2, 7), title, fill=(230, 230, 230), font=SMALL_FONT, anchor="mm"
    )
    image.paste(vertical.rotate(90, expand=True), (image.width - 15, 0))
    return image


def _px_per_mm(*volumes: Volume | None) -> float:
    extent = max((v.extent_mm for v in volumes if v is not None), default=1.0)
    return PANEL_PX / max(extent, 1e-6)


def _view_sizes(volume: Volume, px_per_mm: float) -> list[tuple[int, int]]:
    sizes = []
    for view in VIEWS:
        plane, pixel = volume.slice(view, [0, 0, 0])
        sizes.append(
            (
                int(round(plane.shape[0] * pixel[0] * px_per_mm)),
                int(round(plane.shape[1] * pixel[1] * px_per_mm)),
            )
        )
    return sizes


# The side of the subject at the right edge of each view.
ORIENTATION_MARK = {"sagittal": "A", "coronal": "R", "axial": "R"}


# ----------------------------------------------------------------------------------- figures


def anatomy_rows(rows: Sequence[tuple[str, Volume | None, np.ndarray | None]]) -> bytes:
    """Rows of three orthogonal views: (label, image, optional mask drawn as an outline).

    Each row has its own grid and scale (a raw scan and its preprocessed version differ); a row
    whose volume is None is drawn as panels saying 'missing'.
    """
    grid, sizes = [], []
    reference = next((v for _, v, _ in rows if v is not None), None)
    for label, volume, mask in rows:
        if volume is None:
            grid.append([Cell(None, label if c == 0 else "") for c in range(3)])
            sizes.append(
                _view_sizes(reference, _px_per_mm(reference))
                if reference is not None
                else [(120, 120)] * 3
            )
            continue
        scale = _px_per_mm(volume)
        lo, hi = window(volume.data)
        centre = foreground_centre(volume)
        cells = []
        for view in VIEWS:
            plane, pixel = volume.slice(view, centre)
            rgb = _grey(_resample(plane, pixel, scale, True), lo, hi)
            if mask is not None:
                mplane, _ = Volume(mask.astype(np.float32), volume.spacing).slice(view, centre)
                rgb = _paint(
                    rgb, _boundary(_resample(mplane, pixel, scale, True) >= 0.5), MASK_COLOUR
                )
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


def registration_overlay(fixed: Volume, rows: Sequence[tuple[str, Volume | None]]) -> bytes:
    """Moving images on the fixed grid (before / after) with the fixed image's edges in red.

    Every row is a volume on the fixed grid sliced at the same voxel, so alignment shows as the red
    edges of the fixed image lying on the moving image's own boundaries.
    """
    scale = _px_per_mm(fixed)
    centre = foreground_centre(fixed)
    levels = edge_levels(fixed.data)
    edges = []
    for view in VIEWS:
        fplane, pixel = fixed.slice(view, centre)
        up = _resample(fplane, pixel, scale, True)
        edge = np.zeros(up.shape, bool)
        for level in levels:
            edge |= _boundary(up > level)
        edges.append(edge)
    grid = []
    for label, moving in rows:
        if moving is None:
            grid.append([Cell(None, label if c == 0 else "") for c in range(3)])
            continue
        lo, hi = window(moving.data)
        cells = []
        for view, edge in zip(VIEWS, edges, strict=True):
            plane, pixel = moving.slice(view, centre)
            rgb = _paint(_grey(_resample(plane, pixel, scale, True), lo, hi), edge, EDGE_COLOUR)
            cells.append(Cell(rgb, corner=ORIENTATION_MARK[view]))
        cells[0].label = label
        grid.append(cells)
    return compose(grid, sizes=[_view_sizes(fixed, scale)] * len(rows))


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
            sizes.append(_view_sizes(reference, _px_per_mm(reference)))
            continue
        if background is not None and not background.same_grid(det):
            background = None
        scale = _px_per_mm(det)
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
                _grey(_resample(background.slice(view, centre)[0], pixel, scale, True), lo, hi)
                if background is not None
                else np.zeros((*_resample(plane, pixel, scale, False).shape, 3), np.uint8)
            )
            values = _resample(plane, pixel, scale, False)
            # Opacity grows with the change, so unchanged tissue still shows the anatomy underneath.
            alpha = 0.9 * np.clip(np.abs(np.nan_to_num(values)) / (0.4 * JACOBIAN_LIMIT), 0.15, 1.0)
            rgb = _blend(base, values, "RdBu_r", -JACOBIAN_LIMIT, JACOBIAN_LIMIT, alpha)
            fplane, _ = folded.slice(view, centre)
            rgb = _paint(rgb, _resample(fplane, pixel, scale, False) > 0.5, FOLDING_COLOUR)
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
    scale = _px_per_mm(background)
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
            rgb = _grey(_resample(bplane, pixel, scale, True), lo, hi)
            plane = _resample(shown.slice(view, centre)[0], pixel, scale, False)
            # Opacity follows the size of the change: small changes leave the anatomy readable.
            alpha = 0.9 * np.clip(np.abs(np.nan_to_num(plane)) / (0.5 * limit), 0.0, 1.0)
            rgb = (
                _blend(rgb, plane, "RdBu_r", -limit, limit, alpha)
                if signed
                else _blend(rgb, plane, "inferno", 0.0, limit, alpha)
            )
            for outline, colour in outlines:
                mplane = _resample(outline.slice(view, centre)[0], pixel, scale, True)
                rgb = _paint(rgb, _boundary(mplane >= 0.5), colour)
            cells.append(Cell(rgb, corner=ORIENTATION_MARK[view]))
        span = f"\u00b1{limit:.3g}" if signed else f"0 to {limit:.3g}"
        cells[0].label = f"{label} ({span}{' ' + unit if unit else ''})"
        grid.append(cells)
    return compose(grid, sizes=[_view_sizes(background, scale)] * len(maps))


def atlas_iterations(templates: Sequence[tuple[str, Volume | None]]) -> bytes:
    """The template at every iteration side by side: one column per iteration, one row per view."""
    present = [v for _, v in templates if v is not None]
    reference = present[-1]
    # About 640 px in all whatever the number of iterations, never larger than a subject panel.
    scale = min(1.0, 3.6 / max(len(templates), 1)) * _px_per_mm(*present)
    centre = foreground_centre(reference)
    columns = []
    for label, volume in templates:
        if volume is None:
            columns.append([Cell(None, label if r == 0 else "") for r in range(3)])
            continue
        lo, hi = window(volume.data)
        at = centre if volume.same_grid(reference) else foreground_centre(volume)
        cells = [
            Cell(_grey(_resample(*volume.slice(view, at), scale, True), lo, hi)) for view in VIEWS
        ]
        cells[0].label = label
        columns.append(cells)
    grid = [[columns[c][r] for c in range(len(columns))] for r in range(3)]
    size = _view_sizes(reference, scale)
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
    scale = _px_per_mm(frequency)
    cells = []
    for view in VIEWS:
        plane, pixel = overlay.slice(view, centre)
        values = _resample(plane, pixel, scale, False)
        if background is not None:
            lo, hi = window(background.data)
            rgb = _grey(_resample(background.slice(view, centre)[0], pixel, scale, True), lo, hi)
        else:
            rgb = np.zeros((*values.shape, 3), np.uint8)
        cells.append(
            Cell(_blend(rgb, values, "autumn", 0.0, vmax, 0.85), corner=ORIENTATION_MARK[view])
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
    draw.text((12, 12), f"missing: {title}", fill=(87, 96, 106), font=_font(14))
    draw.text((12, 40), reason[:100], fill=(87, 96, 106), font=SMALL_FONT)
    return encode_png(image)


# ------------------------------------------------------------------------------- line plots


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


def _figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None})
    return buf.getvalue()


def tumor_volume_plot(
    days: Sequence[float],
    volumes_mm3: Sequence[float],
    sessions: Sequence[str],
    responses: Sequence[str],
    title: str,
) -> bytes:
    """Tumour volume (mL) over days since baseline; each point coloured by its response category."""
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
                f"ses-{session}", (xi, yi), textcoords="offset points", xytext=(4, 5), fontsize=7
            )
    ax.set_xlabel("days since baseline", fontsize=8)
    ax.set_ylabel("tumour volume (mL)", fontsize=8)
    ax.tick_params(labelsize=7)
    finite = y[np.isfinite(y)]
    ax.set_ylim(0, float(finite.max()) * 1.25 if finite.size and finite.max() > 0 else 1.0)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.legend(
        list(seen.values()),
        [r.replace("_", " ") for r in seen],
        loc="center right",
        fontsize=7,
        frameon=False,
        title="response",
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
