"""Shared pytest fixtures: a tiny in-memory volume and the optional real data in ../shared/data.

Fixtures only: the plain helpers that test files import live in factories.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from factories import SHARED_DATA, blob_image

from atlasflow.io.images import Image


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real scans in ../shared/data; tests using it skip when it is absent (a user's clone)."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real data folder {SHARED_DATA} is absent; skipping tests that need it")
    return SHARED_DATA


@pytest.fixture
def blob() -> Image:
    """:func:`factories.blob_image` with its defaults."""
    return blob_image()
