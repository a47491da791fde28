"""The demo cohort's T2w and FLAIR: same anatomy as the T1w, own grids, true alignments and atlases.

The truth is checked independently of the generator: transforms are applied with scipy's
``map_coordinates`` from the files' contents, and the anatomy a contrast shows is compared with the
T1w's labels after that resampling.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from factories import file_digests, pull_back, read_manifest
from scipy import ndimage

from atlasflow.cli.main import build_parser
from atlasflow.cohort.planning import resolve_cohort
from atlasflow.errors import AtlasflowError
from atlasflow.io.images import load_image
from atlasflow.io.itk import load_transform
from atlasflow.synth.contrasts import APPEARANCES
from atlasflow.synth.demo import make_demo_cohort
from atlasflow.synth.plan import SYNTH_CONTRASTS, demo_manifest
from atlasflow.transforms import Transform, apply_transform

SPACING = 5.0
SMALL = dict(seed=2, n_cross=2, n_long=1, n_timepoints=2, spacing_mm=SPACING)
SUFFIX = {"t1w": "T1w", "t2w": "T2w", "flair": "FLAIR"}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    """The same cohort without contrasts, with FLAIR only and with both."""
    out = {}
    for name, contrasts in (("none", ()), ("flair", ("flair",)), ("both", ("t2w", "flair"))):
        out[name] = tmp_path_factory.mktemp(f"demo_{name}")
        make_demo_cohort(out[name], contrasts=contrasts, **SMALL)
    return out


@pytest.fixture(scope="module")
def cohort(cohorts) -> Path:
    return cohorts["both"]


def truth_path(folder: Path, subject: str, session: str, name: str) -> Path:
    return (
        folder
        / "truth"
        / f"sub-{subject}"
        / f"ses-{session}"
        / f"sub-{subject}_ses-{session}_{name}"
    )


def within_session(folder: Path, subject: str, session: str, column: str) -> Transform:
    return load_transform(
        truth_path(folder, subject, session, f"from-{SUFFIX[column]}_to-T1w_mode-image_xfm.mat")
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def agreement(labels, reference, affine: np.ndarray) -> float:
    """Share of the voxels of ``reference`` (in the brain of either) whose label ``labels``
    resampled through the rigid ``affine`` (nearest neighbour) equals."""
    resampled = pull_back(labels, Transform(affine), reference.grid, order=0)
    return float((resampled == reference.data)[(resampled > 0) | (reference.data > 0)].mean())


# ---------------------------------------------------------------------------- files, bytes


def test_t1w_files_do_not_depend_on_contrasts(cohorts):
    none, flair, both = (file_digests(cohorts[k]) for k in ("none", "flair", "both"))
    # the cohort's description names its contrasts; the manifest lists them
    described = {"manifest.csv", "dataset_description.json"}
    for other in (flair, both):
        assert {k: v for k, v in other.items() if k in none and k not in described} == {
            k: v for k, v in none.items() if k not in described
        }
    # each contrast from its own stream: the FLAIR files are the same with or without the T2w
    flair_files = {k for k in flair if k not in none}
    assert flair_files and all(
        "FLAIR" in k or k == "truth/contrast_parameters.json" for k in flair_files
    )
    assert {k: both[k] for k in flair_files if "FLAIR" in k} == {
        k: flair[k] for k in flair_files if "FLAIR" in k
    }
    assert any("T2w" in k for k in both) and not any("T2w" in k for k in flair)


def test_manifest_columns_follow_contrasts(cohorts):
    for name, contrasts in (("none", ()), ("flair", ("flair",)), ("both", ("t2w", "flair"))):
        table = read_manifest(cohorts[name])
        expected = demo_manifest(
            seed=SMALL["seed"], n_cross=2, n_long=1, n_timepoints=2, contrasts=contrasts
        )
        assert list(table.columns) == list(expected.columns)
        assert table.equals(expected)
        for column in ("t2w", "flair"):
            if column in contrasts:
                assert all((cohorts[name] / path).is_file() for path in table[column])
            else:
                assert set(table[column]) == {""}


def test_config_chooses_the_demo_contrasts():
    demo = dict(dir="demo_data", seed=0, n_cross=1, n_long=1, n_timepoints=2, spacing_mm=4.0)
    default = resolve_cohort({"cohort": None, "demo": demo})
    assert all(p.endswith("_T2w.nii.gz") for p in default.t2w)
    assert all(p.startswith("demo_data/") and p.endswith("_FLAIR.nii.gz") for p in default.flair)
    only = resolve_cohort({"cohort": None, "demo": {**demo, "contrasts": ["flair"]}})
    assert set(only.t2w) == {""} and all(only.flair)
    none = resolve_cohort({"cohort": None, "demo": {**demo, "contrasts": []}})
    assert set(none.t2w) == set(none.flair) == {""}
    assert list(none.t1w) == list(default.t1w)


def test_command_line_contrasts():
    parse = build_parser().parse_args
    assert parse(["demo-data", "out"]).contrasts == ["t2w", "flair"]
    assert parse(["demo-data", "out", "--contrasts"]).contrasts == []
    assert parse(["demo-data", "out", "--contrasts", "flair"]).contrasts == ["flair"]


def test_unknown_or_repeated_contrasts_are_refused(tmp_path):
    assert set(APPEARANCES) == set(SYNTH_CONTRASTS)
    with pytest.raises(AtlasflowError, match="contrasts"):
        make_demo_cohort(tmp_path, contrasts=["t1ce"])
    with pytest.raises(AtlasflowError, match="contrasts"):
        demo_manifest(contrasts=["flair", "flair"])
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------- what the scans show


def test_own_grids(cohort):
    for row in read_manifest(cohort).itertuples():
        t1w = nib.load(cohort / row.t1w)
        for column in ("t2w", "flair"):
            scan = nib.load(cohort / getattr(row, column))
            assert scan.get_data_dtype() == np.uint16
            assert sorted(scan.header.get_zooms()[:3]) == pytest.approx(
                [SPACING, SPACING, SPACING * APPEARANCES[column].slice_factor]
            )
            assert nib.aff2axcodes(scan.affine) != nib.aff2axcodes(t1w.affine)
            rigid = within_session(cohort, row.subject, row.session, column).affine
            linear = rigid[:3, :3]
            assert np.allclose(linear @ linear.T, np.eye(3), atol=1e-9)  # rigid
            angle = np.degrees(np.arccos(np.clip((np.trace(linear) - 1) / 2, -1, 1)))
            shift = np.linalg.norm(rigid[:3, 3])
            assert 0.2 < angle < 7.0 and shift > 0.2, (row.subject, column, angle, shift)


@pytest.mark.parametrize("column", ["t2w", "flair"])
def test_truth_transform_puts_the_contrast_on_the_t1w(cohort, column):
    """The contrast's labels, resampled onto the T1w grid through the true rigid map, are the
    T1w's labels (up to the two grids' sampling, coarse here), better than through the same map
    moved by half a voxel along any axis."""
    for row in read_manifest(cohort).itertuples():
        t1w_labels = load_image(cohort / row.labels, dtype=None)
        labels = load_image(
            truth_path(cohort, row.subject, row.session, f"space-{SUFFIX[column]}_dseg.nii.gz"),
            dtype=None,
        )
        truth = within_session(cohort, row.subject, row.session, column)

        on_t1w = pull_back(labels, truth, t1w_labels.grid, order=0).astype(int)
        where = (row.subject, row.session)
        assert dice(on_t1w > 0, t1w_labels.data > 0) > 0.9, where
        if row.tumor_mask:
            assert dice(on_t1w == 4, t1w_labels.data == 4) > 0.6, where
        best = agreement(labels, t1w_labels, truth.affine)
        assert best > 0.7, where
        for shift in np.vstack([np.eye(3), -np.eye(3)]) * SPACING / 2:
            moved = truth.affine @ np.vstack([np.c_[np.eye(3), shift], [0, 0, 0, 1]])
            assert best > agreement(labels, t1w_labels, moved) + 0.01, (*where, shift)
        # the package's warping agrees with the independent resampling
        ours = apply_transform(labels, truth, t1w_labels.grid, interpolation="nearest").data
        assert (ours == on_t1w).mean() > 0.99


def test_tissue_contrasts(cohort):
    """T1w: CSF < GM < WM; T2w: CSF > GM > WM; FLAIR: CSF < WM < GM; tumour and oedema bright in
    T2w and FLAIR."""
    for row in read_manifest(cohort).itertuples():
        for column in ("t1w", "t2w", "flair"):
            image = load_image(cohort / getattr(row, column)).data
            if column == "t1w":
                labels = load_image(cohort / row.labels, dtype=None).data
            else:
                name = f"space-{SUFFIX[column]}_dseg.nii.gz"
                labels = load_image(
                    truth_path(cohort, row.subject, row.session, name), dtype=None
                ).data
            csf, gm, wm = (np.median(image[labels == k]) for k in (1, 2, 3))
            where = (row.subject, row.session, column, csf, gm, wm)
            if column == "t1w":
                assert csf < gm < wm, where
            elif column == "t2w":
                assert csf > 1.1 * gm and gm > 1.1 * wm, where
            else:
                assert csf < 0.8 * wm and gm > 1.05 * wm, where
            if row.tumor_mask and column != "t1w":
                tumour = labels == 4
                assert image[tumour].mean() > 1.3 * wm, where
                near = ndimage.binary_dilation(tumour, iterations=2) & ~tumour & (labels == 3)
                assert image[near].mean() > 1.1 * wm, where  # oedema


@pytest.mark.parametrize("column", ["t2w", "flair"])
def test_contrast_truth_template(cohort, column):
    """``template_<C>`` is the contrast of the true template: a control's scan brought to the
    template by the T1w's true map composed with the contrast's rigid one matches it."""
    suffix = SUFFIX[column]
    template = load_image(cohort / f"truth/template_{suffix}.nii.gz")
    template_labels = load_image(cohort / "truth/template_dseg.nii.gz", dtype=None)
    assert template.grid.same_as(template_labels.grid)
    brain = template_labels.data > 0
    means = [template.data[template_labels.data == k].mean() for k in (1, 2, 3)]
    assert (means[0] > means[2]) if column == "t2w" else (means[0] < means[2])
    for row in read_manifest(cohort).query("group == 'control'").itertuples():
        prefix = truth_path(cohort, row.subject, row.session, "from-T1w_to-template_mode-image_xfm")
        to_t1w = load_transform(f"{prefix}.mat", f"{prefix}.nii.gz")
        rigid = within_session(cohort, row.subject, row.session, column).affine
        scan = load_image(cohort / getattr(row, column))
        warped = pull_back(
            scan, Transform(rigid @ to_t1w.affine, to_t1w.displacement), template.grid
        )
        plain = pull_back(scan, to_t1w, template.grid)  # without the rigid map
        corr = np.corrcoef(warped[brain], template.data[brain])[0, 1]
        corr_plain = np.corrcoef(plain[brain], template.data[brain])[0, 1]
        assert corr > 0.75 and corr > corr_plain + 0.05, (row.subject, corr, corr_plain)
