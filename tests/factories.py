"""Plain helpers the tests share: paths, small images, cohort files and fake workflow outputs.

Fixtures built on them live in conftest.py (pytest finds those by name); test files import these
functions directly. Modules that pull in torch are imported inside the helpers that need them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from atlasflow.io.images import Image, save_image

# ------------------------------------------------------------------------------------ paths

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ATLASFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
TINY_CONFIG = REPO / "tests" / "config_tiny.yaml"


def workflow_rules() -> set[str]:
    """The names of the rules in workflow/rules/*.smk (``rule x:``, ``use rule ... as x``, and the
    rules made per contrast, ``name: f"..{c}.."`` inside ``for c in ...``, for every contrast)."""
    from atlasflow.cohort.columns import (
        SCAN_COLUMNS as CONTRAST_COLUMNS,  # the T1w too, when not the reference
    )

    names: set[str] = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        names |= set(re.findall(r"^\s*rule\s+(\w+)\s*:", text, flags=re.M))
        names |= set(re.findall(r"^\s*use\s+rule\s+\w+\s+as\s+(\w+)", text, flags=re.M))
        for pattern in re.findall(r"^\s*name:\s*\n\s*f\"([\w{}]+)\"", text, flags=re.M):
            for c in CONTRAST_COLUMNS:
                for space in ("template", "atlas"):
                    names.add(pattern.replace("{c}", c).replace("{space}", space))
    return names


def tiny_net_config():
    """A registration network small enough to build, train and run in seconds on a CPU."""
    from atlasflow.nn import NetConfig

    return NetConfig(
        unet_encoder=[8, 8, 8, 8], unet_decoder=[8, 8, 8, 8], affine_channels=[4, 8, 8, 8, 8]
    )


def write_label_maps(folder, n=2, shape=(40, 40, 40)):
    """Tiny FreeSurfer-numbered 'brains': WM core, cortex shell, ventricles, extra-cerebral rim."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
        r = np.sqrt(((ijk / np.array([0.75 + 0.05 * k, 0.8, 0.7])) ** 2).sum(-1))
        labels = np.zeros(shape, np.int16)
        labels[r < 0.95] = 502
        labels[r < 0.8] = 3
        labels[r < 0.6] = 2
        labels[(r < 0.25) & (ijk[..., 0] > 0)] = 4
        labels[(r < 0.25) & (ijk[..., 0] <= 0)] = 43
        labels[(r < 0.6) & (ijk[..., 2] < -0.4)] = 16
        nib.save(
            nib.Nifti1Image(labels, np.diag([2.0, 2.0, 2.0, 1.0])), str(folder / f"seg_{k}.nii.gz")
        )
    return folder


# ----------------------------------------------------------------------------------- images


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


def pull_back(moving, transform, grid, order: int = 1) -> np.ndarray:
    """Independent resampling: evaluate the transform's formula (``x_m = A (x + u(x))``) and
    interpolate with scipy, to check the package's own resampling against."""
    from scipy import ndimage

    from atlasflow.transforms import world_coordinates

    points = world_coordinates(grid)
    if transform.displacement is not None:
        points = points + transform.displacement.data
    total = np.linalg.inv(moving.affine) @ transform.affine
    coords = points @ total[:3, :3].T + total[:3, 3]
    return ndimage.map_coordinates(
        moving.data.astype(np.float64), np.moveaxis(coords, -1, 0), order=order, cval=0.0
    )


def ball(shape, centre, radius) -> np.ndarray:
    """A uint8 mask of the voxels within ``radius`` voxels of ``centre`` (voxel indices)."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return (np.linalg.norm(ijk - np.array(centre), axis=-1) <= radius).astype(np.uint8)


def translated(image: Image, shift_mm) -> Image:
    """``image`` moved by ``shift_mm`` (world mm) and resampled on its own grid."""
    from atlasflow.transforms import Transform, apply_transform

    matrix = np.eye(4)
    matrix[:3, 3] = -np.asarray(shift_mm, dtype=float)
    return apply_transform(image, Transform(matrix), image.grid)


def shifted_members(folder: Path, shifts_vox) -> tuple[Image, list[str], list[str], list[str]]:
    """A previous template (``prev.nii.gz``, mask ``mask.nii.gz``) and members that are it moved
    along x by ``shifts_vox`` voxels, with identity affines: (previous, images, masks, affines),
    the inputs of one ``atlas iteration``."""
    from atlasflow.io.itk import write_itk_affine

    previous = blob_image((40, 40, 40), seed=5)
    save_image(previous, folder / "prev.nii.gz")
    save_image(previous.with_data((previous.data > 0.05).astype(np.uint8)), folder / "mask.nii.gz")
    images, masks, affines = [], [], []
    for i, shift in enumerate(shifts_vox):
        moved = translated(previous, [shift * previous.affine[0, 0], 0.0, 0.0])
        mask = moved.with_data((moved.data > 0.05).astype(np.uint8))
        images.append(str(save_image(moved, folder / f"sub-0{i}_ses-1_desc-preproc_T1w.nii.gz")))
        masks.append(str(save_image(mask, folder / f"sub-0{i}_mask.nii.gz")))
        affines.append(str(write_itk_affine(np.eye(4), folder / f"sub-0{i}.mat")))
    return previous, images, masks, affines


# ---------------------------------------------------------------------- cohort input files

# The grid of the stand-in scans of cohort tests: 2 mm, not centred on the origin.
SCAN_SHAPE = (16, 18, 14)
SCAN_AFFINE = np.array([[2.0, 0, 0, -15], [0, 2.0, 0, -17], [0, 0, 2.0, -13], [0, 0, 0, 1]])


def head(seed: int = 0, shape=SCAN_SHAPE) -> np.ndarray:
    """A smooth bright ellipsoid with noise: a stand-in T1w scan."""
    rng = np.random.default_rng(seed)
    ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    r = np.sqrt((ijk**2).sum(-1))
    return (np.clip(1.1 - r, 0, None) * 100 + rng.normal(0, 1, shape)).astype(np.float32)


def brain(shape=SCAN_SHAPE) -> np.ndarray:
    """A centred uint8 ball: the brain mask of :func:`head`."""
    ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    return (np.sqrt((ijk**2).sum(-1)) < 0.6).astype(np.uint8)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = SCAN_AFFINE, **fields) -> Path:
    """Write a NIfTI file, then force raw header fields byte-wise (nibabel would fix or reset them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    raw = bytearray(img.to_bytes())
    header = np.frombuffer(bytes(raw[:348]), dtype=img.header.structarr.dtype).copy()
    for key, value in fields.items():
        if key.startswith("pixdim"):
            header["pixdim"][0, int(key[-1])] = value
        else:
            header[key] = value
    raw[:348] = header.tobytes()
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def random_nifti(path: Path, seed: int) -> Path:
    """A 10x12x8 float32 image of uniform noise on the identity grid (content that only has to
    differ from file to file)."""
    data = np.random.default_rng(seed).random((10, 12, 8)).astype(np.float32)
    return write_nifti(path, data, np.eye(4))


def validated(manifest: Path, check_data: bool = True) -> pd.DataFrame:
    """A cohort (manifest CSV or BIDS folder) read and validated as the workflow does."""
    from atlasflow.cohort.manifest import load_cohort
    from atlasflow.cohort.validate import validate_cohort

    return validate_cohort(load_cohort(manifest), manifest, check_data=check_data)


def refused(manifest: Path, *fragments: str, check_data: bool = True) -> str:
    """The one-line message :func:`validated` refuses ``manifest`` with; it holds ``fragments``."""
    import pytest

    from atlasflow.errors import AtlasflowError

    with pytest.raises(AtlasflowError) as info:
        validated(manifest, check_data=check_data)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def write_manifest(folder: Path, rows: list[dict], name: str = "manifest.csv") -> Path:
    """The cohort manifest CSV ``folder/name`` with one line per row."""
    path = folder / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def read_manifest(path: Path) -> pd.DataFrame:
    """A manifest CSV (or the manifest.csv in a folder) as written: all strings, empty cells ''."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.csv"
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def manifest_rows(path: Path) -> list[dict]:
    """The rows of a manifest CSV as dicts of strings, ready to edit and write back."""
    return read_manifest(path).to_dict("records")


def file_digests(folder: Path) -> dict[str, str]:
    """The sha256 of every file under ``folder``, by path relative to it."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------- fake outputs for the reports

REPORT_SHAPE = (24, 28, 20)
REPORT_THRESHOLDS = {"max_folding_fraction": 0.001, "min_ncc_after": 0.5, "min_dice": 0.5}
# The subjects of :func:`report_outputs`: 01 passes, 02 is flagged, 03 is longitudinal, 04 failed.
REPORT_SESSIONS = {"01": ["1"], "02": ["1"], "03": ["1", "2"], "04": ["1"]}


def label_map(image: Image) -> Image:
    """Three labels from intensity bands of ``image``."""
    return image.with_data(np.digitize(image.data, [0.3, 0.7, 1.0]).astype(np.uint8))


def wavy_field(grid_image: Image, amplitude_mm: float, seed: int) -> Image:
    """A smooth sinusoidal displacement on ``grid_image``'s grid; a large amplitude folds the map."""
    rng = np.random.default_rng(seed)
    shape = grid_image.data.shape[:3]
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(
        np.float32
    )
    phase = rng.uniform(0, 2 * np.pi, 3)
    u = np.stack([amplitude_mm * np.sin(ijk[..., c] * 0.5 + phase[c]) for c in range(3)], -1)
    return Image(u.astype(np.float32), grid_image.affine.copy())


def qc_json(ncc_before: float, ncc_after: float, folding: float, **extra) -> str:
    """The text of a registration's QC JSON, as the workflow writes it."""
    return json.dumps(
        {
            "backend": "deep",
            "seconds": 0.8,
            "folding_fraction": folding,
            "ncc_before": ncc_before,
            "ncc_after": ncc_after,
            **extra,
        }
    )


def anat_path(outdir: Path, s: str, t: str, name: str) -> Path:
    """``outdir/sub-s/ses-t/anat/sub-s_ses-t_name`` (``outdir/sub-s/anat/sub-s_name`` for session
    ""), spelled out independently of atlasflow.layout."""
    if not t:
        return outdir / f"sub-{s}" / "anat" / f"sub-{s}_{name}"
    return outdir / f"sub-{s}" / f"ses-{t}" / "anat" / f"sub-{s}_ses-{t}_{name}"


def write_scan_outputs(
    outdir: Path,
    s: str,
    t: str,
    seed: int,
    *,
    qc_template: str,
    qc_atlas: str,
    amplitude: float = 1.5,
    tumour_voxels: int = 0,
) -> None:
    """One scan's preprocessing and registration outputs (to the template and the atlas)."""
    from atlasflow.io.itk import save_transform
    from atlasflow.transforms import Transform

    template = blob_image(REPORT_SHAPE, seed=100)
    moving = blob_image(REPORT_SHAPE, seed=seed)
    # A shifted copy so 'before' and 'after' differ visibly.
    moving = moving.with_data(np.roll(moving.data, 2, axis=0))
    save_image(moving, anat_path(outdir, s, t, "desc-preproc_T1w.nii.gz"))
    save_image(
        moving.with_data((moving.data > 0.2).astype(np.uint8)),
        anat_path(outdir, s, t, "desc-brain_mask.nii.gz"),
    )
    save_image(label_map(moving), anat_path(outdir, s, t, "desc-preproc_dseg.nii.gz"))
    if tumour_voxels:
        mask = np.zeros(REPORT_SHAPE, np.uint8)
        r = tumour_voxels
        mask[12 - r : 12 + r, 14 - r : 14 + r, 10 - r : 10 + r] = 1
        save_image(
            moving.with_data(mask),
            anat_path(outdir, s, t, "label-tumor_desc-preproc_mask.nii.gz"),
        )
    for stage, qc in (("template", qc_template), ("atlas", qc_atlas)):
        warped_name = (
            "space-template_desc-warped_T1w.nii.gz"
            if stage == "template"
            else "space-atlas_T1w.nii.gz"
        )
        save_image(
            template.with_data(0.9 * template.data + 0.1 * moving.data),
            anat_path(outdir, s, t, warped_name),
        )
        save_transform(
            Transform(np.eye(4), wavy_field(template, amplitude, seed)),
            anat_path(outdir, s, t, f"from-T1w_to-{stage}_mode-image_xfm.mat"),
            anat_path(outdir, s, t, f"from-T1w_to-{stage}_mode-image_xfm.nii.gz"),
        )
        anat_path(outdir, s, t, f"from-T1w_to-{stage}_mode-image_desc-qc_xfm.json").write_text(qc)
    save_image(label_map(template), anat_path(outdir, s, t, "space-atlas_dseg.nii.gz"))


#: A contrast's name in output files and in its transform to the T1w (as atlasflow.layout spells them).
CONTRAST_SUFFIX = {"t2w": "T2w", "flair": "FLAIR", "pdw": "PDw"}


def contrast_qc_json(nmi_after: float = 1.072, shift_mm: float = 0.4, **extra) -> str:
    """The text of a contrast's within-session alignment QC JSON, as the workflow writes it."""
    return json.dumps(
        {
            "transform": "rigid",
            "metric": "normalised mutual information (2 mm, reference brain)",
            "nmi_scanner": 1.05,
            "nmi_after": nmi_after,
            "shift_mm": shift_mm,
            "rotation_deg": 1.2,
            "seconds": 3.4,
            "qc_thresholds": {"min_nmi": 1.03, "max_shift_mm": 20.0},
            "qc_pass": True,
            **extra,
        }
    )


def write_contrast_outputs(outdir: Path, s: str, t: str, column: str, seed: int) -> None:
    """One scan's other contrast (T2w, FLAIR, PDw): on its own coarser grid, aligned onto the
    T1w's grid, the transform between them and its QC, and in template and atlas space."""
    from atlasflow.io.itk import write_itk_affine

    suffix = CONTRAST_SUFFIX[column]
    t1w = blob_image(REPORT_SHAPE, seed=seed)
    t1w = t1w.with_data(np.roll(t1w.data, 2, axis=0))
    # Another contrast of the same head: inverted intensities inside it (bright fluid, dark tissue).
    inverted = t1w.with_data(np.where(t1w.data > 0.2, 1.6 - t1w.data, 0.0).astype(np.float32))
    save_image(inverted, anat_path(outdir, s, t, f"desc-preproc_{suffix}.nii.gz"))
    own = blob_image((16, 18, 10), spacing=3.0, seed=seed)
    save_image(
        own.with_data(np.where(own.data > 0.2, 1.6 - own.data, 0.0).astype(np.float32)),
        anat_path(outdir, s, t, f"space-orig_desc-preproc_{suffix}.nii.gz"),
    )
    write_itk_affine(np.eye(4), anat_path(outdir, s, t, f"from-{suffix}_to-T1w_mode-image_xfm.mat"))
    anat_path(outdir, s, t, f"from-{suffix}_to-T1w_mode-image_desc-qc_xfm.json").write_text(
        contrast_qc_json()
    )
    template = blob_image(REPORT_SHAPE, seed=100)
    warped = template.with_data(np.where(template.data > 0.2, 1.6 - template.data, 0.0))
    save_image(warped, anat_path(outdir, s, t, f"space-template_desc-warped_{suffix}.nii.gz"))
    save_image(warped, anat_path(outdir, s, t, f"space-atlas_{suffix}.nii.gz"))


def report_outputs(root: Path) -> tuple[Path, dict]:
    """Fake workflow outputs of :data:`REPORT_SESSIONS` under ``root/results``; returns (outdir,
    raw input per subject)."""
    shape = REPORT_SHAPE
    outdir = root / "results"
    template = blob_image(shape, seed=100)
    save_image(template, outdir / "template" / "template_T1w.nii.gz")
    for i in range(3):
        sharp = template.with_data(np.clip(template.data, 0, None) ** (1 + 0.3 * i))
        save_image(sharp, outdir / "atlas" / f"iter-{i}" / "template_T1w.nii.gz")
    save_image(template, outdir / "atlas" / "atlas_T1w.nii.gz")
    save_image(label_map(template), outdir / "atlas" / "atlas_dseg.nii.gz")
    frequency = np.zeros(shape, np.float32)
    frequency[10:15, 12:17, 8:12] = 0.5
    frequency[11:13, 13:15, 9:11] = 1.0
    save_image(template.with_data(frequency), outdir / "atlas" / "tumor_frequency.nii.gz")
    save_image(
        template.with_data(np.where(template.data > 0.2, 1.6 - template.data, 0.0)),
        outdir / "atlas" / "atlas_FLAIR.nii.gz",
    )
    (outdir / "atlas" / "metrics.tsv").write_text(
        "iteration\tmembers\ttemplate_change_rms\tmean_velocity_norm_mean_mm\tmean_velocity_norm_max_mm\t"
        "ncc_to_template_mean\tfolding_fraction_max\tfolding_fraction_mean\n"
        "1\t4\t0.08\t1.9\t4.1\t0.81\t0.0\t0.0\n2\t4\t0.03\t1.1\t2.6\t0.88\t0.0002\t0.00005\n"
    )
    raw = {}
    for s in ("01", "02", "03"):
        raw_path = root / "input" / f"sub-{s}_T1w.nii.gz"
        image = blob_image((30, 30, 24), spacing=1.6, seed=int(s))
        # Stored LAS, as many scanners write: the report must show it the same way round.
        flipped = Image(
            image.data[::-1].copy(),
            image.affine
            @ np.array([[-1, 0, 0, 29], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float),
        )
        save_image(flipped, raw_path)
        raw[s] = raw_path

    good = qc_json(0.41, 0.86, 0.0)
    write_scan_outputs(
        outdir, "01", "1", 1, qc_template=good, qc_atlas=qc_json(0.45, 0.9, 0.0, dice_mean=0.83)
    )
    # sub-02: poor registration to the atlas (NCC below 0.5, folding above 0.1 %) and missing files.
    write_scan_outputs(
        outdir, "02", "1", 2, qc_template=good, qc_atlas=qc_json(0.2, 0.31, 0.012), amplitude=4.0
    )
    anat_path(outdir, "02", "1", "space-atlas_T1w.nii.gz").unlink()
    anat_path(outdir, "02", "1", "from-T1w_to-template_mode-image_xfm.nii.gz").unlink()
    anat_path(outdir, "02", "1", "from-T1w_to-atlas_mode-image_xfm.nii.gz").unlink()
    # sub-03: longitudinal, tumour grows from baseline (ses-1) to follow-up (ses-2).
    # Both of its sessions have a FLAIR beside the T1w.
    write_scan_outputs(outdir, "03", "1", 3, qc_template=good, qc_atlas=good, tumour_voxels=2)
    write_scan_outputs(outdir, "03", "2", 4, qc_template=good, qc_atlas=good, tumour_voxels=3)
    write_contrast_outputs(outdir, "03", "1", "flair", 3)
    write_contrast_outputs(outdir, "03", "2", "flair", 4)
    baseline = blob_image(shape, seed=3)
    save_image(
        baseline.with_data(np.where(baseline.data > 0.2, 1.5 - baseline.data, 0.0)),
        anat_path(outdir, "03", "2", "space-baseline_desc-warped_FLAIR.nii.gz"),
    )
    flair_change = np.zeros(shape, np.float32)
    flair_change[9:15, 11:17, 7:13] = 0.5  # brighter where the tumour grew (oedema)
    save_image(
        baseline.with_data(flair_change),
        anat_path(outdir, "03", "2", "space-baseline_desc-difference_FLAIR.nii.gz"),
    )
    log_jac = np.zeros(shape, np.float32)
    log_jac[9:15, 11:17, 7:13] = 0.4
    save_image(
        baseline.with_data(log_jac),
        anat_path(outdir, "03", "2", "space-baseline_desc-logjacobian_map.nii.gz"),
    )
    save_image(
        baseline.with_data(0.2 * np.sin(baseline.data * 6)),
        anat_path(outdir, "03", "2", "space-baseline_desc-difference_T1w.nii.gz"),
    )
    save_image(
        baseline.with_data(np.abs(log_jac) * 5),
        anat_path(outdir, "03", "2", "space-baseline_desc-displacement_map.nii.gz"),
    )
    save_image(
        baseline.with_data(0.95 * baseline.data),
        anat_path(outdir, "03", "2", "space-baseline_desc-warped_T1w.nii.gz"),
    )
    mask = np.zeros(shape, np.uint8)
    mask[9:15, 11:17, 7:13] = 1
    save_image(
        baseline.with_data(mask),
        anat_path(outdir, "03", "2", "space-baseline_label-tumor_mask.nii.gz"),
    )
    anat_path(outdir, "03", "2", "from-T1w_to-baseline_mode-image_desc-qc_xfm.json").write_text(
        qc_json(0.7, 0.95, 0.0)
    )
    longitudinal = outdir / "sub-03" / "longitudinal"
    longitudinal.mkdir(parents=True)
    (longitudinal / "sub-03_tumor.tsv").write_text(
        "session\tacq_date\tdays_since_baseline\tvolume_mm3\tchange_from_baseline_mm3\tchange_from_baseline_pct\t"
        "change_from_previous_mm3\tchange_from_previous_pct\tgrowth_rate_mm3_per_day\tdoubling_time_days\tresponse\t"
        "necrosis_volume_ml\toedema_volume_ml\tenhancing_volume_ml\n"
        "1\t2024-01-10\t0\t512\tn/a\tn/a\tn/a\tn/a\tn/a\tn/a\tbaseline\t0.064\t0.256\t0.192\n"
        "2\t2024-03-10\t60\t1728\t1216\t237.5\t1216\t237.5\t20.27\t34.2\tprogression\t0.216\t1.08\t0.432\n"
    )
    # sub-04: preprocessing done, registration to the template failed with a logged error.
    save_image(blob_image(shape, seed=5), anat_path(outdir, "04", "1", "desc-preproc_T1w.nii.gz"))
    log = outdir / "logs" / "register_template" / "sub-04_ses-1.log"
    log.parent.mkdir(parents=True)
    log.write_text(
        "loading model\nTraceback (most recent call last):\n  ...\n"
        "atlasflow: error: old message that is not the last one\n"
        "atlasflow: error: sub-04_ses-1_desc-preproc_T1w.nii.gz: brain mask is empty\n\n"
    )
    (outdir / "logs" / "preprocess").mkdir(parents=True)
    (outdir / "logs" / "preprocess" / "sub-04_ses-1.log").write_text("preprocessed in 2.1 s\n")
    return outdir, raw
