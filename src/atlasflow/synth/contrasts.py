"""The demo cohort's other contrasts: T2w and FLAIR made from the same anatomy as the T1w.

Owns the tissue contrast of each (:data:`APPEARANCES`: CSF, GM, WM, the tumour's core and rim and
the oedema around it, relative to white matter), the pose and grid draws of a contrast scan
(:func:`draw_alignment`), its rendering from resampled tissue probabilities (:func:`render_contrast`)
and the noise-free contrast of the template anatomy (:func:`contrast_template`).

The T1w is the MNI T1 itself; the other contrasts are mixed from the tissue probabilities
(:func:`atlasflow.synth.source.load_tissue_channels`) resampled through the same maps as the T1w
(:mod:`atlasflow.synth.demo` computes them), so every contrast of a session shows the same
anatomy, deformation and lesion. Each is seen by its own scanner: a rigid change of head pose
relative to the T1w (the truth of the within-session alignment), its own grid with thicker slices
and header orientation, bias field, gain and Rician noise, all drawn from the contrast's own stream
(:func:`atlasflow.synth.plan.contrast_rng`), never from the T1w's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atlasflow.io.images import Grid, Image
from atlasflow.synth.fields import random_affine, smooth_field
from atlasflow.synth.tables import TUMOUR_LABEL
from atlasflow.synth.tumour import LesionView, sigmoid


@dataclass(frozen=True)
class Appearance:
    """One contrast's intensities relative to white matter, and its acquisition."""

    suffix: str  # BIDS suffix (file names, truth names)
    csf: float
    gm: float
    wm: float
    core: float  # the tumour's core (necrosis)
    rim: float  # the tumour's rim (viable tumour)
    oedema: float  # the white matter next to the tumour
    gain: tuple[float, float]  # scanner units per white-matter unit (range drawn from)
    slice_factor: float  # slice thickness / demo spacing (the third RAS axis, axial slices)


#: T2w: fluid bright, WM darker than GM, tumour and oedema bright. FLAIR: fluid suppressed (CSF
#: dark), WM darker than GM, tumour, oedema (and the necrotic core, less) bright.
APPEARANCES = {
    "t2w": Appearance("T2w", 3.0, 1.45, 1.0, 3.2, 1.9, 2.0, (600.0, 1000.0), 1.5),
    "flair": Appearance("FLAIR", 0.2, 1.45, 1.0, 1.3, 1.9, 1.8, (800.0, 1400.0), 1.5),
}
# Oedema: white matter out to OEDEMA_REACH times the lesion boundary (normalised radius, about a
# centimetre beyond the rim), with an edge of OEDEMA_EDGE.
OEDEMA_REACH = 1.8
OEDEMA_EDGE = 0.15
# Rigid pose of a contrast relative to the session's T1w: up to this per axis.
MAX_ROTATION_DEG = 4.0
MAX_SHIFT_MM = 4.0


def mix(appearance: Appearance, tissues: np.ndarray) -> np.ndarray:
    """Intensity (white matter = 1) of tissue probabilities ``tissues`` (..., CSF/GM/WM)."""
    a = appearance
    return a.csf * tissues[..., 0] + a.gm * tissues[..., 1] + a.wm * tissues[..., 2]


def contrast_template(column: str, channels: np.ndarray, affine: np.ndarray) -> Image:
    """The noise-free contrast ``column`` of the template anatomy: ``channels`` are
    :func:`~atlasflow.synth.source.load_tissue_channels` resampled onto the template grid."""
    return Image(mix(APPEARANCES[column], channels[..., 4:]).astype(np.float32), affine)


def draw_alignment(rng: np.random.Generator, head_centre: np.ndarray) -> tuple[np.ndarray, dict]:
    """A small rigid map from the T1w's world to the contrast's (about ``head_centre``)."""
    rigid, params = random_affine(rng, head_centre, MAX_ROTATION_DEG, (1.0, 1.0), MAX_SHIFT_MM)
    params.pop("scale")
    return rigid, params


def grid_spacing(column: str, spacing_mm: float) -> tuple[float, float, float]:
    """Voxel size (RAS axes) of a contrast scan: the demo spacing with thicker axial slices."""
    return (spacing_mm, spacing_mm, spacing_mm * APPEARANCES[column].slice_factor)


@dataclass
class ContrastScan:
    image: Image  # uint16 scanner units on the contrast's own grid
    dseg: Image  # its tissue labels (the truth of the anatomy it shows)
    params: dict


def render_contrast(
    column: str,
    values: np.ndarray,
    grid: Grid,
    lesion: LesionView | None,
    rng: np.random.Generator,
) -> ContrastScan:
    """One contrast scan on ``grid`` from ``values``, the tissue channels resampled onto it.

    ``lesion`` is the session's tumour on this grid (None for controls); the scanner's gain, gamma,
    noise and bias field are drawn from ``rng``.
    """
    a = APPEARANCES[column]
    dseg = np.argmax(values[..., :4], -1).astype(np.uint8)
    anatomy = mix(a, values[..., 4:])
    if lesion is not None:
        texture = lesion.texture
        reach = sigmoid((OEDEMA_REACH * lesion.boundary - lesion.radius) / OEDEMA_EDGE)
        oedema = (1 - lesion.inside) * reach * values[..., 6] * (1 + 0.1 * texture)
        anatomy = anatomy + oedema * (a.oedema - a.wm)
        tumour = lesion.core * a.core * (1 + 0.15 * texture) + (1 - lesion.core) * a.rim * (
            1 + 0.06 * texture
        )
        anatomy = (1 - lesion.inside) * anatomy + lesion.inside * tumour
        dseg[lesion.mask] = TUMOUR_LABEL

    params = {
        "gain": float(rng.uniform(*a.gain)),
        "gamma": float(rng.uniform(0.9, 1.1)),
        "noise": float(rng.uniform(0.015, 0.03)),
    }
    bias = np.exp(smooth_field(rng, grid, 1, (150.0, 400.0), 0.12, 6)[..., 0])
    signal = params["gain"] * np.clip(anatomy, 0, None) ** params["gamma"] * bias
    sigma = params["noise"] * params["gain"]
    real = signal + sigma * rng.standard_normal(signal.shape)
    imag = sigma * rng.standard_normal(signal.shape)
    image = np.clip(np.rint(np.sqrt(real**2 + imag**2)), 0, 65535).astype(np.uint16)
    return ContrastScan(Image(image, grid.affine.copy()), Image(dseg, grid.affine.copy()), params)
