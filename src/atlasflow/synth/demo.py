"""Synthetic cohorts: the embedded demo cohort and the ground truth to score the pipeline against.

Everything is made from material nilearn ships inside its package (no download): the skull-stripped
MNI152 2009 T1 brain at 1 mm, its grey- and white-matter probability maps and its brain mask.

Cross-sectional ("control") subjects are the template pushed through a random smooth diffeomorphism
(a stationary velocity field integrated by scaling and squaring) and a random affine, seen by a
scanner with its own grid and header orientation, a smooth multiplicative bias field and Rician
noise. Longitudinal ("tumour") subjects add a lesion grown from a white-matter seed: the lesion and
the tissue around it are moved by the flow of a radial velocity field (:class:`TumourModel`), so
the tumour at every timepoint is the image of the baseline tumour under a known diffeomorphism and
the Jacobian of that map integrates to the tumour's volume change. Follow-up scans also get a
small change of head pose.

Point-mapping conventions (the package's :class:`~atlasflow.transforms.Transform`: fixed grid points
to moving world points, pull-back, as ITK/ANTs), all in world RAS millimetres:

* template -> subject (``..._from-T1w_to-template_mode-image_xfm``, fixed = template grid):
  ``y = P_t(Phi_t(A (x + u(x))))``, ``u`` the random diffeomorphism, ``A`` the subject affine,
  ``Phi_t`` the tumour flow at session t (identity for controls), ``P_t`` the head pose of session
  t (identity at baseline and for controls); stored as ``P_t A (x + W(x))``.
* follow-up -> baseline (``..._from-T1w_to-baseline_mode-image_xfm``, fixed = baseline scan grid):
  ``y_t = P_t(Phi_t(Phi_1^-1(x))) = P_t(x + m(x))``, ``m`` the mass effect between the sessions.

The text :data:`TRUTH_README`, written to ``truth/README.md`` with every cohort, spells this out
next to the files.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from atlasflow.errors import AtlasflowError
from atlasflow.io.atomic import atomic_write_text
from atlasflow.io.images import Grid, Image, save_image
from atlasflow.io.itk import save_transform
from atlasflow.nn.layers import integrate_velocity, warp_tensor
from atlasflow.preprocess.reference import template_grid
from atlasflow.transforms import (
    Transform,
    apply_transform,
    displacement_vox_to_world,
    displacement_world_to_vox,
    sample_voxels,
    world_coordinates,
)

MANIFEST_COLUMNS = ("subject", "session", "t1w", "labels", "tumor_mask", "acq_date", "group")
# Header orientations cycled over subjects (same image in world space, different voxel order), so
# preprocessing's reorientation always has work to do; PSR is how the IXI scans are stored.
ORIENTATIONS = ("RAS", "LPS", "PSR", "LAS")
# dseg label table (0 = background).
DSEG_LABELS = (
    (1, "CSF", "cerebrospinal fluid"),
    (2, "GM", "grey matter"),
    (3, "WM", "white matter"),
    (4, "TUM", "tumour"),
)
TUMOUR_LABEL = 4

# Random streams, one per (seed, subject, purpose): the manifest (acquisition dates) can then be
# produced without generating any image, and a subject's draws do not depend on the others (only
# the controls' velocity fields are centred on their group's mean).
_STREAM_ANATOMY = 0
_STREAM_DATES = 1
_STREAM_TUMOUR = 2
_STREAM_SCAN = 10  # + session number


def _rng(seed: int, subject_index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, subject_index, stream]))


# ------------------------------------------------------------------------------------ cohort plan


@dataclass
class _SubjectPlan:
    index: int
    subject: str
    group: str
    sessions: list[str]
    dates: list[dt.date]
    orientation: str

    @property
    def longitudinal(self) -> bool:
        return self.group == "tumour"


def _check_arguments(
    seed: int, n_cross: int, n_long: int, n_timepoints: int, spacing_mm: float
) -> None:
    if seed < 0:
        raise AtlasflowError(f"demo cohort: seed must be >= 0, got {seed}")
    if n_cross < 0 or n_long < 0 or n_cross + n_long < 1:
        raise AtlasflowError(
            f"demo cohort: need at least one subject (n_cross={n_cross}, n_long={n_long})"
        )
    if n_long > 0 and n_timepoints < 2:
        raise AtlasflowError(
            f"demo cohort: longitudinal subjects need n_timepoints >= 2, got {n_timepoints}"
        )
    if not 0.5 <= spacing_mm <= 10.0:
        raise AtlasflowError(f"demo cohort: spacing_mm must lie in [0.5, 10] mm, got {spacing_mm}")


def _plan(seed: int, n_cross: int, n_long: int, n_timepoints: int) -> list[_SubjectPlan]:
    """Subjects, sessions and acquisition dates (controls first, then tumour subjects)."""
    total = n_cross + n_long
    width = max(2, len(str(total)))
    plans = []
    for index in range(total):
        longitudinal = index >= n_cross
        n_sessions = n_timepoints if longitudinal else 1
        rng = _rng(seed, index, _STREAM_DATES)
        baseline = dt.date(2016, 1, 1) + dt.timedelta(days=int(rng.integers(0, 6 * 365)))
        dates = [baseline]
        for _ in range(n_sessions - 1):
            dates.append(dates[-1] + dt.timedelta(days=int(rng.integers(60, 121))))
        plans.append(
            _SubjectPlan(
                index=index,
                subject=f"{index + 1:0{width}d}",
                group="tumour" if longitudinal else "control",
                sessions=[str(s + 1) for s in range(n_sessions)],
                dates=dates,
                orientation=ORIENTATIONS[index % len(ORIENTATIONS)],
            )
        )
    return plans


def _anat(subject: str, session: str, suffix: str) -> str:
    return f"sub-{subject}/ses-{session}/anat/sub-{subject}_ses-{session}_{suffix}.nii.gz"


def _truth_prefix(subject: str, session: str) -> str:
    return f"truth/sub-{subject}/ses-{session}/sub-{subject}_ses-{session}"


def demo_manifest(
    seed: int = 0, n_cross: int = 8, n_long: int = 3, n_timepoints: int = 3
) -> pd.DataFrame:
    """The manifest :func:`make_demo_cohort` writes, computed without generating any image.

    Paths are relative to the cohort folder; cells that do not apply are empty strings.
    """
    _check_arguments(seed, n_cross, n_long, n_timepoints, 2.0)
    rows = []
    for plan in _plan(seed, n_cross, n_long, n_timepoints):
        for session, date in zip(plan.sessions, plan.dates, strict=True):
            rows.append(
                {
                    "subject": plan.subject,
                    "session": session,
                    "t1w": _anat(plan.subject, session, "T1w"),
                    "labels": _anat(plan.subject, session, "dseg"),
                    "tumor_mask": _anat(plan.subject, session, "label-tumor_mask")
                    if plan.longitudinal
                    else "",
                    "acq_date": date.isoformat(),
                    "group": plan.group,
                }
            )
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


# --------------------------------------------------------------------------------- source images


@dataclass
class _Source:
    """The nilearn material at 1 mm, cropped to the brain."""

    # (X, Y, Z, 5): the MNI T1 pre-smoothed for the demo spacing, then the probabilities of
    # background, CSF, GM and WM; all are resampled together, labels are the most probable class.
    channels: Image
    brain_box: tuple[np.ndarray, np.ndarray]  # world corners (min, max) of the brain mask
    wm_level: float  # median T1 value in white matter
    tumour_seeds: np.ndarray  # world points deep in white matter, where a lesion may start
    template_grid: Grid


@functools.lru_cache(maxsize=2)
def _load_source(spacing_mm: float) -> _Source:
    """Read and prepare nilearn's files (cached: tests and repeated calls reuse it; read-only)."""
    from nilearn import datasets

    t1_nii = datasets.load_mni152_template(resolution=1)
    maps = [
        datasets.load_mni152_gm_template(resolution=1),
        datasets.load_mni152_wm_template(resolution=1),
        datasets.load_mni152_brain_mask(resolution=1),
    ]
    affine = np.asarray(t1_nii.affine, float)
    full = Image(np.asarray(t1_nii.get_fdata(), np.float32), affine)
    arrays = []
    for nii in maps:
        img = Image(np.asarray(nii.get_fdata(), np.float32), np.asarray(nii.affine, float))
        if not img.grid.same_as(full.grid):
            img = apply_transform(img, Transform.identity(), full.grid)
        arrays.append(img.data)
    gm, wm, mask = arrays
    brain = mask > 0.5
    csf = np.clip(mask - gm - wm, 0.0, 1.0)

    # Lesions start deep in white matter, far enough from the brain surface to grow.
    # (on every other voxel: 2 mm is plenty to find deep white matter, and 8 times cheaper)
    depth = ndimage.distance_transform_edt(brain[::2, ::2, ::2], sampling=2.0)
    seeds_vox = 2.0 * np.argwhere((wm[::2, ::2, ::2] > 0.9) & (depth >= 30.0)).astype(float)
    seeds = seeds_vox @ affine[:3, :3].T + affine[:3, 3]

    ijk = np.argwhere(brain)
    lo, hi = ijk.min(0), ijk.max(0)
    corners = np.array([lo, hi], float) @ affine[:3, :3].T + affine[:3, 3]
    box = (corners.min(0), corners.max(0))
    # Crop to the brain (plus a rim) so every resampling reads a smaller volume.
    lo_c = np.maximum(lo - 3, 0)
    hi_c = np.minimum(hi + 4, np.array(brain.shape))
    crop = tuple(slice(a, b) for a, b in zip(lo_c, hi_c, strict=True))
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ lo_c + affine[:3, 3]

    # Anti-aliasing: Gaussian whose FWHM makes up the difference between 1 mm and the demo voxel.
    sigma_mm = math.sqrt(max(spacing_mm**2 - 1.0, 0.0)) / 2.3548
    t1 = full.data[crop]
    if sigma_mm > 0:
        t1 = ndimage.gaussian_filter(t1, sigma_mm, mode="constant")
    channels = np.stack([t1, 1.0 - mask[crop], csf[crop], gm[crop], wm[crop]], -1)
    return _Source(
        channels=Image(np.ascontiguousarray(channels, np.float32), crop_affine),
        brain_box=box,
        wm_level=float(np.median(full.data[(wm > 0.9) & brain])),
        tumour_seeds=seeds,
        template_grid=template_grid(full, spacing_mm),
    )


def _resample_source(
    source: _Source, transform: Transform, grid: Grid
) -> tuple[np.ndarray, np.ndarray]:
    """T1 and tissue labels on ``grid`` through ``transform`` (labels: argmax of the warped
    tissue probabilities, so they are never interpolated as numbers)."""
    values = apply_transform(source.channels, transform, grid).data
    return np.ascontiguousarray(values[..., 0]), np.argmax(values[..., 1:], -1).astype(np.uint8)


# ---------------------------------------------------------------------------- random ingredients


def _smooth_field(
    rng: np.random.Generator,
    grid: Grid,
    n_components: int,
    wavelength_mm: tuple[float, float],
    rms: float,
    n_modes: int = 12,
) -> np.ndarray:
    """A smooth random field on ``grid`` (X, Y, Z, n_components): random plane waves in world mm.

    The waves live in world millimetres, so a seed gives the same field on any grid. A plane wave
    is separable along the grid axes (``omega . x = (M^T omega) . ijk + omega . t`` for the grid's
    affine ``x = M ijk + t``), so each costs one outer product instead of a cosine per voxel.
    """
    directions = rng.standard_normal((n_components, n_modes, 3))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    wavelengths = rng.uniform(*wavelength_mm, (n_components, n_modes))
    omega = directions * (2 * np.pi / wavelengths)[..., None]
    phase = rng.uniform(0, 2 * np.pi, (n_components, n_modes))
    amplitude = rng.standard_normal((n_components, n_modes)) * rms * math.sqrt(2.0 / n_modes)
    linear, offset = grid.affine[:3, :3], grid.affine[:3, 3]
    axes = [np.arange(n, dtype=np.float64) for n in grid.shape]
    out = np.zeros(tuple(grid.shape) + (n_components,), np.float32)
    for c in range(n_components):
        for k in range(n_modes):
            freq = linear.T @ omega[c, k]
            waves = [
                np.exp(1j * f * a).astype(np.complex64) for f, a in zip(freq, axes, strict=True)
            ]
            start = amplitude[c, k] * np.exp(1j * (omega[c, k] @ offset + phase[c, k]))
            term = (
                np.complex64(start)
                * waves[0][:, None, None]
                * waves[1][None, :, None]
                * waves[2][None, None, :]
            )
            out[..., c] += term.real
    return out


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_affine(
    rng: np.random.Generator,
    centre: np.ndarray,
    max_rotation_deg: float,
    scale_range: tuple[float, float],
    max_shift_mm: float,
) -> tuple[np.ndarray, dict]:
    """Rotation (about x, y, z), per-axis scaling and translation about ``centre``, as a 4x4."""
    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    scales = rng.uniform(*scale_range, 3)
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    linear = _rotation(np.deg2rad(angles)) @ np.diag(scales)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre + shift - linear @ centre
    params = {
        "rotation_deg": angles.tolist(),
        "scale": scales.tolist(),
        "translation_mm": shift.tolist(),
    }
    return affine, params


def oriented_grid(ras_grid: Grid, axcodes: str) -> Grid:
    """The same voxels as ``ras_grid`` (whose axes run R, A, S) stored in another axis order/direction."""
    source = nib.orientations.axcodes2ornt(("R", "A", "S"))
    target = nib.orientations.axcodes2ornt(tuple(axcodes))
    transform = nib.orientations.ornt_transform(source, target)
    shape = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(transform):
        shape[int(new_axis)] = ras_grid.shape[axis]
    # inv_ornt_aff maps voxel indices of the reoriented array to indices of the original one.
    affine = ras_grid.affine @ nib.orientations.inv_ornt_aff(transform, ras_grid.shape)
    return Grid(tuple(shape), affine)


def _box_grid(lo: np.ndarray, hi: np.ndarray, spacing: float) -> Grid:
    """RAS grid of isotropic ``spacing`` whose voxel centres cover the world box [lo, hi]."""
    shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing).astype(int) + 1)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = lo
    return Grid(shape, affine)


def _to_tensor(disp_world: np.ndarray, grid: Grid) -> torch.Tensor:
    vox = displacement_world_to_vox(disp_world, grid).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(vox.transpose(3, 0, 1, 2)))[None]


def _to_world(disp_vox: torch.Tensor, grid: Grid) -> np.ndarray:
    vox = disp_vox[0].permute(1, 2, 3, 0).numpy().astype(np.float64)
    return displacement_vox_to_world(vox, grid).astype(np.float32)


def _invert_small(
    forward: torch.Tensor, initial: torch.Tensor, iterations: int = 4
) -> torch.Tensor:
    """Refine the inverse of ``x -> x + f(x)`` by the fixed point ``g(z) = -f(z + g(z))``.

    Converges where the displacement gradient of ``f`` is well below one, as for the random
    inter-subject warps (the tumour flow needs no refinement: it is inverted exactly).
    """
    inverse = initial
    for _ in range(iterations):
        inverse = -warp_tensor(forward, inverse)
    return inverse


# ------------------------------------------------------------------------------------ the tumour


@dataclass
class TumourModel:
    """A lesion grown by the flow of a stationary radial velocity field in baseline world space.

    With ``s = |x - c|``, ``d`` the direction from the centre ``c`` and ``rho(d)`` an irregular
    radius (``radius_mm`` times smooth random noise on the sphere), the velocity is
    ``v(x) = (x - c) g(r)``, ``r = s / rho(d)``, ``g(r) = (1 + r^6)^(-1/2) exp(-(r / taper)^6)``:
    uniform expansion inside the source region ``r < 1``, divergence-free outside it (tissue is
    pushed outward without being compressed) and fading out beyond ``r ~ taper``. Because ``v`` is
    parallel to ``x - c``, every ray from the centre is invariant and the flow reduces to one scalar
    ODE in the normalised radius, ``dr/dtau = r g(r)``, the same for every direction; it is
    integrated exactly (RK4 on a fine table), so the mass effect is a diffeomorphism known at any
    point, its inverse is the flow backwards in time and ``flow(tau_b) o flow(tau_a)^-1 =
    flow(tau_b - tau_a)``. The lesion at flow time ``tau`` is the image of the healthy-space seed
    ``{r < seed_radius}``, i.e. the star-shaped region ``{r < lesion_radius(tau)}``; later lesions
    contain earlier ones.
    """

    centre: np.ndarray
    radius_mm: float
    shape_omega: np.ndarray  # (K, 3) plane-wave frequencies on the unit sphere
    shape_phase: np.ndarray
    shape_amplitude: np.ndarray
    taper: float = 3.5  # in units of rho(d)
    seed_radius: float = 0.5  # healthy-space seed, in units of rho(d)
    core_radius: float = 0.275  # the hypointense core, healthy-space units of rho(d)
    times: list[float] = field(default_factory=list)
    _tables: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def random(cls, rng: np.random.Generator, centre: np.ndarray) -> TumourModel:
        n_modes = 8
        directions = rng.standard_normal((n_modes, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        return cls(
            centre=np.asarray(centre, float),
            radius_mm=float(rng.uniform(8.0, 11.0)),
            shape_omega=directions * rng.uniform(1.5, 3.0, (n_modes, 1)),
            shape_phase=rng.uniform(0, 2 * np.pi, n_modes),
            shape_amplitude=rng.standard_normal(n_modes) * 0.22 * math.sqrt(2.0 / n_modes),
        )

    @property
    def reach(self) -> float:
        """Normalised radius beyond which the flow moves points by less than 1e-4 mm."""
        return 1.5 * self.taper

    def source_radius(self, directions: np.ndarray) -> np.ndarray:
        """``rho(d)`` in mm for unit ``directions`` (..., 3)."""
        # float32 is plenty for a shape factor and twice as fast on millions of points
        angles = np.asarray(directions, np.float32) @ self.shape_omega.T.astype(np.float32)
        wave = np.cos(angles + self.shape_phase.astype(np.float32)) @ self.shape_amplitude.astype(
            np.float32
        )
        return self.radius_mm * np.clip(1.0 + wave.astype(np.float64), 0.6, 1.5)

    def normalised(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalised radius ``r``, unit direction ``d`` and ``rho(d)`` of world ``points`` (..., 3).

        Points farther than the flow's reach for every direction get ``rho = max rho`` (their ``r``
        is then still beyond the reach), which saves evaluating the shape far away.
        """
        offset = np.asarray(points, np.float64) - self.centre
        s = np.linalg.norm(offset, axis=-1)
        directions = offset / np.maximum(s, 1e-9)[..., None]
        directions[s < 1e-9] = (1.0, 0.0, 0.0)
        rho = np.full(s.shape, 1.5 * self.radius_mm)
        near = s < self.reach * rho
        rho[near] = self.source_radius(directions[near])
        return s / rho, directions, rho

    def _rate(self, r: np.ndarray) -> np.ndarray:
        """``dr/dtau = r g(r)``."""
        r6 = (r * r) ** 3
        return r / np.sqrt(1.0 + r6) * np.exp(-r6 / self.taper**6)

    def velocity(self, points: np.ndarray) -> np.ndarray:
        """``v(x)`` in mm per unit flow time at world ``points`` (..., 3)."""
        r, directions, rho = self.normalised(points)
        return (self._rate(r) * rho)[..., None] * directions

    def _flow_table(self, tau: float) -> tuple[np.ndarray, np.ndarray]:
        """Start radii and where the flow takes them after ``tau`` (RK4, 128 steps), cached."""
        cache = self._tables
        if tau not in cache:
            start = np.linspace(0.0, self.reach, 2049)
            current = start.copy()
            steps = 128
            h = tau / steps
            for _ in range(steps):
                k1 = self._rate(current)
                k2 = self._rate(current + 0.5 * h * k1)
                k3 = self._rate(current + 0.5 * h * k2)
                k4 = self._rate(current + h * k3)
                current = current + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
            cache[tau] = (start, current)
        return cache[tau]

    def radial_flow(self, r: np.ndarray, tau: float) -> np.ndarray:
        """Normalised radius after flowing for ``tau`` (negative: backwards) from radius ``r``."""
        start, end = self._flow_table(float(tau))
        r = np.asarray(r, np.float64)
        return np.where(r < start[-1], np.interp(r, start, end), r)

    def flow(self, points: np.ndarray, tau: float, polar: tuple | None = None) -> np.ndarray:
        """World points (..., 3) moved by the flow for time ``tau`` (exact up to interpolation).

        ``polar`` is ``normalised(points)`` when the caller already has it.
        """
        r, directions, rho = self.normalised(points) if polar is None else polar
        moved = self.radial_flow(r, tau)
        return self.centre + (moved * rho)[..., None] * directions

    def lesion_radius(self, tau: float) -> float:
        """Normalised radius of the lesion boundary at flow time ``tau`` (the same on every ray)."""
        return float(self.radial_flow(np.array([self.seed_radius]), tau)[0])

    def core_boundary(self, tau: float) -> float:
        return float(self.radial_flow(np.array([self.core_radius]), tau)[0])

    def lesion_volume(self, tau: float, n_directions: int = 50_000) -> float:
        """Continuous lesion volume (mm^3): ``lesion_radius^3 * mean(rho^3) * 4 pi / 3``.

        The mean over the sphere uses a Fibonacci lattice (equal-area points).
        """
        k = np.arange(n_directions) + 0.5
        z = 1.0 - 2.0 * k / n_directions
        phi = np.pi * (1.0 + 5**0.5) * k
        ring = np.sqrt(1.0 - z**2)
        directions = np.stack([ring * np.cos(phi), ring * np.sin(phi), z], -1)
        mean_cube = float(np.mean(self.source_radius(directions) ** 3))
        return 4.0 / 3.0 * np.pi * mean_cube * self.lesion_radius(tau) ** 3


# ------------------------------------------------------------------------------------- rendering


@dataclass
class _Subject:
    """Everything random about one subject; sessions are rendered from it."""

    plan: _SubjectPlan
    affine: np.ndarray  # template -> subject (baseline) world
    forward_warp: np.ndarray  # u on the template grid, world mm
    inverse_warp: np.ndarray  # its inverse on the template grid
    poses: list[np.ndarray]  # head pose per session (baseline world -> session world)
    tumour: TumourModel | None
    scan: Grid
    params: dict


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass
class _Session:
    t1w: Image
    dseg: Image
    tumour_mask: Image | None
    template_to_subject: Transform  # the truth: fixed = template grid, moving = this scan


def _render_session(
    source: _Source, subject: _Subject, t: int, rng: np.random.Generator
) -> _Session:
    """Session ``t`` of ``subject``: the template seen through the subject's maps, the lesion,
    then the scanner."""
    tgrid, scan_grid, affine = source.template_grid, subject.scan, subject.affine
    forward_warp, pose = subject.forward_warp, subject.poses[t]
    tumour = None if subject.tumour is None else (subject.tumour, subject.tumour.times[t])
    pose_linear, affine_linear = pose[:3, :3], affine[:3, :3]
    scan_points = world_coordinates(scan_grid)
    baseline_points = scan_points @ np.linalg.inv(pose)[:3, :3].T + np.linalg.inv(pose)[:3, 3]

    # Scan point y -> healthy baseline point h = b + e(b), b = P^-1 y (e = 0 without a tumour).
    if tumour is not None:
        model, tau = tumour
        polar = model.normalised(baseline_points)
        healthy = model.flow(baseline_points, -tau, polar)
        first = (healthy - baseline_points) @ pose_linear.T
    else:
        first = np.zeros(scan_grid.shape + (3,), np.float32)

    # Scan point -> template point: x = A^-1 h + w(A^-1 h) written as (P A)^-1 (y + D(y)).
    to_template_affine = np.linalg.inv(pose @ affine)
    warp_at = apply_transform(
        Image(subject.inverse_warp, tgrid.affine),
        Transform(to_template_affine, Image(first, scan_grid.affine)),
        scan_grid,
    ).data
    displacement = first + warp_at @ (pose_linear @ affine_linear).T
    subject_to_template = Transform(
        to_template_affine, Image(displacement.astype(np.float32), scan_grid.affine)
    )

    # Template point -> scan point: y = P (Phi(A (x + u(x)))) = P A (x + W(x)).
    template_warp = forward_warp
    if tumour is not None:
        model, tau = tumour
        subject_points = (world_coordinates(tgrid) + forward_warp) @ affine_linear.T + affine[:3, 3]
        mass = model.flow(subject_points, tau) - subject_points
        template_warp = forward_warp + mass @ np.linalg.inv(affine_linear).T
    template_to_subject = Transform(
        pose @ affine, Image(template_warp.astype(np.float32), tgrid.affine)
    )

    anatomy, dseg = _resample_source(source, subject_to_template, scan_grid)
    anatomy /= source.wm_level

    mask = None
    if tumour is not None:
        model, tau = tumour
        r = polar[0]
        boundary = model.lesion_radius(tau)
        mask = r < boundary
        # Partial volume over about one voxel: (boundary - r) / |grad r| is a distance in voxels.
        grad = np.linalg.norm(np.stack(np.gradient(r), -1), axis=-1) + 1e-6
        inside = _sigmoid((boundary - r) / grad / 0.3)
        core = _sigmoid((model.core_boundary(tau) - r) / grad / 0.3)
        baseline_grid = Grid(scan_grid.shape, np.linalg.inv(pose) @ scan_grid.affine)
        texture = _smooth_field(rng, baseline_grid, 1, (6.0, 15.0), 1.0, 8)[..., 0]
        lesion = core * 0.35 * (1 + 0.15 * texture) + (1 - core) * 1.25 * (1 + 0.06 * texture)
        anatomy = (1 - inside) * anatomy + inside * lesion
        dseg[mask] = TUMOUR_LABEL

    # Scanner: contrast, gain, smooth bias fixed to the scanner frame, Rician noise.
    bias = np.exp(_smooth_field(rng, scan_grid, 1, (150.0, 400.0), 0.12, 6)[..., 0])
    params = subject.params
    signal = params["gain"] * np.clip(anatomy, 0, None) ** params["gamma"] * bias
    sigma = params["noise"] * params["gain"]
    real = signal + sigma * rng.standard_normal(signal.shape)
    imag = sigma * rng.standard_normal(signal.shape)
    t1w = np.clip(np.rint(np.sqrt(real**2 + imag**2)), 0, 65535).astype(np.uint16)

    return _Session(
        t1w=Image(t1w, scan_grid.affine.copy()),
        dseg=Image(dseg, scan_grid.affine.copy()),
        tumour_mask=None if mask is None else Image(mask.astype(np.uint8), scan_grid.affine.copy()),
        template_to_subject=template_to_subject,
    )


# ------------------------------------------------------------------------------------- the cohort


def _coarse_grid(source: _Source) -> tuple[Grid, int]:
    """The ~4 mm grid the subjects' smooth velocity fields are drawn and integrated on."""
    grid = source.template_grid
    factor = max(1, round(4.0 / float(grid.spacing[0])))
    coarse_affine = grid.affine @ np.diag([factor, factor, factor, 1.0])
    return Grid(tuple(int(np.ceil((n - 1) / factor)) + 1 for n in grid.shape), coarse_affine), factor


def _subject_velocity(source: _Source, rng: np.random.Generator) -> np.ndarray:
    """A smooth random stationary velocity field (world mm) on the coarse grid."""
    return _smooth_field(rng, _coarse_grid(source)[0], 3, (40.0, 110.0), 2.0)


def _subject_warp(source: _Source, velocity_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """exp(velocity) on the template grid: forward u and refined inverse w (world mm).

    The field is smooth (wavelengths >= 40 mm), so it is integrated on a grid of about 4 mm and
    interpolated onto the template grid: the same diffeomorphism, 8 times cheaper at 2 mm.
    """
    grid = source.template_grid
    coarse, factor = _coarse_grid(source)
    velocity = _to_tensor(velocity_world, coarse)
    forward = integrate_velocity(velocity)
    inverse = _invert_small(forward, integrate_velocity(-velocity))
    fields = []
    for disp in (forward, inverse):
        world = Image(_to_world(disp, coarse), coarse.affine)
        fields.append(
            world.data if factor == 1 else apply_transform(world, Transform.identity(), grid).data
        )
    return fields[0], fields[1]


def _anatomy_draws(
    source: _Source, plan: _SubjectPlan, seed: int
) -> tuple[np.ndarray, dict, np.ndarray, np.random.Generator]:
    """One subject's random affine (with its parameters) and velocity field, from its own stream
    (returned too: the scanner's draws follow on it)."""
    brain_centre = 0.5 * (source.brain_box[0] + source.brain_box[1])
    rng = _rng(seed, plan.index, _STREAM_ANATOMY)
    affine, affine_params = _random_affine(rng, brain_centre, 10.0, (0.9, 1.1), 10.0)
    return affine, affine_params, _subject_velocity(source, rng), rng


def _scan_grid(
    source: _Source,
    maps: Sequence[np.ndarray],
    spacing: float,
    orientation: str,
    rng: np.random.Generator,
) -> Grid:
    """Scanner grid covering the brain under every template->scan affine in ``maps``."""
    lo, hi = source.brain_box
    margin = 12.0
    corners = np.array(
        [
            [x, y, z]
            for x in (lo[0] - margin, hi[0] + margin)
            for y in (lo[1] - margin, hi[1] + margin)
            for z in (lo[2] - margin, hi[2] + margin)
        ]
    )
    mapped = np.concatenate([corners @ m[:3, :3].T + m[:3, 3] for m in maps])
    extra = rng.uniform(0.0, 8.0, (2, 3))
    ras = _box_grid(mapped.min(0) - extra[0], mapped.max(0) + extra[1], spacing)
    return oriented_grid(ras, orientation)


def _quantised(displacement: np.ndarray) -> np.ndarray:
    """Round to 1/1024 mm: far below any error that matters, and the files compress much better."""
    return (np.round(np.asarray(displacement, np.float64) * 1024.0) / 1024.0).astype(np.float32)


def _save_transform(transform: Transform, prefix: str) -> None:
    quantised = Transform(
        transform.affine,
        Image(_quantised(transform.displacement.data), transform.displacement.affine),
    )
    save_transform(quantised, f"{prefix}_xfm.mat", f"{prefix}_xfm.nii.gz")


def _draw_subject(
    source: _Source,
    plan: _SubjectPlan,
    seed: int,
    spacing_mm: float,
    anatomy: tuple[np.ndarray, dict, np.ndarray, np.random.Generator],
) -> _Subject:
    """One subject's anatomy (its :func:`_anatomy_draws`, the velocity possibly centred, see
    :func:`make_demo_cohort`), tumour and scanner."""
    tgrid = source.template_grid
    brain_centre = 0.5 * (source.brain_box[0] + source.brain_box[1])
    affine, affine_params, velocity, rng = anatomy
    forward_warp, inverse_warp = _subject_warp(source, velocity)
    params = {
        "group": plan.group,
        "orientation": plan.orientation,
        "affine_template_to_subject": np.round(affine, 6).tolist(),
        **affine_params,
        "gain": float(rng.uniform(900.0, 1500.0)),
        "gamma": float(rng.uniform(0.85, 1.15)),
        "noise": float(rng.uniform(0.015, 0.03)),
        "max_warp_mm": round(float(np.linalg.norm(forward_warp, axis=-1).max()), 3),
    }
    poses = [np.eye(4)]
    tumour = None
    if plan.longitudinal:
        rng = _rng(seed, plan.index, _STREAM_TUMOUR)
        head_centre = affine[:3, :3] @ brain_centre + affine[:3, 3]
        for _ in plan.sessions[1:]:
            poses.append(_random_affine(rng, head_centre, 3.0, (1.0, 1.0), 3.0)[0])
        seed_point = source.tumour_seeds[int(rng.integers(len(source.tumour_seeds)))]
        seed_vox = np.linalg.solve(tgrid.affine, np.append(seed_point, 1.0))[:3]
        seed_warp = sample_voxels(forward_warp, seed_vox[None])[0]
        centre = affine[:3, :3] @ (seed_point + seed_warp) + affine[:3, 3]
        tumour = TumourModel.random(rng, centre)
        rate = float(rng.uniform(0.004, 0.007))  # flow time per day
        start = float(rng.uniform(1.2, 1.5))
        tumour.times = [start + rate * (d - plan.dates[0]).days for d in plan.dates]
        params["tumour"] = {
            "centre_template_mm": np.round(seed_point, 3).tolist(),
            "centre_baseline_mm": np.round(centre, 3).tolist(),
            "source_radius_mm": tumour.radius_mm,
            "flow_time_per_day": rate,
            "flow_times": tumour.times,
            "head_poses": [np.round(p, 6).tolist() for p in poses],
        }
    scan = _scan_grid(
        source,
        [p @ affine for p in poses],
        spacing_mm,
        plan.orientation,
        _rng(seed, plan.index, _STREAM_SCAN),
    )
    return _Subject(plan, affine, forward_warp, inverse_warp, poses, tumour, scan, params)


def _write_subject(out_dir: Path, source: _Source, subject: _Subject, seed: int) -> list[dict]:
    """Render and write every session of one subject with its truth; return its volume rows."""
    plan, tumour = subject.plan, subject.tumour
    volume_rows: list[dict] = []
    for t, session in enumerate(plan.sessions):
        rendered = _render_session(source, subject, t, _rng(seed, plan.index, _STREAM_SCAN + 1 + t))
        save_image(rendered.t1w, out_dir / _anat(plan.subject, session, "T1w"), dtype=np.uint16)
        save_image(rendered.dseg, out_dir / _anat(plan.subject, session, "dseg"), dtype=np.uint8)
        prefix = str(out_dir / _truth_prefix(plan.subject, session))
        _save_transform(rendered.template_to_subject, f"{prefix}_from-T1w_to-template_mode-image")
        if tumour is None:
            continue
        save_image(
            rendered.tumour_mask,
            out_dir / _anat(plan.subject, session, "label-tumor_mask"),
            dtype=np.uint8,
        )
        if t > 0:
            # flow(tau_t) o flow(tau_1)^-1 = flow(tau_t - tau_1): exact, on the baseline grid.
            points = world_coordinates(subject.scan)
            mass = tumour.flow(points, tumour.times[t] - tumour.times[0]) - points
            _save_transform(
                Transform(subject.poses[t], Image(mass, subject.scan.affine)),
                f"{prefix}_from-T1w_to-baseline_mode-image",
            )
        voxel_mm3 = float(abs(np.linalg.det(subject.scan.affine[:3, :3])))
        volume = float(rendered.tumour_mask.data.sum()) * voxel_mm3
        true_volume = tumour.lesion_volume(tumour.times[t])
        if t == 0:
            baseline = (volume, true_volume)
        volume_rows.append(
            {
                "subject": plan.subject,
                "session": session,
                "acq_date": plan.dates[t].isoformat(),
                "days": (plan.dates[t] - plan.dates[0]).days,
                "volume_mm3": round(volume, 3),
                "volume_change_mm3": round(volume - baseline[0], 3),
                "true_volume_mm3": round(true_volume, 3),
                "true_volume_change_mm3": round(true_volume - baseline[1], 3),
            }
        )
    return volume_rows


def make_demo_cohort(
    out_dir: Path,
    *,
    seed: int = 0,
    n_cross: int = 8,
    n_long: int = 3,
    n_timepoints: int = 3,
    spacing_mm: float = 2.0,
) -> Path:
    """Write the demo cohort (BIDS-like) and its ground truth under ``out_dir``; return the manifest.

    Same arguments give byte-identical files. Layout (paths in the manifest are relative to
    ``out_dir``): ``manifest.csv``, ``dseg.tsv``, ``participants.tsv``, ``dataset_description.json``,
    ``sub-XX/sub-XX_sessions.tsv``, ``sub-XX/ses-N/anat/sub-XX_ses-N_{T1w,dseg,label-tumor_mask}.nii.gz``
    and ``truth/`` (described in ``truth/README.md``, the text of :data:`TRUTH_README`).
    """
    _check_arguments(seed, n_cross, n_long, n_timepoints, spacing_mm)
    out_dir = Path(out_dir)
    source = _load_source(float(spacing_mm))
    tgrid = source.template_grid
    template, template_dseg = _resample_source(source, Transform.identity(), tgrid)
    save_image(
        Image(template, tgrid.affine), out_dir / "truth/template_T1w.nii.gz", dtype=np.float32
    )
    save_image(
        Image(template_dseg, tgrid.affine), out_dir / "truth/template_dseg.nii.gz", dtype=np.uint8
    )

    plans = _plan(seed, n_cross, n_long, n_timepoints)
    # The controls' velocity fields are centred on their mean, so that the true template is the
    # centre of the control group (the atlas members), the point an unbiased atlas converges to.
    # Drawn independently, 5 fields keep a mean of ~45 % of their own size: the cohort's centre
    # would then be a warped template, and no atlas could approach the true one.
    draws = {plan.index: _anatomy_draws(source, plan, seed) for plan in plans}
    controls = [plan.index for plan in plans if not plan.longitudinal]
    if len(controls) > 1:
        centre = np.mean([draws[i][2] for i in controls], axis=0)
        for i in controls:
            affine, params, velocity, rng = draws[i]
            draws[i] = (affine, params, velocity - centre, rng)
    parameters: dict[str, dict] = {}
    volume_rows: list[dict] = []
    for plan in plans:
        subject = _draw_subject(source, plan, seed, spacing_mm, draws[plan.index])
        parameters[f"sub-{plan.subject}"] = subject.params
        volume_rows += _write_subject(out_dir, source, subject, seed)

    _write_tables(
        out_dir, plans, seed, n_cross, n_long, n_timepoints, spacing_mm, parameters, volume_rows
    )
    return out_dir / "manifest.csv"


# ---------------------------------------------------------------------------------------- tables


def _tsv(frame: pd.DataFrame) -> str:
    return frame.to_csv(sep="\t", index=False, lineterminator="\n")


def _write_tables(
    out_dir: Path,
    plans: list[_SubjectPlan],
    seed: int,
    n_cross: int,
    n_long: int,
    n_timepoints: int,
    spacing_mm: float,
    parameters: dict,
    volume_rows: list[dict],
) -> None:
    manifest = demo_manifest(seed, n_cross, n_long, n_timepoints)
    atomic_write_text(
        out_dir / "dseg.tsv",
        _tsv(
            pd.DataFrame(
                [{"index": i, "name": name, "abbreviation": abbr} for i, abbr, name in DSEG_LABELS]
            )
        ),
    )
    atomic_write_text(
        out_dir / "participants.tsv",
        _tsv(
            pd.DataFrame([{"participant_id": f"sub-{p.subject}", "group": p.group} for p in plans])
        ),
    )
    for plan in plans:
        sessions = pd.DataFrame(
            {
                "session_id": [f"ses-{s}" for s in plan.sessions],
                "acq_time": [d.isoformat() for d in plan.dates],
            }
        )
        atomic_write_text(
            out_dir / f"sub-{plan.subject}/sub-{plan.subject}_sessions.tsv", _tsv(sessions)
        )
    description = {
        "Name": "atlasflow demo cohort (synthetic, from the MNI152 2009 template shipped with nilearn)",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": [
            {
                "Name": "atlasflow.synth.demo.make_demo_cohort",
                "Description": f"seed={seed} n_cross={n_cross} n_long={n_long} "
                f"n_timepoints={n_timepoints} spacing_mm={spacing_mm}",
            }
        ],
    }
    atomic_write_text(
        out_dir / "dataset_description.json", json.dumps(description, indent=2) + "\n"
    )
    volumes = pd.DataFrame(
        volume_rows,
        columns=[
            "subject",
            "session",
            "acq_date",
            "days",
            "volume_mm3",
            "volume_change_mm3",
            "true_volume_mm3",
            "true_volume_change_mm3",
        ],
    )
    atomic_write_text(out_dir / "truth/tumor_volumes.tsv", _tsv(volumes))
    atomic_write_text(
        out_dir / "truth/parameters.json", json.dumps(parameters, indent=1, sort_keys=True) + "\n"
    )
    atomic_write_text(out_dir / "truth/README.md", TRUTH_README)
    # The manifest last: its presence means the cohort is complete.
    atomic_write_text(out_dir / "manifest.csv", manifest.to_csv(index=False, lineterminator="\n"))


TRUTH_README = """\
# Ground truth of the atlasflow demo cohort

Written by `atlasflow.synth.demo.make_demo_cohort`; every file is a deterministic function of the
arguments recorded in `../dataset_description.json`. World coordinates are RAS millimetres.
Transforms follow atlasflow's `Transform` (and ITK/ANTs): a map from FIXED grid points to MOVING
world points, `y = affine @ (x + displacement(x))`, stored as an ITK affine `.mat` plus an ITK
displacement field (LPS mm) on the fixed grid; read them with `atlasflow.transforms.load_transform`
or give them to ANTs as `[..._xfm.nii.gz, ..._xfm.mat]`.

## Files

- `template_T1w.nii.gz`, `template_dseg.nii.gz`: the true template, nilearn's MNI152 2009 T1
  brain (smoothed to the demo voxel size) and its tissue labels on the template grid, the grid of
  `atlasflow.preprocess.reference.template_grid(mni, spacing)`, on which `atlasflow.preprocess.reference.prepare_template`
  also writes the pipeline's MNI template (which is intensity-normalised differently).
- `sub-XX/ses-N/sub-XX_ses-N_from-T1w_to-template_mode-image_xfm.{mat,nii.gz}`: the true
  template -> subject map. FIXED = template grid, MOVING = the scan `sub-XX_ses-N_T1w`:
  a template point `x` sits at `y = affine @ (x + W(x))` in the scan's world space.
  `apply_transform(scan, transform, template_grid)` brings the scan into template space
  (ANTs: `ants.apply_transforms(template, scan, [warp, mat])`); it is what a perfect
  registration of the scan (moving) to the template (fixed) returns.
  Controls: `affine = A` (random affine), `W = u` (random diffeomorphism).
  Tumour subjects: `y = P_N(Phi_N(A (x + u(x))))` with the tumour flow `Phi_N` of session N and
  the head pose `P_N` of the session (`P_1` = identity): `affine = P_N A`,
  `W = u + A^-1 (Phi_N - id)(A (x + u))`. Inside the tumour this maps the template's healthy
  white matter onto the lesion.
- tumour subjects, follow-up sessions N >= 2:
  `sub-XX_ses-N_from-T1w_to-baseline_mode-image_xfm.{mat,nii.gz}`: the true follow-up ->
  baseline map. FIXED = baseline (ses-1) scan grid, MOVING = the ses-N scan:
  `y_N = P_N (x + m(x))`, `x + m(x) = Phi_N(Phi_1^-1(x))` the mass effect (the tumour's growth
  between ses-1 and ses-N, exact) and `P_N` the rigid change of head pose. It maps the baseline
  tumour onto the ses-N tumour, so `jacobian_determinant(m)` is the local volume ratio
  ses-N / baseline and its integral over the baseline tumour is the ses-N tumour volume
  (`log` of it is the true log-Jacobian map on the baseline grid).
- `tumor_volumes.tsv`: per tumour subject and session: `days` since baseline,
  `volume_mm3` = voxels of the tumour mask x voxel volume, `volume_change_mm3` the same minus
  baseline, `true_volume_mm3` / `true_volume_change_mm3` the continuous lesion volume (exact
  formula below) that the masks discretise.
- `parameters.json`: the random draws per subject (affine and its rotation/scale/translation,
  largest warp displacement, orientation, scanner gain/gamma/noise, tumour centre in template and
  baseline space, source radius, flow times, head poses).

## Generative model

Every subject: `u` is the exponential (scaling and squaring) of a smooth random stationary velocity
field (12 plane waves per component, wavelengths 40-110 mm, 2 mm rms per component); the control
subjects' fields are centred on their mean (when there are two or more), so the true template is
the centre of the control group, where an unbiased atlas of those subjects belongs; `A` a random
affine about the brain centre (rotations up to 10 degrees per axis, scales 0.9-1.1 per axis, shifts
up to 10 mm). Each subject's scan grid covers its brain with a margin, at the demo spacing, stored
in one of the orientations RAS, LPS, PSR, LAS (cycled over subjects; the same image in world
space). Intensity: MNI T1 / its white-matter median, raised to a gamma (0.85-1.15), times a gain
(900-1500) and a smooth multiplicative bias field fixed to the scanner (about 12 % rms, new at
every session), plus Rician noise (1.5-3 % of the gain), stored as uint16.

Tumour subjects: a seed point deep in template white matter (>= 30 mm from the brain edge) is
carried into the subject (centre `c`). With `s = |x - c|`, `d` the direction from `c`,
`rho(d)` an irregular radius (8-11 mm times smooth noise on the sphere, clipped to 0.6-1.5) and
`r = s / rho(d)`, the velocity is `v(x) = (x - c) (1 + r^6)^(-1/2) exp(-(r / 3.5)^6)`: uniform
expansion for `r < 1`, nearly divergence-free beyond (tissue pushed outward, not compressed),
fading out beyond `r ~ 3.5`. Rays from `c` are invariant, so the flow is one ODE in `r`,
integrated with RK4: `Phi_N = flow(tau_N)`, `Phi_N^-1 = flow(-tau_N)`, and
`Phi_N Phi_1^-1 = flow(tau_N - tau_1)`. The lesion at session N is the image of the seed
`{r < 0.5}`, i.e. `{r < R(tau_N)}` with `R` the seed radius carried by the flow, so its volume is
`R(tau)^3 * (4 pi / 3) * mean over the sphere of rho(d)^3`. `tau` grows linearly with the days
since baseline (baseline 1.2-1.5, then 0.004-0.007 per day). Intensity: dark core (the image of
`{r < 0.275}`), bright rim, textured, with a one-voxel partial-volume edge. The tumour mask is
`{r < R(tau_N)}` at voxel centres; `dseg` label 4 marks the same voxels.

## Label table (`../dseg.tsv`)

0 background, 1 CSF, 2 GM, 3 WM, 4 tumour. From nilearn's maps: background = 1 - brain mask,
CSF = brain mask - GM - WM (clipped at 0), GM and WM probabilities. Every label map (template and
scans) is the most probable class after resampling these probabilities through the same map as
the T1 image, so labels are never interpolated as numbers; in tumour scans the tumour mask
overrides the tissue label.
"""
