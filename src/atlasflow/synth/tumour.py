"""The demo cohort's tumour: a lesion grown by the flow of a radial velocity field.

Owns :class:`TumourModel`: its random shape, the exact flow (and so the mass effect and its
inverse at any flow time), the lesion boundary and the continuous lesion volume, and
:class:`LesionView`, the lesion of one session seen on one scan grid (what every contrast's
rendering of it starts from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass
class LesionView:
    """The lesion of one session on one scan grid: the anatomy each contrast renders differently."""

    mask: np.ndarray  # voxel centres inside the lesion (the tumour mask)
    inside: np.ndarray  # lesion weight in [0, 1], a partial-volume edge of about one voxel
    core: np.ndarray  # weight of the core (the image of the healthy-space {r < core_radius})
    texture: np.ndarray  # smooth texture (unit rms) in baseline world: the same on every grid
    radius: np.ndarray  # normalised radius r of each voxel
    boundary: float  # the lesion boundary in r


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

    def view(self, r: np.ndarray, tau: float, texture: np.ndarray) -> LesionView:
        """The lesion at flow time ``tau`` on a grid whose voxels have normalised radius ``r``."""
        boundary = self.lesion_radius(tau)
        # Partial volume over about one voxel: (boundary - r) / |grad r| is a distance in voxels.
        grad = np.linalg.norm(np.stack(np.gradient(r), -1), axis=-1) + 1e-6
        return LesionView(
            mask=r < boundary,
            inside=sigmoid((boundary - r) / grad / 0.3),
            core=sigmoid((self.core_boundary(tau) - r) / grad / 0.3),
            texture=texture,
            radius=r,
            boundary=boundary,
        )

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
