"""Fuzzing validation: corrupted NIfTI files either pass or raise AtlasflowError, quickly.

Several hundred deterministic corruptions of a valid image (byte flips, truncations, random values
in header fields) go through :func:`validate_image`, and some through :func:`validate_cohort`.
Any other exception, or a case that runs past its deadline, fails the test with the case named.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from factories import write_manifest

from atlasflow.cohort.images import clear_image_cache, validate_image
from atlasflow.cohort.manifest import load_cohort
from atlasflow.cohort.validate import validate_cohort
from atlasflow.errors import AtlasflowError

SEED = 20240607
CASE_SECONDS = 5.0  # per case; a healthy case takes milliseconds
TOTAL_SECONDS = 60.0
ROLES = ("t1w", "labels", "tumor_mask", "brain_mask")

# Values chosen to hit edge cases of each header field (plus random ones, below).
FIELD_VALUES: dict[str, list] = {
    "sizeof_hdr": [0, 540, 347, 1 << 24, -1],
    "dim0": [-1, 0, 1, 2, 3, 4, 5, 7, 8, 100],
    "dim": [-5, 0, 1, 2, 3, 16, 255, 32767],
    "datatype": [
        0,
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        256,
        512,
        768,
        1024,
        1280,
        1536,
        1792,
        2048,
        2304,
        9999,
        -1,
    ],
    "bitpix": [0, 1, 8, 16, 32, 64, 7],
    "pixdim": [np.nan, np.inf, -np.inf, -2.0, 0.0, 1e-30, 1e30, 2.0, 50.0],
    "vox_offset": [0, 100, 351, 352, 353, 360, 368, 1e6, -1, np.nan, np.inf],
    "scl_slope": [np.nan, np.inf, -np.inf, 0.0, 1e38, -1e-38, 1.0, 0.5],
    "scl_inter": [np.nan, np.inf, -np.inf, 1e38, 0.25],
    "qform_code": [-1, 0, 1, 2, 3, 4, 5, 100],
    "sform_code": [-1, 0, 1, 2, 3, 4, 5, 100],
    "quatern": [np.nan, 2.0, -2.0, 0.5, 1.0],
    "srow": [np.nan, np.inf, 0.0, 1e10, -2.0],
    "magic": [b"n+1\x00", b"ni1\x00", b"n+2\x00", b"\x00\x00\x00\x00", b"xyz\x00"],
    "xyzt_units": [0, 1, 2, 3, 10, 255],
}


def base_image() -> bytes:
    """A valid 16^3 float32 image (non-trivial qform/sform) as raw .nii bytes."""
    rng = np.random.default_rng(SEED)
    data = (rng.random((16, 16, 16)) > 0.7).astype(np.float32)  # 0/1: valid for every role
    affine = np.array([[-2.0, 0.1, 0, 15], [0.05, 2.0, 0, -17], [0, 0, 2.5, -13], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    img.header.set_xyzt_units("mm", "sec")
    return img.to_bytes()


def fit(value, dtype: np.dtype):
    """``value`` stored in a field of ``dtype`` the way a careless writer would (clipped, truncated)."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return int(np.clip(value, info.min, info.max)) if np.isfinite(value) else 0
    return value


def mutate_header(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    buf = bytearray(raw)
    header = np.frombuffer(bytes(buf[:348]), dtype=nib.nifti1.header_dtype).copy()
    changed = []
    for field in rng.choice(list(FIELD_VALUES), size=int(rng.integers(1, 4)), replace=False):
        # Mostly an edge value; 30 % of the time a random number of random magnitude.
        pick = FIELD_VALUES[field][int(rng.integers(len(FIELD_VALUES[field])))]
        if rng.random() < 0.3 and field not in ("magic",):
            pick = float(rng.normal(0, 10 ** rng.integers(0, 6)))
        with np.errstate(all="ignore"):
            if field == "dim0":
                header["dim"][0, 0] = np.int16(np.clip(pick, -32768, 32767))
            elif field == "dim":
                header["dim"][0, int(rng.integers(1, 8))] = np.int16(np.clip(pick, -32768, 32767))
            elif field == "pixdim":
                header["pixdim"][0, int(rng.integers(0, 8))] = pick
            elif field == "quatern":
                header[str(rng.choice(["quatern_b", "quatern_c", "quatern_d", "qoffset_x"]))] = pick
            elif field == "srow":
                header[str(rng.choice(["srow_x", "srow_y", "srow_z"]))][
                    0, int(rng.integers(0, 4))
                ] = pick
            elif field == "magic":
                header["magic"] = pick
            else:
                header[field] = fit(pick, header.dtype[field])
        changed.append(f"{field}={pick!r}")
    buf[:348] = header.tobytes()
    if rng.random() < 0.2:  # claim a header extension is present
        buf[348] = 1
        changed.append("extension-flag")
    return bytes(buf), "header " + ", ".join(changed)


def flip_bytes(raw: bytes, rng: np.random.Generator, header_only: bool) -> tuple[bytes, str]:
    buf = bytearray(raw)
    limit = 352 if header_only else len(buf)
    positions = rng.integers(0, limit, size=int(rng.integers(1, 9)))
    for pos in positions:
        buf[pos] ^= int(rng.integers(1, 256))
    return bytes(buf), f"flip bytes at {sorted(positions.tolist())}"


def truncate(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    cut = int(rng.integers(0, len(raw)))
    return raw[:cut], f"truncate to {cut} of {len(raw)} bytes"


def build_cases(folder: Path) -> list[tuple[str, Path, str]]:
    """(description, file, role) for every corrupted file, written into ``folder``."""
    rng = np.random.default_rng(SEED)
    plain = base_image()
    packed = gzip.compress(plain, mtime=0)
    cases: list[tuple[str, bytes, str]] = []
    for _ in range(60):  # corrupt the compressed stream itself
        data, what = flip_bytes(packed, rng, header_only=False)
        cases.append((f"gz {what}", data, ".nii.gz"))
    for i in range(40):
        data, what = flip_bytes(plain, rng, header_only=i % 2 == 0)
        ext = ".nii" if i % 3 else ".nii.gz"
        cases.append(
            (f"{ext} {what}", gzip.compress(data, mtime=0) if ext == ".nii.gz" else data, ext)
        )
    for i in range(40):
        source, ext = (packed, ".nii.gz") if i % 2 else (plain, ".nii")
        data, what = truncate(source, rng)
        cases.append((f"{ext} {what}", data, ext))
    for i in range(120):
        data, what = mutate_header(plain, rng)
        ext = ".nii.gz" if i % 2 else ".nii"
        cases.append(
            (f"{ext} {what}", gzip.compress(data, mtime=0) if ext == ".nii.gz" else data, ext)
        )
    out = []
    for i, (what, data, ext) in enumerate(cases):
        path = folder / f"case{i:03d}{ext}"
        path.write_bytes(data)
        out.append((what, path, ROLES[int(rng.integers(len(ROLES)))]))
    return out


def run_with_deadline(
    fn: Callable[[], object], seconds: float
) -> tuple[BaseException | None, float, bool]:
    """Run ``fn`` in a daemon thread (no SIGALRM); report its exception, time, and whether it finished."""
    outcome: dict[str, BaseException | None] = {"error": None}

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - every exception is the test's business
            outcome["error"] = exc

    start = time.perf_counter()
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    return outcome["error"], time.perf_counter() - start, not worker.is_alive()


def test_corrupted_images_pass_or_raise_atlasflow_error(tmp_path: Path):
    start = time.perf_counter()
    cases = build_cases(tmp_path)
    assert len(cases) >= 200
    passed = rejected = 0
    for what, path, role in cases:
        clear_image_cache()
        for check_data in (False, True):
            error, seconds, finished = run_with_deadline(
                lambda p=path, r=role, c=check_data: validate_image(p, r, "fuzz", check_data=c),
                CASE_SECONDS,
            )
            assert finished, (
                f"{path.name} ({what}, {role}, check_data={check_data}) did not finish in {CASE_SECONDS} s"
            )
            if error is not None and not isinstance(error, AtlasflowError):
                raise AssertionError(
                    f"{path.name} ({what}, {role}, check_data={check_data}) raised "
                    f"{type(error).__name__}: {error}"
                ) from error
            if error is not None:
                assert "\n" not in str(error) and str(error).startswith(f"fuzz: {role} "), str(
                    error
                )
        passed += error is None
        rejected += error is not None
    # Both outcomes occur: the corruptions are neither all harmless nor all fatal.
    assert passed >= 10 and rejected >= 100, (passed, rejected)
    assert time.perf_counter() - start < TOTAL_SECONDS


@pytest.mark.parametrize("as_role", ["t1w", "tumor_mask"])
def test_corrupted_images_through_validate_cohort(tmp_path: Path, as_role: str):
    """The same corruptions inside a manifest (as the scan, or as a mask next to a good scan)."""
    cases = build_cases(tmp_path)[::10]
    good = tmp_path / "good.nii.gz"
    good.write_bytes(gzip.compress(base_image(), mtime=0))
    for what, path, _ in cases:
        clear_image_cache()
        row = {"subject": "01", "session": "1", "t1w": str(path)}
        if as_role == "tumor_mask":
            row = {"subject": "01", "session": "1", "t1w": str(good), "tumor_mask": str(path)}
        manifest = write_manifest(tmp_path, [row], "m.csv")
        error, seconds, finished = run_with_deadline(
            lambda m=manifest: validate_cohort(load_cohort(m), m), CASE_SECONDS
        )
        assert finished, f"{path.name} ({what}) did not finish"
        if error is not None and not isinstance(error, AtlasflowError):
            raise AssertionError(
                f"{path.name} ({what}) raised {type(error).__name__}: {error}"
            ) from error
        if error is not None:
            assert str(error).startswith("m.csv row 2 (subject 01, session 1): "), str(error)
