"""Montages of 3-D images: slices in three orthogonal views, composed as RGB arrays into PNGs.

The drawing toolkit of :mod:`atlasflow.reports.figures`: :class:`Volume` (an array in RAS voxel
order with its spacing), display windows and centres, pixel primitives (grey scale, colour
overlays, outlines), :func:`compose` (cells in rows, labels, colour bar, PNG) and :func:`colorbar`.
Montages are composed directly as RGB arrays (numpy, matplotlib's colour maps, Pillow for
resampling, text and PNG encoding): building matplotlib axes for every panel cost about 0.1 s
each, this costs milliseconds. No timestamps go into a PNG: same input, same bytes.

Views follow the neurological convention (subject's left on the viewer's left) with superior and
anterior up; every volume is first turned to the closest RAS voxel order, so scans stored in any
orientation look the same, and voxels are drawn at their physical size (anisotropic spacing is
respected).
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
    from matplotlib.colors import Colormap

# matplotlib (~0.5 s to import) is imported where a colour map is needed, not with this module.

VIEWS = ("sagittal", "coronal", "axial")
PANEL_PX = 176  # longest physical side of a volume, in pixels (two figures fit side by side)
GAP = 3
BACKGROUND = (17, 17, 17)
MISSING_GREY = (52, 52, 52)


def load_font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` (its bitmap font on old Pillow versions)."""
    try:  # Pillow's bundled scalable font: the same glyphs on every machine
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


FONT = load_font(12)
SMALL_FONT = load_font(10)


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


def resample(
    plane: np.ndarray, pixel_mm: tuple[float, float], px_per_mm: float, smooth: bool
) -> np.ndarray:
    """A slice scaled to ``px_per_mm`` at its physical pixel size (bilinear, or nearest for labels)."""
    height = max(1, int(round(plane.shape[0] * pixel_mm[0] * px_per_mm)))
    width = max(1, int(round(plane.shape[1] * pixel_mm[1] * px_per_mm)))
    image = PILImage.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    method = PILImage.Resampling.BILINEAR if smooth else PILImage.Resampling.NEAREST
    return np.asarray(image.resize((width, height), method), dtype=np.float32)


def grey_rgb(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Grey-scale RGB of ``values`` in the window ``lo``..``hi`` (NaN as ``lo``)."""
    scaled = np.clip((np.nan_to_num(values, nan=lo) - lo) / (hi - lo), 0, 1)
    return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=-1)


def blend(
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
        colormap(cmap)(np.clip((np.where(shown, values, vmin) - vmin) / (vmax - vmin), 0, 1))[
            ..., :3
        ]
        * 255
    )
    weight = np.where(shown, alpha, 0.0)[..., None]
    return ((1 - weight) * rgb + weight * colours).astype(np.uint8)


def boundary(inside: np.ndarray) -> np.ndarray:
    """Pixels inside a region with a 4-neighbour outside it: a one-pixel outline."""
    edge = np.zeros_like(inside)
    edge[1:, :] |= inside[1:, :] & ~inside[:-1, :]
    edge[:-1, :] |= inside[:-1, :] & ~inside[1:, :]
    edge[:, 1:] |= inside[:, 1:] & ~inside[:, :-1]
    edge[:, :-1] |= inside[:, :-1] & ~inside[:, 1:]
    return edge


def paint(rgb: np.ndarray, where: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """A copy of ``rgb`` with the pixels ``where`` set to ``colour``."""
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
    """PNG bytes of an image (no metadata, so the same pixels give the same bytes)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def colorbar(
    cmap: str, ticks: Sequence[tuple[float, str]], title: str, height: int = 200
) -> PILImage.Image:
    """A vertical colour bar image; ``ticks`` are (position 0..1 from the bottom, text)."""
    bar_w, text_w = 14, 44
    image = PILImage.new("RGB", (bar_w + text_w + 18, height + 20), BACKGROUND)
    ramp = colormap(cmap)(np.linspace(1, 0, height))[:, :3] * 255
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


def panel_scale(*volumes: Volume | None) -> float:
    """Pixels per millimetre that fit the largest of ``volumes`` into :data:`PANEL_PX`."""
    extent = max((v.extent_mm for v in volumes if v is not None), default=1.0)
    return PANEL_PX / max(extent, 1e-6)


def view_sizes(volume: Volume, px_per_mm: float) -> list[tuple[int, int]]:
    """(height, width) in pixels of each of the three views of ``volume`` at this scale."""
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


def colormap(name: str) -> Colormap:
    """matplotlib's colour map of that name (matplotlib imported on first use)."""
    from matplotlib import colormaps

    return colormaps[name]
