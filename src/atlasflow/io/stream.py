"""Streaming reads of a NIfTI file's raw bytes: the voxels chunk by chunk, and the header as written.

:mod:`atlasflow.io.images` is the reader for work on images: it loads a whole volume into memory.
Validation needs something else: to look at every voxel of every scan of a cohort before any job
runs, which must be fast and bounded in memory whatever the image size. :func:`voxel_chunks`
therefore decompresses a file once, in chunks, and hands the raw stored voxels to the caller (who
may stop early), verifying the gzip stream's checksum and length on the way. :func:`raw_pixdim`
gives the voxel sizes as written, before nibabel's repairs.

Problems are raised as :class:`InvalidFile`, whose message leaves out the file name (the caller
adds the file and, for a cohort, its row).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np

# Decompressed bytes handed to numpy per step: bounded memory whatever the image size.
_CHUNK = 1 << 22


class InvalidFile(Exception):
    """A problem with one file, message without the file (or row) prefix."""


def decompressed_chunks(fh: IO[bytes]) -> Iterator[bytes]:
    """Stream a (possibly multi-member) gzip file; zlib verifies each member's CRC and length."""
    inflater: Any = zlib.decompressobj(31)
    pending = b""
    while True:
        if inflater is None:  # between gzip members: another member, zero padding, or the end
            if len(pending) < 2:
                more = fh.read(1 << 20)
                if more:
                    pending += more
                    continue
                if pending.strip(b"\x00"):
                    raise InvalidFile("unexpected bytes after the end of the gzip stream")
                return
            if pending.startswith(b"\x1f\x8b"):
                inflater = zlib.decompressobj(31)
            elif pending[0] == 0:
                pending = pending.lstrip(b"\x00")
                continue
            else:
                raise InvalidFile("unexpected bytes after the end of the gzip stream")
        if not pending:
            pending = fh.read(1 << 20)
            if not pending:
                tail = inflater.flush()
                if tail:
                    yield tail
                if not inflater.eof:
                    raise InvalidFile(
                        "is truncated: the gzip stream ends early (incomplete download or copy?)"
                    )
                return
        try:
            out = inflater.decompress(pending, _CHUNK)
        except zlib.error as exc:
            raise InvalidFile(f"compressed data are corrupt (zlib: {exc})") from None
        pending = inflater.unconsumed_tail
        if out:
            yield out
        if inflater.eof:
            pending = inflater.unused_data + pending
            inflater = None


def plain_chunks(fh: IO[bytes]) -> Iterator[bytes]:
    """An uncompressed file in chunks of bounded size."""
    while block := fh.read(_CHUNK):
        yield block


def voxel_chunks(path: Path, dtype: np.dtype, offset: int, count: int) -> Iterator[np.ndarray]:
    """The ``count`` stored voxels of ``dtype`` from byte ``offset`` of the (decompressed) file.

    Yields 1-D arrays as stored (no intensity scaling; ``dtype`` carries the header's byte order),
    each a view of at most a few MB. A ``.gz`` file is read to its end so that its checksum is
    verified; a plain file is read only as far as its voxels. A caller that stops early reads no
    further. Raises :class:`InvalidFile` for an unreadable, corrupt or truncated file.
    """
    itemsize = dtype.itemsize
    need = count * itemsize
    gz = path.name.lower().endswith(".gz")
    skip, got, carry = offset, 0, b""
    try:
        with open(path, "rb") as fh:
            for block in decompressed_chunks(fh) if gz else plain_chunks(fh):
                if skip:
                    if len(block) <= skip:
                        skip -= len(block)
                        continue
                    block, skip = block[skip:], 0
                if got < need:
                    take = block[: need - got]
                    got += len(take)
                    data = carry + take if carry else take
                    whole = len(data) - len(data) % itemsize
                    if whole:
                        yield np.frombuffer(data, dtype=dtype, count=whole // itemsize)
                    carry = data[whole:]
                elif not gz:
                    break  # plain file: nothing left to verify
    except OSError as exc:
        raise InvalidFile(f"cannot be read ({exc.strerror or exc})") from None
    if got < need:
        raise InvalidFile(
            f"is truncated: {got} of the {need} bytes of image data are present "
            "(incomplete download or copy?)"
        )


def raw_pixdim(path: Path, header_class: type[nib.Nifti1Header]) -> np.ndarray:
    """pixdim[1:4] as written: nibabel silently replaces 0 by 1 and negatives by their absolute value."""
    try:
        with nib.openers.ImageOpener(str(path)) as fh:
            raw = fh.read(header_class.template_dtype.itemsize)
        header = header_class(raw, check=False)
        return np.asarray(header["pixdim"][1:4], dtype=float)
    except Exception as exc:  # callers have parsed the header once; this only guards odd files
        raise InvalidFile(f"header cannot be read ({type(exc).__name__}: {exc})") from None
