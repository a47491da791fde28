"""Preprocessing steps on small volumes with known answers, and on a real IXI head when present."""

import numpy as np
import pytest
from scipy import ndimage

from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Image, load_image, save_image
from atlasflow.preprocess import steps as pp
from atlasflow.preprocess.reference import prepare_template
from atlasflow.transforms import world_coordinates


def psr(image: Image) -> Image:
    """The same image stored with axes P, S, R (like the IXI scans)."""
    data = np.transpose(image.data, (1, 2, 0))[::-1]  # axes now (A->P flipped, S, R)
    ras_from_psr = np.zeros((4, 4))
    ras_from_psr[0, 2] = 1
    ras_from_psr[1, 0] = -1
    ras_from_psr[2, 1] = 1
    ras_from_psr[3, 3] = 1
    ras_from_psr[1, 3] = data.shape[0] - 1
    return Image(np.ascontiguousarray(data), image.affine @ ras_from_psr)


def test_psr_helper_is_the_same_image_in_world_space(blob):
    stored = psr(blob)
    w_orig = world_coordinates(blob.grid)[3, 4, 5]
    # the voxel holding blob[3, 4, 5] in the PSR array
    ijk = np.linalg.inv(stored.affine) @ np.append(w_orig, 1)
    assert stored.data[tuple(np.rint(ijk[:3]).astype(int))] == blob.data[3, 4, 5]


def test_reorient_to_ras_restores_axes_without_resampling(tmp_path, blob):
    save_image(psr(blob), tmp_path / "psr.nii.gz")
    out = pp.reorient(tmp_path / "psr.nii.gz", tmp_path / "ras.nii.gz")
    np.testing.assert_array_equal(out.data, blob.data)
    np.testing.assert_allclose(out.affine, blob.affine, atol=1e-6)


def test_constant_image_is_rejected(tmp_path, blob):
    save_image(blob.with_data(np.zeros_like(blob.data)), tmp_path / "zero.nii.gz")
    with pytest.raises(AtlasflowError, match="constant"):
        pp.reorient(tmp_path / "zero.nii.gz", tmp_path / "out.nii.gz")


def test_normalise_maps_percentiles_to_unit_range(blob):
    mask = blob.data > 0.2
    out = pp.normalise_intensity(blob.data * 500 + 30, mask)
    assert out.min() == 0 and out.max() == 1
    assert np.all(out[~mask] == 0)
    order = np.argsort(blob.data[mask])
    assert np.all(np.diff(out[mask][order]) >= -1e-6), "normalisation must be monotonic"


def test_bias_correction_flattens_a_smooth_bias(tmp_path):
    # Piecewise-constant "tissues" (N4 must not mistake real contrast for bias) under a smooth ramp.
    x = np.linspace(-1, 1, 32)
    r = np.sqrt(sum(g**2 for g in np.meshgrid(x, x, x, indexing="ij")))
    checker = (np.add.outer(np.add.outer(np.arange(32) // 4, np.arange(32) // 4), np.arange(32) // 4) % 2)
    tissue = np.where(r < 0.85, 1.0 + checker, 0.0).astype(np.float32)
    image = Image(tissue, np.diag([2.0, 2.0, 2.0, 1.0]))
    bias = np.exp(0.4 * x)[:, None, None] * np.ones((32, 32, 32))
    save_image(image.with_data(image.data * bias * 100), tmp_path / "biased.nii.gz")
    out = pp.bias_correct(tmp_path / "biased.nii.gz", tmp_path / "n4.nii.gz")
    mask = tissue > 0

    def left_right_ratio(data):
        return data[:14][mask[:14]].mean() / data[18:][mask[18:]].mean()

    before = left_right_ratio(image.data * bias)
    after = left_right_ratio(out.data)
    truth = left_right_ratio(image.data)
    assert abs(after - truth) < 0.5 * abs(before - truth)


def test_brain_mask_from_labels_and_finalize(tmp_path, blob):
    labels = blob.with_data((blob.data > 0.4).astype(np.uint8) * 3)
    save_image(blob, tmp_path / "t1.nii.gz")
    save_image(labels, tmp_path / "labels.nii.gz")
    mask = pp.brain_mask(tmp_path / "t1.nii.gz", tmp_path / "mask.nii.gz", labels=tmp_path / "labels.nii.gz")
    assert mask.data.sum() >= (labels.data > 0).sum()
    out = pp.finalize(tmp_path / "t1.nii.gz", tmp_path / "mask.nii.gz", tmp_path / "pre.nii.gz", tmp_path / "prem.nii.gz", spacing=3.0)
    np.testing.assert_allclose(out.grid.spacing, 3.0)
    assert out.data.max() <= 1.0 and out.data.min() >= 0.0
    carried = pp.carry_labels(tmp_path / "labels.nii.gz", tmp_path / "pre.nii.gz", tmp_path / "lab.nii.gz")
    assert carried.data.shape == out.data.shape
    assert set(np.unique(carried.data)) == {0, 3}


def test_empty_brain_mask_is_rejected(tmp_path, blob):
    save_image(blob, tmp_path / "t1.nii.gz")
    save_image(blob.with_data(np.zeros(blob.data.shape, np.uint8)), tmp_path / "empty.nii.gz")
    with pytest.raises(AtlasflowError, match="empty"):
        pp.brain_mask(tmp_path / "t1.nii.gz", tmp_path / "m.nii.gz", given_mask=tmp_path / "empty.nii.gz")


def test_a_tumour_is_inside_the_brain_mask_whatever_the_mask_came_from(tmp_path, blob):
    """A brain mask (here given; from labels or the template alike) that cuts off part of the
    session's tumour gets the tumour added: the tumour is brain, and what lies outside the mask
    is zeroed by the preprocessing and may fall off the working grid. The tumour mask comes on
    its own grid (another contrast's, 1 mm), read through the scanner's coordinates."""
    save_image(blob, tmp_path / "t1.nii.gz")
    brain = blob.data > 0.4
    save_image(blob.with_data(brain.astype(np.uint8)), tmp_path / "brain.nii.gz")
    # a tumour astride the brain's edge, drawn on a finer grid shifted by half a voxel
    ci, cj = np.array(brain.shape[:2]) // 2
    edge = np.array([ci, cj, np.nonzero(brain[ci, cj])[0].max()])  # the top of the brain
    centre = edge @ blob.affine[:3, :3].T + blob.affine[:3, 3]
    fine = np.eye(4)
    fine[:3, 3] = centre - 20.0 + 0.5
    points = np.stack(np.meshgrid(*[np.arange(40.0)] * 3, indexing="ij"), -1) + fine[:3, 3]
    tumour = np.linalg.norm(points - centre, axis=-1) < 6.0
    save_image(Image(tumour.astype(np.uint8), fine), tmp_path / "tumour.nii.gz")
    assert (tumour.sum() > 0) and not np.all(brain)

    plain = pp.brain_mask(tmp_path / "t1.nii.gz", tmp_path / "m0.nii.gz", given_mask=tmp_path / "brain.nii.gz")
    mask = pp.brain_mask(
        tmp_path / "t1.nii.gz",
        tmp_path / "m.nii.gz",
        given_mask=tmp_path / "brain.nii.gz",
        lesion_mask=tmp_path / "tumour.nii.gz",
    )
    on_scan = pp.carry_labels(tmp_path / "tumour.nii.gz", tmp_path / "t1.nii.gz", tmp_path / "t.nii.gz").data > 0
    assert on_scan.any() and not (plain.data > 0)[on_scan].all()  # the given mask cut it
    assert (mask.data > 0)[on_scan].all()
    assert ((mask.data > 0) & ~(plain.data > 0)).sum() <= ndimage.binary_dilation(on_scan).sum()


def test_a_tumour_mask_that_misses_the_scan_is_rejected_by_name(tmp_path, blob):
    """A mask whose voxels do not land on the preprocessed grid (another patient's, a broken
    header) is one clear error naming it, not a silently empty tumour."""
    save_image(blob, tmp_path / "pre.nii.gz")
    far = Image(np.ones((4, 4, 4), np.uint8), np.diag([1.0, 1.0, 1.0, 1.0]))
    far.affine[:3, 3] = 500.0
    save_image(far, tmp_path / "far_mask.nii.gz")
    with pytest.raises(AtlasflowError, match="far_mask.nii.gz"):
        pp.carry_labels(
            tmp_path / "far_mask.nii.gz", tmp_path / "pre.nii.gz", tmp_path / "out.nii.gz", lesion=True
        )
    assert not (tmp_path / "out.nii.gz").exists()
    # on the grid it is carried as before
    near = far.with_data(far.data)
    near.affine[:3, 3] = 0.0
    save_image(near, tmp_path / "near_mask.nii.gz")
    out = pp.carry_labels(tmp_path / "near_mask.nii.gz", tmp_path / "pre.nii.gz", tmp_path / "out.nii.gz", lesion=True)
    assert out.data.any()


def test_mni152_template_is_written_on_the_working_grid(tmp_path):
    out = prepare_template("mni152", 4.0, tmp_path / "t.nii.gz", tmp_path / "m.nii.gz")
    np.testing.assert_allclose(out.grid.spacing, 4.0)
    mask = load_image(tmp_path / "m.nii.gz").data
    assert 0.1 < mask.mean() < 0.6
    assert out.data[mask > 0].mean() > 0.3


@pytest.mark.slow
def test_real_psr_head_is_reoriented_and_masked(tmp_path, shared_data):
    t1 = shared_data / "ixi10/t1w/IXI012-HH-1211-T1_ds.nii.gz"
    labels = shared_data / "ixi10/labels/IXI012-HH-1211-T1_ds_DLMUSE.nii.gz"
    ras = pp.reorient(t1, tmp_path / "r.nii.gz")
    import nibabel as nib

    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    pp.brain_mask(tmp_path / "r.nii.gz", tmp_path / "m.nii.gz", labels=labels)
    out = pp.finalize(tmp_path / "r.nii.gz", tmp_path / "m.nii.gz", tmp_path / "p.nii.gz", tmp_path / "pm.nii.gz")
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    assert 60 < out.data.shape[0] < 120


def _mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_template_mask_finds_the_brain_in_a_moved_whole_head(tmp_path):
    """Known truth: the template brain inside a bright scalp and a neck, turned 20 degrees and
    moved 25 mm; the mask carried from the (skull-stripped) template must find that brain, not
    stretch the template over the head."""
    from scipy import ndimage

    from atlasflow.transforms import Transform, apply_transform, rotation_matrix

    template = prepare_template("mni152", 4.0, tmp_path / "t.nii.gz", tmp_path / "tm.nii.gz")
    tmask = load_image(tmp_path / "tm.nii.gz").data > 0
    # Head: brain (template intensities), a dark gap, a bright 12 mm scalp and a neck below.
    pad = 8
    brain = np.pad(template.data, pad)
    inside = np.pad(tmask, pad)
    shell = ndimage.binary_dilation(inside, iterations=5) & ~ndimage.binary_dilation(inside, iterations=2)
    neck = np.zeros_like(inside)
    centre = np.array(inside.shape) // 2
    neck[centre[0] - 8 : centre[0] + 8, centre[1] - 10 : centre[1] + 6, : pad + 12] = True
    head = np.where(inside, brain, 0.0) + 1.0 * shell + 0.6 * (neck & ~inside & ~shell)
    affine = template.affine.copy()
    affine[:3, 3] -= 4.0 * pad
    head_img = Image(head.astype(np.float32), affine)
    # The scan: that head seen through a rigid movement (a world map scan -> head).
    move = np.eye(4)
    move[:3, :3] = rotation_matrix(np.radians([20.0, -10.0, 5.0]))
    move[:3, 3] = [25.0, -15.0, 10.0]
    scan = apply_transform(head_img, Transform(move), head_img.grid)
    truth = apply_transform(head_img.with_data(inside.astype(np.float32)), Transform(move), head_img.grid).data > 0.5
    save_image(Image(scan.data * 300.0 + 20.0, scan.affine), tmp_path / "scan.nii.gz", dtype=np.int16)

    mask = pp.brain_mask(
        tmp_path / "scan.nii.gz", tmp_path / "m.nii.gz", template=template, template_mask=tmask
    ).data > 0
    assert (mask & truth).sum() / truth.sum() > 0.97
    assert _mask_dice(mask, ndimage.binary_dilation(truth, iterations=2)) > 0.85


def test_template_mask_on_real_whole_heads(tmp_path, shared_data):
    """Three IXI heads (neck and scalp, PSR, no labels given): the template's brain, deformed onto
    each, covers the labelled brain and hugs it (the affine alone scores Dice 0.85-0.92 here)."""
    from scipy import ndimage

    template = prepare_template("mni152", 2.0, tmp_path / "t.nii.gz", tmp_path / "tm.nii.gz")
    tmask = load_image(tmp_path / "tm.nii.gz").data > 0
    for name in ("IXI012-HH-1211-T1_ds", "IXI013-HH-1212-T1_ds", "IXI039-HH-1261-T1_ds"):
        ras = pp.to_ras(load_image(shared_data / f"ixi10/t1w/{name}.nii.gz"))
        save_image(ras, tmp_path / "ras.nii.gz")
        mask = pp.brain_mask(
            tmp_path / "ras.nii.gz", tmp_path / "m.nii.gz", template=template, template_mask=tmask
        ).data > 0
        labels = pp.to_ras(load_image(shared_data / f"ixi10/labels/{name}_DLMUSE.nii.gz", dtype=None)).data > 0
        assert (mask & labels).sum() / labels.sum() > 0.95, name
        assert _mask_dice(mask, ndimage.binary_dilation(labels, iterations=1)) > 0.93, name


def test_contrast_class_tells_t1w_from_t2w_and_flair(tmp_path, shared_data):
    """Real heads after the affine alone: T1W is deformed onto, T2W and FLAIR are not (local
    correlation across contrasts would move the brain's edge to the wrong tissue); each gets its
    contrast class."""
    from atlasflow.registration.initial import initial_alignment
    from atlasflow.registration.inputs import prepare
    from atlasflow.transforms import Transform, apply_transform

    template = prepare_template("mni152", 2.0, tmp_path / "t.nii.gz", tmp_path / "tm.nii.gz")
    tmask = load_image(tmp_path / "tm.nii.gz").data > 0
    assert pp.contrast_class(template, template.data, tmask) == "T1-like"
    inverted = np.where(tmask, 1.2 - template.data, 0.0)
    assert pp.contrast_class(template, inverted, tmask) != "T1-like"
    classes = {"T1W": "T1-like", "T2W": "T2-like", "FLAIR": "FLAIR-like"}
    for contrast, expected in classes.items():
        scan = pp.to_ras(load_image(shared_data / f"open_ms/patient04/study1_{contrast}.nii.gz"))
        world = initial_alignment(prepare(template, tmask), prepare(scan))
        seen = apply_transform(scan, Transform(world), template.grid).data
        # white matter against grey tells the T1W; the CSF a T2w (bright) from a FLAIR (suppressed)
        assert pp.contrast_class(template, seen, tmask) == expected, contrast
    # a scan that shows nothing where the template's brain is has no class
    assert pp.contrast_class(template, np.zeros_like(template.data), tmask) is None
