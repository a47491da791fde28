"""The demo cohort: layout, determinism, and that its ground truth is true.

Truth checks are made independently of the code that generated them where it matters: transforms
are applied with scipy's ``map_coordinates`` from the file contents, tissue labels are compared
with nilearn's probability maps, and the Jacobian of the mass effect is compared with the volume
change of the tumour masks.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from factories import file_digests, pull_back, read_manifest
from scipy import ndimage

from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Grid, load_image
from atlasflow.io.itk import load_transform
from atlasflow.nn.layers import integrate_velocity
from atlasflow.synth.demo import make_demo_cohort, oriented_grid
from atlasflow.synth.plan import MANIFEST_COLUMNS, demo_manifest
from atlasflow.synth.tumour import TumourModel
from atlasflow.transforms import (
    Transform,
    apply_transform,
    folding_fraction,
    jacobian_determinant,
    world_coordinates,
)

SPACING = 5.0
COHORT = dict(seed=0, n_cross=3, n_long=1, n_timepoints=3, spacing_mm=SPACING)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_cohort(out, **COHORT)
    return out


def truth_transform(folder: Path, subject: str, session: str, name: str) -> Transform:
    prefix = (
        folder
        / "truth"
        / f"sub-{subject}"
        / f"ses-{session}"
        / f"sub-{subject}_ses-{session}_{name}_xfm"
    )
    return load_transform(f"{prefix}.mat", f"{prefix}.nii.gz")


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


# ------------------------------------------------------------------------------------ layout


def test_manifest_and_files(cohort):
    table = read_manifest(cohort)
    assert tuple(table.columns) == MANIFEST_COLUMNS
    expected = demo_manifest(seed=0, n_cross=3, n_long=1, n_timepoints=3)
    pd.testing.assert_frame_equal(table, expected)
    assert len(table) == 3 + 3
    assert set(table.group) == {"control", "tumour"}
    for row in table.itertuples():
        assert (cohort / row.t1w).is_file() and (cohort / row.labels).is_file()
        assert (row.tumor_mask != "") == (row.group == "tumour")
        if row.tumor_mask:
            assert (cohort / row.tumor_mask).is_file()
        prefix = cohort / "truth" / f"sub-{row.subject}" / f"ses-{row.session}"
        assert (
            prefix / f"sub-{row.subject}_ses-{row.session}_from-T1w_to-template_mode-image_xfm.mat"
        ).is_file()
    tumour = table[table.group == "tumour"]
    assert list(tumour.session) == ["1", "2", "3"]
    gaps = np.diff(pd.to_datetime(tumour.acq_date)).astype("timedelta64[D]").astype(int)
    assert np.all((gaps >= 60) & (gaps <= 120))
    labels = pd.read_csv(cohort / "dseg.tsv", sep="\t")
    assert dict(zip(labels["index"], labels["abbreviation"], strict=True)) == {
        1: "CSF",
        2: "GM",
        3: "WM",
        4: "TUM",
    }
    for name in (
        "template_T1w.nii.gz",
        "template_dseg.nii.gz",
        "tumor_volumes.tsv",
        "README.md",
        "parameters.json",
    ):
        assert (cohort / "truth" / name).is_file()


def test_images_are_scanner_like(cohort):
    for row in read_manifest(cohort).itertuples():
        header = nib.load(cohort / row.t1w)
        assert header.get_data_dtype() == np.uint16
        assert np.allclose(header.header.get_zooms()[:3], SPACING)
        data = np.asarray(header.dataobj)
        assert data.max() > 800  # scanner units, not [0, 1]
        labels = nib.load(cohort / row.labels)
        assert labels.get_data_dtype() == np.uint8
        assert np.allclose(labels.affine, header.affine) and labels.shape == header.shape


def test_orientations_vary(cohort):
    codes = {
        "".join(nib.aff2axcodes(nib.load(cohort / t1w).affine)) for t1w in read_manifest(cohort).t1w
    }
    assert len(codes) >= 3


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PSR", "LAS", "IPL"])
def test_oriented_grid_is_the_same_box(axcodes):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 3.0)
    ras = Grid((4, 5, 6), affine)
    grid = oriented_grid(ras, axcodes)
    assert "".join(nib.aff2axcodes(grid.affine)) == axcodes
    before = np.sort(world_coordinates(ras).reshape(-1, 3), axis=0)
    after = np.sort(world_coordinates(grid).reshape(-1, 3), axis=0)
    assert np.allclose(before, after)


def test_invalid_arguments_are_reported(tmp_path):
    with pytest.raises(AtlasflowError, match="n_timepoints"):
        make_demo_cohort(tmp_path, n_long=1, n_timepoints=1)
    with pytest.raises(AtlasflowError, match="seed"):
        demo_manifest(seed=-1)
    with pytest.raises(AtlasflowError, match="at least one subject"):
        make_demo_cohort(tmp_path, n_cross=0, n_long=0)
    with pytest.raises(AtlasflowError, match="spacing"):
        make_demo_cohort(tmp_path, spacing_mm=0.0)


# ---------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    """Also: the same bytes whether subjects are rendered one after the other or by two forked
    workers (the workflow's demo_data job uses one per core)."""
    small = dict(n_cross=1, n_long=1, n_timepoints=2, spacing_mm=SPACING)
    make_demo_cohort(tmp_path / "a", seed=3, **small)
    make_demo_cohort(tmp_path / "b", seed=3, workers=2, **small)
    make_demo_cohort(tmp_path / "c", seed=4, n_cross=1, n_long=0, spacing_mm=SPACING)
    first, second, other = (file_digests(tmp_path / name) for name in "abc")
    assert len(first) > 20 and first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    control = "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    assert first[control] != other[control]
    truth = "truth/sub-01/ses-1/sub-01_ses-1_from-T1w_to-template_mode-image_xfm.nii.gz"
    assert first[truth] != other[truth]


# ---------------------------------------------------------------------------------- truth


def test_template_labels_match_nilearn_tissue_maps(cohort):
    from nilearn import datasets

    template = load_image(cohort / "truth/template_dseg.nii.gz", dtype=None)
    maps = [
        datasets.load_mni152_gm_template(resolution=1),
        datasets.load_mni152_wm_template(resolution=1),
        datasets.load_mni152_brain_mask(resolution=1),
    ]
    voxel = np.linalg.inv(maps[0].affine) @ template.affine
    coords = world_coordinates(Grid(template.grid.shape, voxel))
    gm, wm, mask = (
        ndimage.map_coordinates(m.get_fdata(), np.moveaxis(coords, -1, 0), order=1) for m in maps
    )
    expected = np.argmax(np.stack([np.clip(mask - gm - wm, 0, 1), gm, wm]), 0) + 1
    expected[mask < 0.5] = 0
    assert (template.data == expected).mean() > 0.9


def test_labels_match_intensities(cohort):
    for row in read_manifest(cohort).itertuples():
        image = load_image(cohort / row.t1w).data
        labels = load_image(cohort / row.labels, dtype=None).data
        csf, gm, wm = (np.median(image[labels == k]) for k in (1, 2, 3))
        assert csf < gm < wm, (row.subject, row.session, csf, gm, wm)
        if row.tumor_mask:
            mask = load_image(cohort / row.tumor_mask, dtype=None).data
            assert np.array_equal(labels == 4, mask > 0)


def test_true_transform_brings_subject_onto_template(cohort):
    template = load_image(cohort / "truth/template_T1w.nii.gz")
    template_labels = load_image(cohort / "truth/template_dseg.nii.gz", dtype=None)
    brain = template_labels.data > 0
    for row in read_manifest(cohort).itertuples():
        scan = load_image(cohort / row.t1w)
        truth = truth_transform(cohort, row.subject, row.session, "from-T1w_to-template_mode-image")
        assert truth.displacement.grid.same_as(template.grid)
        assert folding_fraction(truth.displacement) == 0.0
        assert np.abs(truth.displacement.data).max() > 3.0  # the subject differs from the template
        warped = pull_back(scan, truth, template.grid)
        unwarped = pull_back(scan, Transform.identity(), template.grid)
        true_corr = correlation(warped, template.data, brain)
        identity_corr = correlation(unwarped, template.data, brain)
        assert true_corr > 0.75 and true_corr > identity_corr + 0.25, (
            row.subject,
            true_corr,
            identity_corr,
        )
        # the package's warping agrees with the independent resampling
        ours = apply_transform(scan, truth, template.grid).data
        assert correlation(ours, warped, brain) > 0.999
        labels = load_image(cohort / row.labels, dtype=None)
        warped_labels = pull_back(labels, truth, template.grid, order=0)
        healthy = brain & (warped_labels != 4)
        assert (warped_labels == template_labels.data)[healthy].mean() > 0.7


def test_true_template_is_the_centre_of_the_controls(cohort):
    """The controls' velocity fields are centred, so their true warps average to nearly nothing
    (second order), where 3 independent fields would keep a mean of ~1/sqrt(3) of their size."""
    brain = load_image(cohort / "truth/template_dseg.nii.gz", dtype=None).data > 0
    controls = read_manifest(cohort).query("group == 'control'")
    warps = [
        truth_transform(cohort, row.subject, row.session, "from-T1w_to-template_mode-image").displacement.data
        for row in controls.itertuples()
    ]
    assert len(warps) == 3
    own = np.mean([np.linalg.norm(w, axis=-1)[brain].mean() for w in warps])
    centre = np.linalg.norm(np.mean(warps, axis=0), axis=-1)[brain].mean()
    assert own > 1.0 and centre < 0.15 * own, (centre, own)


def test_tumour_volumes_grow_and_match_masks(cohort):
    table = read_manifest(cohort)
    volumes = pd.read_csv(
        cohort / "truth/tumor_volumes.tsv", sep="\t", dtype={"subject": str, "session": str}
    )
    assert len(volumes) == 3
    for row in volumes.itertuples():
        scan = table[(table.subject == row.subject) & (table.session == row.session)].iloc[0]
        mask = load_image(cohort / scan.tumor_mask, dtype=None)
        voxel_mm3 = abs(np.linalg.det(mask.affine[:3, :3]))
        assert row.volume_mm3 == pytest.approx(mask.data.sum() * voxel_mm3)
        assert row.volume_mm3 == pytest.approx(row.true_volume_mm3, rel=0.15)
    assert np.all(np.diff(volumes.volume_mm3) > 0)
    assert np.all(np.diff(volumes.true_volume_mm3) > 0)
    assert np.all(np.diff(volumes.days) > 0)


def test_mass_effect_jacobian_matches_volume_change(cohort):
    table = read_manifest(cohort)
    volumes = pd.read_csv(
        cohort / "truth/tumor_volumes.tsv", sep="\t", dtype={"subject": str, "session": str}
    )
    baseline_row = table[(table.group == "tumour") & (table.session == "1")].iloc[0]
    baseline = load_image(cohort / baseline_row.t1w)
    baseline_mask = load_image(cohort / baseline_row.tumor_mask).data > 0
    voxel_mm3 = abs(np.linalg.det(baseline.affine[:3, :3]))
    for row in table[(table.group == "tumour") & (table.session != "1")].itertuples():
        truth = truth_transform(cohort, row.subject, row.session, "from-T1w_to-baseline_mode-image")
        assert truth.displacement.grid.same_as(baseline.grid)
        det = jacobian_determinant(truth.displacement)
        assert det.min() > 0
        expected = volumes[
            (volumes.subject == row.subject) & (volumes.session == row.session)
        ].iloc[0]
        integrated = float((det[baseline_mask] - 1.0).sum() * voxel_mm3)
        assert integrated == pytest.approx(expected.true_volume_change_mm3, rel=0.2)
        # the follow-up tumour mapped back lands on the baseline tumour
        followup_mask = load_image(cohort / row.tumor_mask)
        mapped = pull_back(followup_mask, truth, baseline.grid, order=0) > 0
        unmapped = pull_back(followup_mask, Transform.identity(), baseline.grid, order=0) > 0
        assert dice(mapped, baseline_mask) > max(0.7, dice(unmapped, baseline_mask))
        assert mapped.sum() == pytest.approx(baseline_mask.sum(), rel=0.2)
        assert unmapped.sum() > 1.3 * baseline_mask.sum()


# ---------------------------------------------------------------------------- tumour model


@pytest.fixture
def tumour() -> TumourModel:
    return TumourModel.random(np.random.default_rng(7), np.array([1.0, -2.0, 3.0]))


def test_tumour_flow_is_a_flow(tumour):
    rng = np.random.default_rng(0)
    points = tumour.centre + rng.normal(0.0, 15.0, (500, 3))
    there = tumour.flow(points, 1.3)
    assert np.abs(tumour.flow(there, -1.3) - points).max() < 1e-3
    assert np.abs(tumour.flow(tumour.flow(points, 0.5), 0.8) - there).max() < 1e-3
    # growth is outward along the ray
    before = np.linalg.norm(points - tumour.centre, axis=1)
    after = np.linalg.norm(there - tumour.centre, axis=1)
    assert np.all(after >= before - 1e-9)
    assert np.allclose(
        np.cross(points - tumour.centre, there - tumour.centre), 0.0, atol=1e-6 * before.max() ** 2
    )


def test_tumour_flow_matches_scaling_and_squaring(tumour):
    """The RK4 ray flow against the package's SVF exponential of the same velocity field."""
    import torch

    spacing = 1.0
    grid = Grid((64, 64, 64), np.diag([spacing, spacing, spacing, 1.0]))
    grid.affine[:3, 3] = tumour.centre - spacing * 31.5
    points = world_coordinates(grid)
    tau = 0.6
    velocity = torch.from_numpy(
        np.moveaxis(tumour.velocity(points) * tau / spacing, -1, 0)[None].astype(np.float32)
    )
    exp = integrate_velocity(velocity, steps=10)[0].permute(1, 2, 3, 0).numpy() * spacing
    exact = tumour.flow(points, tau) - points
    inner = np.linalg.norm(points - tumour.centre, axis=-1) < 20.0
    assert np.abs(exp - exact)[inner].max() < 0.2
    assert np.abs(exact[inner]).max() > 2.0


def test_lesion_volume_formula_matches_voxel_count(tumour):
    spacing = 0.5
    half = 30.0
    shape = (int(2 * half / spacing),) * 3
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = tumour.centre - half + spacing / 2
    points = world_coordinates(Grid(shape, affine))
    tau = 1.4
    counted = (tumour.normalised(points)[0] < tumour.lesion_radius(tau)).sum() * spacing**3
    assert counted == pytest.approx(tumour.lesion_volume(tau), rel=0.01)
    assert tumour.lesion_volume(tau + 0.3) > tumour.lesion_volume(tau)
