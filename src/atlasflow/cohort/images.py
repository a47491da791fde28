"""Per-image checks of a cohort: header facts, voxel checks per role, grids, and their cache.

:func:`validate_image` checks one NIfTI file for the role it plays (``t1w``, ``labels``,
``tumor_mask``, ``brain_mask``): header checks read only the header (through
:func:`atlasflow.io.images.load_header`); with ``check_data`` the voxels are streamed once (one
decompression, which also verifies the gzip checksum; :mod:`atlasflow.cohort.voxels`) to find
truncation, NaN/Inf, constant images, non-integer labels, non-binary or empty brain masks and
tumour masks with values that are not tumour labels.
:func:`validate_images` does the same for many files, the voxel passes in a few threads.
:func:`grid_mismatch` says whether a mask or label map lies on its reference scan's grid. Results are
cached in memory by (path, size, mtime).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from atlasflow.cohort.columns import IMAGE_COLUMNS
from atlasflow.cohort.voxels import VoxelStats, role_problem, voxel_stats
from atlasflow.errors import AtlasflowError, one_line
from atlasflow.io.images import Grid, load_header
from atlasflow.io.stream import InvalidFile, raw_pixdim
from atlasflow.longitudinal.compartments import TumourLabels

#: Largest voxel size accepted (mm): beyond it a header is wrong (units, pixdim) rather than coarse.
MAX_VOXEL_MM = 20.0
#: How far (in voxels) a mask's or label map's grid may sit from its T1w scan's and still match.
_GRID_TOLERANCE_VOXELS = 0.01


@dataclass(frozen=True, eq=False)
class ImageInfo:
    """Header facts of one checked NIfTI file (plus voxel statistics when data were checked)."""

    path: Path
    shape: tuple[int, int, int]  # spatial shape (a trailing singleton dimension dropped)
    affine: np.ndarray  # voxel -> world (RAS mm), as nibabel/load_image sees it
    dtype: np.dtype  # on-disk voxel type
    header: nib.Nifti1Header
    data_offset: int  # byte where the voxels start (in the decompressed stream)
    scaling: tuple[float, float]  # (slope, intercept) applied to the stored values, as nibabel does
    stats: VoxelStats | None = None

    @property
    def grid(self) -> Grid:
        return Grid(self.shape, self.affine)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.grid.spacing)


# (absolute path, size, mtime_ns) -> ImageInfo; bounded, in memory only.
_CACHE: OrderedDict[tuple[str, int, int], ImageInfo] = OrderedDict()
_CACHE_SIZE = 20000
_CACHE_LOCK = threading.Lock()


def clear_image_cache() -> None:
    """Forget every checked file (tests, and callers that rewrite files within one mtime tick)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _cache_key(path: Path, st: os.stat_result) -> tuple[str, int, int]:
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _remember(key: tuple[str, int, int], info: ImageInfo) -> None:
    with _CACHE_LOCK:
        _CACHE[key] = info
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)


def validate_image(
    path: str | os.PathLike,
    role: str,
    row_label: str = "",
    check_data: bool = True,
    tumor_labels: TumourLabels | None = None,
) -> ImageInfo:
    """Check one NIfTI file for its role; return its header facts or raise AtlasflowError.

    ``role`` is one of :data:`IMAGE_COLUMNS`. Header checks: readable NIfTI, 3-D (a trailing
    singleton dimension is fine), real-valued voxel type, voxel size in (0, 20] mm in both the raw
    header and the affine, a non-degenerate affine, valid intensity scaling, an uncompressed file
    long enough for its data. ``check_data`` adds one streaming pass over the voxels: complete gzip
    stream with a valid checksum, enough data, finite values, and per role: t1w not constant;
    labels whole, non-negative numbers with some label; brain masks 0/1 only and not empty; tumour
    masks 0 and 1 or the compartment labels of ``tumor_labels`` (None: the BraTS default).
    """
    if role not in IMAGE_COLUMNS:
        raise ValueError(f"unknown image role {role!r}; expected one of {IMAGE_COLUMNS}")
    path = Path(path)
    prefix = f"{row_label}: {role} {path}" if row_label else f"{role} {path}"
    try:
        info = _image_facts(path, check_data)
        problem = role_problem(info.stats if check_data else None, role, tumor_labels)
    except InvalidFile as exc:
        raise AtlasflowError(f"{prefix}: {one_line(str(exc))}") from None
    if problem:
        raise AtlasflowError(f"{prefix}: {problem}")
    return info


def _image_facts(path: Path, check_data: bool) -> ImageInfo:
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise InvalidFile("expected a NIfTI file ending in .nii or .nii.gz")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidFile("file not found") from None
    except OSError as exc:
        raise InvalidFile(f"cannot be read ({exc.strerror or exc})") from None
    if not os.path.isfile(path):
        raise InvalidFile("is a folder, expected a NIfTI file")
    if name.endswith(".nii") and _gzipped(path):
        raise InvalidFile("is gzip-compressed but named .nii: rename it to .nii.gz")
    key = _cache_key(path, st)
    with _CACHE_LOCK:
        info = _CACHE.get(key)
    if info is None:
        info = _header_facts(path, st.st_size)
    if check_data and info.stats is None:
        info = dataclasses.replace(info, stats=_voxel_stats(path, info))
    _remember(key, info)
    return info


def _gzipped(path: Path) -> bool:
    """Whether the file starts with the gzip magic bytes."""
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _voxel_stats(path: Path, info: ImageInfo) -> VoxelStats:
    """The voxel statistics of ``path``, whose header facts are ``info``."""
    return voxel_stats(path, info.dtype, info.data_offset, info.shape, info.scaling)


def _workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def validate_images(
    jobs: list[tuple[str | os.PathLike, str, str]],
    check_data: bool = True,
    problems: list[str] | None = None,
    tumor_labels: TumourLabels | None = None,
) -> list[ImageInfo | None]:
    """:func:`validate_image` for many ``(path, role, row_label)`` jobs; the first problem in job
    order is raised, whatever order the work finished in. Given a ``problems`` list, every
    problem is appended to it instead (one line each, in job order) and its job's info is None.

    Headers are read one after the other (nibabel, cheap); the voxel passes of distinct files run
    in a few threads, since zlib and numpy release the GIL while they work.
    """
    infos: list[ImageInfo | None] = []
    for path, role, label in jobs:
        try:
            infos.append(validate_image(path, role, label, check_data=False))
        except AtlasflowError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
            infos.append(None)
    if not check_data:
        return infos
    # One voxel pass per distinct file, from the header facts just read (no nibabel in threads).
    todo = {
        Path(path): info for (path, _, _), info in zip(jobs, infos, strict=True) if info is not None
    }

    def scan(item: tuple[Path, ImageInfo]) -> ImageInfo | InvalidFile:
        path, info = item
        if info.stats is not None:
            return info
        try:
            key = _cache_key(path, os.stat(path))
            info = dataclasses.replace(info, stats=_voxel_stats(path, info))
        except (InvalidFile, OSError) as exc:
            return exc if isinstance(exc, InvalidFile) else InvalidFile(f"cannot be read ({exc})")
        _remember(key, info)
        return info

    workers = min(_workers(), len(todo))
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            outcome = dict(zip(todo, pool.map(scan, todo.items()), strict=True))
    else:
        outcome = {path: scan(item) for path, item in zip(todo, todo.items(), strict=True)}
    for i, (path, role, label) in enumerate(jobs):
        if infos[i] is None:
            continue
        result = outcome[Path(path)]
        prefix = f"{label}: {role} {path}" if label else f"{role} {path}"
        problem = (
            one_line(str(result))
            if isinstance(result, InvalidFile)
            else role_problem(result.stats, role, tumor_labels)
        )
        if problem:
            if problems is None:
                raise AtlasflowError(f"{prefix}: {problem}")
            problems.append(f"{prefix}: {problem}")
            infos[i] = None
            continue
        infos[i] = result
    return infos


@contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """nibabel logs (and fixes) odd header fields on stderr; we report them ourselves, in one line."""
    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _header_facts(path: Path, file_size: int) -> ImageInfo:
    try:
        with _quiet_nibabel():
            img = load_header(path)
    except AtlasflowError as exc:
        text = str(exc)
        raise InvalidFile(
            text[len(f"{path}: ") :] if text.startswith(f"{path}: ") else text
        ) from None
    header = img.header
    shape = tuple(int(s) for s in header.get_data_shape())
    if len(shape) < 3:
        raise InvalidFile(f"is a {len(shape)}-D image (shape {shape}); expected a 3-D volume")
    if min(shape) <= 0:
        raise InvalidFile(f"has a zero or negative dimension (shape {shape})")
    extra = math.prod(shape[3:])
    if extra != 1:
        raise InvalidFile(
            f"is {len(shape)}-D with {extra} volumes (shape {shape}); expected one 3-D volume "
            "(a 4th dimension of size 1 is fine)"
        )
    if 1 in shape[:3]:
        raise InvalidFile(f"is a single slice (shape {shape[:3]}); expected a 3-D volume")
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "iuf":
        raise InvalidFile(
            f"has voxel type {dtype} ({'RGB' if dtype.fields else dtype.kind}); expected real numbers"
        )

    pixdim = raw_pixdim(path, type(header))
    if not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0) and np.all(pixdim <= MAX_VOXEL_MM)):
        raise InvalidFile(
            f"implausible voxel size {_fmt_mm(pixdim)} mm in the header (pixdim); expected each "
            f"size > 0 and <= {MAX_VOXEL_MM:g} mm"
        )
    try:
        space_unit = header.get_xyzt_units()[0]
    except (KeyError, ValueError):
        space_unit = "unknown"
    if space_unit in ("meter", "micron"):
        raise InvalidFile(f"spatial units are {space_unit}s; atlasflow expects millimetres")

    affine = np.asarray(img.affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InvalidFile("the voxel-to-world affine (qform/sform) is not finite")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(spacing <= 0) or np.any(spacing > MAX_VOXEL_MM):
        raise InvalidFile(
            f"implausible voxel size {_fmt_mm(spacing)} mm in the affine (qform/sform); expected "
            f"each size > 0 and <= {MAX_VOXEL_MM:g} mm"
        )
    # |det| / product of column norms is 1 for orthogonal axes and 0 for a flat (degenerate) grid.
    if abs(np.linalg.det(affine[:3, :3])) < 1e-3 * float(np.prod(spacing)):
        raise InvalidFile(
            "the voxel-to-world affine (qform/sform) is degenerate (axes nearly parallel)"
        )

    proxy = img.dataobj  # nibabel has moved scl_slope / scl_inter from the header to here
    if not (np.isfinite(proxy.slope) and np.isfinite(proxy.inter)):
        raise InvalidFile(
            f"invalid intensity scaling (scl_slope {proxy.slope}, scl_inter {proxy.inter})"
        )
    need = int(proxy.offset) + math.prod(shape) * dtype.itemsize
    if not path.name.lower().endswith(".gz") and file_size < need:
        raise InvalidFile(
            f"is truncated: the header describes {need} bytes (data from byte {int(proxy.offset)}) "
            f"but the file has {file_size}"
        )
    scaling = (float(proxy.slope), float(proxy.inter))
    return ImageInfo(path, tuple(shape[:3]), affine, dtype, header, int(proxy.offset), scaling)


def _fmt_mm(values: np.ndarray) -> str:
    return "x".join(f"{float(v):.4g}" for v in values)


def grid_mismatch(image: ImageInfo, other: ImageInfo, reference: str = "t1w") -> str | None:
    """Why ``other`` does not sample the same voxel centres as ``image``, the session's
    ``reference`` scan (a column name, for the message; None when it does).

    The same grid stored with axes flipped or permuted (RAS vs LPS storage) is the same grid:
    preprocessing reorients both to RAS, so no interpolation happens.
    """
    try:
        to_image = np.linalg.solve(image.affine, other.affine)  # other's voxel -> image's voxel
    except np.linalg.LinAlgError:
        return f"its affine cannot be related to the {reference} image's"
    linear = to_image[:3, :3]
    perm = np.round(linear)
    is_signed_perm = (
        np.abs(linear - perm).max() <= _GRID_TOLERANCE_VOXELS / max(max(other.shape), 1)
        and np.all(np.abs(perm).sum(axis=0) == 1)
        and np.all(np.abs(perm).sum(axis=1) == 1)
    )
    if is_signed_perm:
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in other.shape], indexing="ij")).reshape(
            3, -1
        )
        mapped = linear @ corners + to_image[:3, 3:4]
        low, high = mapped.min(axis=1), mapped.max(axis=1)
        target = np.array(image.shape) - 1
        if (
            np.abs(low).max() <= _GRID_TOLERANCE_VOXELS
            and np.abs(high - target).max() <= _GRID_TOLERANCE_VOXELS
        ):
            return None
    if sorted(image.shape) != sorted(other.shape):
        return f"not on the grid of the {reference} image: shape {other.shape} vs {image.shape}"
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in image.shape], indexing="ij")).reshape(
        3, -1
    )
    corners_h = np.vstack([corners, np.ones((1, corners.shape[1]))])
    distance = np.linalg.norm((other.affine - image.affine)[:3] @ corners_h, axis=0).max()
    return (
        f"not on the grid of the {reference} image: same shape, but the voxel-to-world affines differ "
        f"(corner voxels up to {distance:.3g} mm apart)"
    )
