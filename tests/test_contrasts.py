"""A session's other contrasts: alignment to the T1w, one-interpolation resampling into other
spaces, per-contrast atlases and difference maps (atlasflow.contrasts).

The phantom is nilearn's packaged MNI152 tissue maps (no download): a T1w-like and a FLAIR-like
scan of the same anatomy with opposite CSF contrast, the FLAIR on its own anisotropic, tilted and
shifted grid with a known transform, both with raw scanner-like intensities.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from factories import SHARED_DATA

from atlasflow.contrasts import session, spaces
from atlasflow.contrasts.plan import ContrastFiles, used_contrasts
from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Grid, Image, load_image, save_image
from atlasflow.io.itk import read_itk_affine, write_itk_affine
from atlasflow.transforms import Transform, apply_transform, rotation_matrix

TISSUE_T1 = (0.25, 0.6, 1.0)  # CSF, GM, WM
TISSUE_FLAIR = (0.08, 0.85, 0.6)


@lru_cache(maxsize=1)
def _tissues() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CSF, GM, WM probabilities and the MNI affine, on a 3 mm grid (cached: nilearn reads 1 mm)."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm_img = datasets.load_mni152_wm_template(resolution=1)
    brain_img = datasets.load_mni152_brain_mask(resolution=1)
    source = Image(np.asarray(gm_img.get_fdata(), np.float32), np.asarray(gm_img.affine, float))
    grid = Grid(
        tuple(int(s) for s in np.ceil(np.array(source.data.shape) / 3)),
        source.affine @ np.diag([3.0, 3.0, 3.0, 1.0]),
    )

    def on_grid(img) -> np.ndarray:
        image = Image(np.asarray(img.get_fdata(), np.float32), np.asarray(img.affine, float))
        return apply_transform(image, Transform.identity(), grid, "linear").data

    gm, wm, brain = on_grid(gm_img), on_grid(wm_img), on_grid(brain_img)
    csf = np.clip(brain - gm - wm, 0, 1)
    return csf, gm, wm, grid.affine


def _scan(contrast: tuple[float, float, float], seed: int, scale: float = 900.0) -> Image:
    csf, gm, wm, affine = _tissues()
    rng = np.random.default_rng(seed)
    data = contrast[0] * csf + contrast[1] * gm + contrast[2] * wm
    # a skull-like shell around the brain, as whole-head scans have
    head = apply_transform(Image((csf + gm + wm).astype(np.float32), affine), Transform(np.diag([0.88, 0.88, 0.88, 1])), Grid(csf.shape, affine)).data
    shell = np.clip(head - (csf + gm + wm), 0, 1)
    data = (data + 0.5 * shell) * scale + rng.normal(0, 0.02 * scale, data.shape)
    return Image(np.clip(data, 0, None).astype(np.float32), affine)


def _truth_map() -> np.ndarray:
    """T1w world -> FLAIR world: 4 degrees about x, 2 about z, shifted (3, -2, 5) mm."""
    world = np.eye(4)
    world[:3, :3] = rotation_matrix(np.radians([4.0, 0.0, 2.0]))
    world[:3, 3] = (3.0, -2.0, 5.0)
    return world


def _flair_on_own_grid(seed: int = 7, contrast=TISSUE_FLAIR) -> Image:
    """The FLAIR-like scan of the phantom, resampled onto a 2.5 x 2.5 x 4.5 mm grid through the
    truth map (its world is the T1w's moved by the map)."""
    flair_in_t1_world = _scan(contrast, seed)
    _, _, _, affine = _tissues()
    own_affine = affine @ np.diag([2.5 / 3, 2.5 / 3, 4.5 / 3, 1.0])
    own_affine[:3, 3] -= 6.0
    shape = tuple(int(s) for s in np.ceil(np.array(flair_in_t1_world.data.shape) * np.array([3 / 2.5, 3 / 2.5, 3 / 4.5])) + 4)
    # a FLAIR voxel at world y shows the anatomy the T1w has at inv(map) y
    return apply_transform(flair_in_t1_world, Transform(np.linalg.inv(_truth_map())), Grid(shape, own_affine))


def _reference() -> tuple[Image, np.ndarray]:
    """The T1w as the workflow's preprocessing leaves it: [0, 1] inside the brain mask, 0 outside."""
    csf, gm, wm, _ = _tissues()
    t1 = _scan(TISSUE_T1, 3)
    mask = (csf + gm + wm) > 0.5
    inside = t1.data[mask]
    low, high = np.percentile(inside, [1, 99])
    return t1.with_data(np.clip((t1.data - low) / (high - low), 0, 1) * mask), mask


def _point_error(world: np.ndarray, truth: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> float:
    xyz = np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3]
    a = xyz @ world[:3, :3].T + world[:3, 3]
    b = xyz @ truth[:3, :3].T + truth[:3, 3]
    return float(np.linalg.norm(a - b, axis=1).mean())


# ------------------------------------------------------------------------------ alignment


def test_a_flair_on_its_own_tilted_grid_is_aligned_to_the_t1w_within_a_millimetre():
    reference, mask = _reference()
    flair = _flair_on_own_grid()
    before = _point_error(np.eye(4), _truth_map(), mask, reference.affine)
    found = session.align_contrast(flair, reference, mask)
    error = _point_error(found.world, _truth_map(), mask, reference.affine)
    assert before > 5.0
    assert error < 1.0, error
    assert found.nmi_after > found.nmi_scanner
    assert found.flags() == []


def test_normalised_contrast_keeps_the_bright_tail_and_masks_the_brain():
    reference, mask = _reference()
    flair = _flair_on_own_grid()
    native, preproc = session.normalise_contrast(flair, _truth_map(), reference, mask)
    assert native.grid.same_as(flair.grid) and preproc.grid.same_as(reference.grid)
    assert np.all(preproc.data[~mask] == 0) and preproc.data.min() >= 0
    inside = preproc.data[mask]
    assert 0.97 < np.percentile(inside, 99) < 1.03 and inside.max() > 1.0  # not clipped at 1
    csf, gm, wm, _ = _tissues()
    # FLAIR-like contrast survives: grey matter brighter than white, CSF darkest
    assert preproc.data[gm > 0.7].mean() > preproc.data[wm > 0.7].mean() > preproc.data[csf > 0.7].mean()


def test_another_head_is_refused_with_one_line_and_nothing_written(tmp_path: Path):
    reference, mask = _reference()
    # Another head: the same tissues with their contrast scrambled (no intensity relation to the
    # T1w's anatomy survives), on the FLAIR's grid.
    other = _flair_on_own_grid(seed=11, contrast=(0.9, 0.2, 0.55))
    rng = np.random.default_rng(0)
    other = other.with_data(np.roll(other.data, (9, -7, 3), axis=(0, 1, 2)) * rng.uniform(0.6, 1.4, other.data.shape).astype(np.float32))
    ref_path = save_image(reference, tmp_path / "ref.nii.gz")
    mask_path = save_image(reference.with_data(mask.astype(np.uint8)), tmp_path / "mask.nii.gz")
    other_path = save_image(other, tmp_path / "other_FLAIR.nii.gz")
    outs = [tmp_path / f"out{i}" for i in range(4)]
    with pytest.raises(AtlasflowError) as info:
        session.run_align(other_path, ref_path, mask_path, *outs, n4=False, min_nmi=1.03, max_shift_mm=4.0)
    assert "other_FLAIR.nii.gz" in str(info.value) and "\n" not in str(info.value)
    assert not any(p.exists() for p in outs)


def test_run_align_writes_the_transform_the_preproc_and_the_qc(tmp_path: Path):
    reference, mask = _reference()
    ref_path = save_image(reference, tmp_path / "ref.nii.gz")
    mask_path = save_image(reference.with_data(mask.astype(np.uint8)), tmp_path / "mask.nii.gz")
    flair_path = save_image(_flair_on_own_grid(), tmp_path / "FLAIR.nii.gz")
    out = {k: tmp_path / f"{k}.nii.gz" for k in ("native", "preproc")}
    session.run_align(flair_path, ref_path, mask_path, out["native"], tmp_path / "x.mat", out["preproc"], tmp_path / "qc.json", n4=True)
    world = read_itk_affine(tmp_path / "x.mat")
    assert _point_error(world, _truth_map(), mask, reference.affine) < 1.0
    metrics = json.loads((tmp_path / "qc.json").read_text())
    assert metrics["qc_pass"] and metrics["nmi_after"] >= metrics["nmi_scanner"]
    assert load_image(out["preproc"]).grid.same_as(reference.grid)


# ------------------------------------------------------------------------ other spaces


def test_one_interpolation_through_the_composed_transform(tmp_path: Path):
    """The contrast in a space equals the T1w-space anatomy carried by the space's transform."""
    reference, mask = _reference()
    flair = _flair_on_own_grid()
    native, preproc = session.normalise_contrast(flair, _truth_map(), reference, mask)
    # a space = the T1w world shifted by 6 mm and turned 3 degrees (an affine-only transform)
    to_space = np.eye(4)
    to_space[:3, :3] = rotation_matrix(np.radians([0.0, 3.0, 0.0]))
    to_space[:3, 3] = (0.0, 6.0, 0.0)
    composed = spaces.contrast_in_space(native, _truth_map(), Transform(to_space), reference)
    twice = apply_transform(preproc, Transform(to_space), reference.grid)
    inner = apply_transform(reference.with_data(mask.astype(np.float32)), Transform(to_space), reference.grid).data > 0.99
    from scipy import ndimage

    inner = ndimage.binary_erosion(inner, iterations=2)
    # same anatomy (two interpolations blur a little more than one)
    corr = np.corrcoef(composed.data[inner], twice.data[inner])[0, 1]
    assert corr > 0.95, corr
    # and the files path: run_warp reads the same transforms from disk
    paths = {
        "native": save_image(native, tmp_path / "native.nii.gz"),
        "session": write_itk_affine(_truth_map(), tmp_path / "s.mat"),
        "space": write_itk_affine(to_space, tmp_path / "a.mat"),
        "fixed": save_image(reference, tmp_path / "fixed.nii.gz"),
    }
    written = spaces.run_warp(paths["native"], paths["session"], paths["space"], None, paths["fixed"], tmp_path / "w.nii.gz")
    np.testing.assert_allclose(written.data, composed.data, atol=1e-4)


def test_change_is_zero_without_change_and_shows_a_new_lesion(tmp_path: Path):
    reference, mask = _reference()
    flair = _flair_on_own_grid()
    native, preproc = session.normalise_contrast(flair, _truth_map(), reference, mask)
    paths = {
        "native": save_image(native, tmp_path / "native.nii.gz"),
        "session": write_itk_affine(_truth_map(), tmp_path / "s.mat"),
        "identity": write_itk_affine(np.eye(4), tmp_path / "i.mat"),
        "baseline": save_image(preproc, tmp_path / "baseline.nii.gz"),
    }
    diff_of = lambda followup, name: load_image(tmp_path / name) if spaces.run_change(  # noqa: E731
        followup, paths["session"], paths["native"], paths["session"], paths["identity"], None,
        paths["baseline"], tmp_path / f"w{name}", tmp_path / name,
    ) else None  # fmt: skip
    diff = diff_of(paths["native"], "d.nii.gz")
    assert np.abs(diff.data[mask]).mean() < 0.02
    # a bright lesion in the follow-up shows as a positive blob where it is
    lesion = np.zeros(native.data.shape, bool)
    centre = np.array(native.data.shape) // 2
    lesion[tuple(slice(c - 2, c + 2) for c in centre)] = True
    followup = native.with_data(native.data + 1.0 * lesion)
    save_image(followup, tmp_path / "fu.nii.gz")
    diff = diff_of(tmp_path / "fu.nii.gz", "d2.nii.gz")
    lesion_world = native.affine[:3, :3] @ centre + native.affine[:3, 3]
    at = np.linalg.inv(reference.affine) @ np.linalg.inv(_truth_map()) @ np.append(lesion_world - 0.5 * np.diag(native.affine)[:3], 1)
    i, j, k = np.round(at[:3]).astype(int)
    assert diff.data[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2].max() > 0.5
    assert np.abs(diff.data[mask]).mean() < 0.05


def test_the_contrast_atlas_is_the_members_mean(tmp_path: Path):
    a = Image(np.full((4, 5, 6), 1.0, np.float32), np.eye(4))
    b = a.with_data(np.full((4, 5, 6), 3.0, np.float32))
    paths = [save_image(a, tmp_path / "a.nii.gz"), save_image(b, tmp_path / "b.nii.gz")]
    out = spaces.run_average(paths, tmp_path / "atlas.nii.gz")
    np.testing.assert_allclose(out.data, 2.0)
    shifted = Image(b.data, np.diag([2.0, 2.0, 2.0, 1.0]))
    save_image(shifted, tmp_path / "c.nii.gz")
    with pytest.raises(AtlasflowError, match="c.nii.gz"):
        spaces.run_average([paths[0], tmp_path / "c.nii.gz"], tmp_path / "x.nii.gz")


# --------------------------------------------------------------------------- planning


def test_contrasts_used_are_configured_and_present():
    assert used_contrasts({}, {"flair", "t2w"}) == ["t2w", "flair"]
    assert used_contrasts({"contrasts": {"use": ["flair"]}}, {"flair", "t2w"}) == ["flair"]
    assert used_contrasts({"contrasts": {"use": []}}, {"flair"}) == []


def test_contrast_file_names():
    files = ContrastFiles("out")
    assert files.native("flair", "1", "2").endswith("sub-1_ses-2_space-orig_desc-preproc_FLAIR.nii.gz")
    assert files.in_space("t1ce", "template", "1", "2").endswith(
        "sub-1_ses-2_ce-gadolinium_space-template_desc-warped_T1w.nii.gz"
    )
    assert files.session_affine("t1ce", "1", "2").endswith("sub-1_ses-2_from-ceT1w_to-T1w_mode-image_xfm.mat")
    assert files.difference("flair", "atlas", "1", "2").endswith("space-atlas_desc-difference_FLAIR.nii.gz")


# ------------------------------------------------------------------------------ real data

OPEN_MS = SHARED_DATA / "open_ms" / "patient01"


@pytest.mark.slow
@pytest.mark.skipif(not OPEN_MS.is_dir(), reason="shared open_ms data absent")
def test_open_ms_flair_onto_its_t1w_agrees_with_the_authors(tmp_path: Path):
    """patient01 study1: the raw FLAIR onto the T1W (brain-masked, normalised as the workflow
    does), against the authors' own alignment: mean point error over the brain under 1 mm."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from open_ms_points import reference_map

    from atlasflow.preprocess.steps import to_ras
    from atlasflow.registration.inputs import foreground_mask, normalise_intensities

    t1 = to_ras(load_image(OPEN_MS / "study1_T1W.nii.gz"))
    norm = normalise_intensities(t1.data)
    head = foreground_mask(norm, t1.grid.spacing)
    found = session.align_contrast(load_image(OPEN_MS / "study1_FLAIR.nii.gz"), t1.with_data(norm * head), head)
    truth = reference_map(OPEN_MS, "study1_T1W", "study1_FLAIR")
    assert _point_error(found.world, truth, head, t1.affine) < 1.0


def test_a_mask_drawn_on_the_flair_is_carried_through_the_session_alignment(tmp_path: Path):
    """A lesion mask on the FLAIR's grid lands on the T1w's anatomy through the FLAIR's
    alignment; through the scanner's coordinates it would sit where the head was in the FLAIR."""
    from atlasflow.preprocess.steps import carry_labels

    reference, mask = _reference()
    csf, gm, wm, affine = _tissues()
    wm_t1 = Image((wm > 0.5).astype(np.uint8), affine)
    # the white matter drawn on the FLAIR's grid (what a person would draw on the FLAIR)
    flair = _flair_on_own_grid()
    drawn = apply_transform(wm_t1, Transform(np.linalg.inv(_truth_map())), flair.grid, "nearest")
    paths = {
        "t1w": save_image(reference, tmp_path / "t1w.nii.gz"),
        "flair": save_image(flair, tmp_path / "flair.nii.gz"),
        "mask": save_image(drawn, tmp_path / "mask.nii.gz"),
        "xfm": write_itk_affine(_truth_map(), tmp_path / "flair_to_t1w.mat"),
    }

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return 2 * float((a & b).sum()) / float(a.sum() + b.sum())

    carried = carry_labels(paths["mask"], paths["t1w"], tmp_path / "a.nii.gz", t1w_path=paths["t1w"],
                           contrast_grids=[(paths["flair"], paths["xfm"])]).data > 0  # fmt: skip
    plain = carry_labels(paths["mask"], paths["t1w"], tmp_path / "b.nii.gz").data > 0
    truth = wm_t1.data > 0
    assert dice(carried, truth) > 0.85 > dice(plain, truth) + 0.1, (dice(carried, truth), dice(plain, truth))


def test_a_contrast_constant_inside_the_brain_is_refused():
    reference, mask = _reference()
    constant = reference.with_data(np.full(reference.data.shape, 5.0, np.float32))
    with pytest.raises(AtlasflowError, match="is constant inside the T1w's brain mask"):
        session.normalise_contrast(constant, np.eye(4), reference, mask)
