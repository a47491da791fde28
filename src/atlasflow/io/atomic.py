"""Atomic file writes: a file appears under its final name complete or not at all.

Every writer in atlasflow (images, ITK transforms, model weights, JSON and tables) goes through
:func:`atomic_file`, so an interrupted job never leaves a half-written output that Snakemake or a
later step could take for a finished one. Torch-free and numpy-free.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sibling_tempfile(path: Path, suffix: str = "") -> str:
    """A new empty file beside ``path`` for an atomic write (renamed over ``path`` once complete).

    It gets the permissions a plain ``open()`` would give (0666 less the umask): mkstemp's 0600
    would hide every output from the rest of a lab's group.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    umask = os.umask(0o022)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    return tmp


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends
    without an exception, removed in every case otherwise. ``suffix``: for writers that pick the
    format by the file name (``.nii.gz``, ``.mat``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_tempfile(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_file(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
    return Path(path)
