"""Shared pytest fixtures: tiny in-memory volumes and the optional real data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from atlasflow.io.images import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ATLASFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real scans in ../shared/data; tests using it skip when it is absent (a user's clone)."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real data folder {SHARED_DATA} is absent; skipping tests that need it")
    return SHARED_DATA


def blob_image(shape=(24, 28, 20), spacing=2.0, seed=0) -> Image:
    """A smooth ellipsoidal 'brain' with internal structure, for fast numerical tests."""
    rng = np.random.default_rng(seed)
    ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    r = np.sqrt(((ijk / np.array([0.8, 0.85, 0.75])) ** 2).sum(-1))
    data = np.clip(1.2 - r, 0, None) + 0.3 * np.sin(4 * ijk[..., 0]) * (r < 0.9)
    data = data + 0.01 * rng.standard_normal(shape)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.array(shape) - 1) / 2
    return Image(data.astype(np.float32), affine)


@pytest.fixture
def blob() -> Image:
    return blob_image()
