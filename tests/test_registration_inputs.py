"""The engine's input contract: raw intensities, any dtype, orientation and voxel size, no masks,
pairs far apart and of different contrasts (atlasflow.registration.inputs and .initial)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from factories import blob_image

from atlasflow.io.images import Grid, Image, load_image
from atlasflow.preprocess.reference import load_mni152
from atlasflow.registration import initial, inputs
from atlasflow.registration.api import register
from atlasflow.registration.qc import dice_per_label
from atlasflow.transforms import Transform, apply_transform, rotation_matrix


def test_normalisation_ignores_scale_offset_and_dtype():
    image = blob_image(shape=(28, 32, 24))
    raw = np.round(image.data.clip(0) * 200).astype(np.uint8)
    reference = inputs.normalise_intensities(raw)
    for variant in (raw.astype(np.int16) * 16, raw.astype(np.float32) * 1000 + 500):
        np.testing.assert_allclose(inputs.normalise_intensities(variant), reference, atol=1e-5)
    assert reference.min() == 0.0 and reference.max() == 1.0


def test_preprocessed_scans_are_recognised_and_raw_ones_are_not():
    image = blob_image(shape=(28, 32, 24))
    mask = image.data > 0.1
    assert inputs.is_normalised(image.data, mask)
    assert not inputs.is_normalised(image.data * 255, mask)
    assert not inputs.is_normalised(image.data + 500, mask)
    assert not inputs.needs_preparation(image, image, mask, mask)
    assert inputs.needs_preparation(image, image.with_data(image.data * 255), mask, None)


def test_foreground_mask_finds_the_head_in_noise():
    image = blob_image(shape=(32, 32, 32))
    rng = np.random.default_rng(0)
    truth = image.data > 0.1
    # tissue of varied brightness (and a dark core, like ventricles) in a noisy background
    tissue = np.where(truth, 0.5 + 0.5 * np.clip(image.data, 0, 1), 0)
    tissue[14:18, 14:18, 14:18] = 0.05
    noisy = tissue * 300 + rng.normal(20, 5, image.data.shape)
    mask = inputs.foreground_mask(inputs.normalise_intensities(noisy), image.grid.spacing)
    overlap = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert overlap > 0.9
    assert not mask[0, 0, 0] and not mask[-1, -1, -1]


def test_anisotropic_or_fine_grids_get_an_isotropic_working_grid():
    thick = Grid((64, 64, 10), np.diag([0.7, 0.7, 4.0, 1.0]))
    assert inputs.needs_working_grid(thick)
    assert inputs.needs_working_grid(Grid((200, 200, 200), np.diag([1.0, 1.0, 1.0, 1.0])))
    assert not inputs.needs_working_grid(Grid((90, 100, 90), np.diag([2.0, 2.0, 2.0, 1.0])))
    work = inputs.isotropic_grid(thick)
    np.testing.assert_allclose(work.spacing, 2.0)
    # the new grid covers the old one's extent (64 * 0.7 = 44.8 mm, 10 * 4 = 40 mm)
    extent = np.array(work.shape) * 2.0
    assert extent[0] >= 44.8 and extent[2] >= 40.0


def test_mutual_information_is_highest_when_aligned_even_across_contrasts():
    image = blob_image(shape=(28, 32, 24))
    a = torch.from_numpy(np.clip(image.data, 0, 1).ravel())
    inverted = 1 - a  # a T2-like contrast of the same anatomy
    shifted = torch.from_numpy(np.clip(np.roll(image.data, 3, 0), 0, 1).ravel())
    assert initial.parzen_nmi(a, inverted) > initial.parzen_nmi(a, 1 - shifted) + 0.05


@pytest.fixture(scope="module")
def mni_4mm() -> tuple[Image, np.ndarray]:
    template, mask = load_mni152()
    grid = Grid(
        tuple(int(n) // 4 for n in template.data.shape),
        template.affine @ np.diag([4.0, 4.0, 4.0, 1.0]),
    )
    image = apply_transform(
        template.with_data(template.data * mask), Transform.identity(), grid, "linear"
    )
    return image, image.data > 0.05 * image.data.max()


def _rigid(angle_deg: float, shift_mm: np.ndarray, centre: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = rotation_matrix(np.radians([angle_deg, 0.0, 0.0]))
    out[:3, 3] = centre + shift_mm - out[:3, :3] @ centre
    return out


def test_initial_alignment_recovers_30_degrees_and_40_mm_across_contrasts(mni_4mm):
    """The moving scan is the template turned 30 degrees, moved 40 mm and with its contrast
    inverted inside the head (bright white matter becomes dark): the start found must be within
    a few millimetres of the truth over the head."""
    fixed, head = mni_4mm
    centre = initial.centre_of_mass(fixed.data, fixed.affine)
    truth = _rigid(30.0, np.array([25.0, -25.0, 20.0]), centre)  # 40 mm shift, 30 degrees
    # moving(y) = fixed(truth^-1 y): sample the fixed image at the inverse mapping on a moving grid
    moving_grid = Grid(fixed.grid.shape, truth @ fixed.affine)
    moving = apply_transform(fixed, Transform(np.linalg.inv(truth)), moving_grid, "linear")
    inside = moving.data > 0.05 * fixed.data.max()
    moving = moving.with_data(np.where(inside, 1.2 * fixed.data.max() - moving.data, 0) * 300)
    pf, pm = inputs.prepare(fixed), inputs.prepare(moving)
    found = initial.initial_alignment(pf, pm)
    points = np.argwhere(head) @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    error = np.linalg.norm(
        points @ (found[:3, :3] - truth[:3, :3]).T + found[:3, 3] - truth[:3, 3], axis=1
    )
    assert error.mean() < 3.0, f"mean point error {error.mean():.2f} mm"


# ----------------------------------------------------------------------------------- real scans


def _reoriented(image: Image, codes: str) -> Image:
    """The same world content stored in another voxel order (header updated)."""
    nii = nib.Nifti1Image(image.data, image.affine)
    ornt = nib.orientations.ornt_transform(
        nib.io_orientation(image.affine), nib.orientations.axcodes2ornt(codes)
    )
    out = nii.as_reoriented(ornt)
    return Image(np.asarray(out.dataobj, image.data.dtype), out.affine)


def _resampled(image: Image, spacing: tuple[float, float, float]) -> Image:
    vox = image.grid.spacing
    shape = tuple(int(n * v / s) for n, v, s in zip(image.data.shape, vox, spacing, strict=True))
    affine = image.affine @ np.diag([s / v for s, v in zip(spacing, vox, strict=True)] + [1.0])
    return apply_transform(image, Transform.identity(), Grid(shape, affine), "linear")


@pytest.mark.shared
def test_a_real_pair_gives_the_same_dice_whatever_the_form_of_the_moving_scan(shared_data):
    """IXI: the moving scan as uint8, int16 x 16, float x 1000 + 500, stored LPI and resampled to
    1 x 1 x 3 mm voxels gives the same label Dice (within 0.01); no masks are given."""
    from scipy import ndimage

    folder = shared_data / "ixi10"
    t1 = sorted((folder / "t1w").glob("*.nii.gz"))
    labels = sorted((folder / "labels").glob("*.nii.gz"))
    fixed, moving = load_image(t1[0]), load_image(t1[1])
    fixed_labels = load_image(labels[0], dtype=None)
    moving_labels = load_image(labels[1], dtype=None)
    brain = ndimage.binary_dilation(moving_labels.data > 0, iterations=2)
    fixed = fixed.with_data(
        fixed.data * ndimage.binary_dilation(fixed_labels.data > 0, iterations=2)
    )
    raw = np.round(moving.data * brain * (255 / moving.data.max())).astype(np.uint8)
    variants = {
        "uint8": moving.with_data(raw),
        "int16 x 16": moving.with_data(raw.astype(np.int16) * 16),
        "float x 1000 + 500": moving.with_data(raw.astype(np.float32) * 1000 + 500),
        "LPI": _reoriented(moving.with_data(raw.astype(np.float32)), "LPI"),
        "1x1x3 mm": _resampled(moving.with_data(raw.astype(np.float32)), (1.0, 1.0, 3.0)),
    }
    dice = {}
    for name, image in variants.items():
        reg = register(fixed, image, backend="deep")
        warped = apply_transform(moving_labels, reg.transform, fixed.grid, "nearest")
        dice[name] = float(np.mean(list(dice_per_label(warped.data, fixed_labels.data).values())))
    spread = max(dice.values()) - min(dice.values())
    assert spread <= 0.01, dice
    assert min(dice.values()) > 0.55, dice


def _prepared_ixi_pair(shared_data) -> list[tuple[Image, np.ndarray, Image]]:
    """IXI subjects 3 and 4 as the workflow hands scans to the engine: (image normalised in its
    brain, brain mask = labels dilated 2 voxels, labels) each."""
    from scipy import ndimage

    from atlasflow.preprocess.steps import normalise_intensity

    folder = shared_data / "ixi10"
    t1 = sorted((folder / "t1w").glob("*.nii.gz"))
    labels = sorted((folder / "labels").glob("*.nii.gz"))
    scans = []
    for k in (3, 4):
        image, lab = load_image(t1[k]), load_image(labels[k], dtype=None)
        mask = ndimage.binary_dilation(lab.data > 0, iterations=2)
        scans.append((image.with_data(normalise_intensity(image.data, mask)), mask, lab))
    return scans


@pytest.mark.shared
def test_a_preprocessed_scan_turned_in_its_scanner_registers_as_it_would_unturned(shared_data):
    """IXI pair 3-4 as the workflow hands its scans to the engine (brain-masked, normalised, with
    masks), the moving scan's header turned about each axis (30 to 45 degrees) and moved 40 mm,
    as a head tilted in the scanner is: the searched start (rotation search) gives the Dice of the
    unturned pair (measured 0.638-0.647 against 0.639). From centres of mass alone the affine
    stages could not undo these turns (0.31, 0.50, 0.17)."""
    (fixed, fixed_mask, fixed_labels), (moving, moving_mask, moving_labels) = _prepared_ixi_pair(shared_data)
    centre = initial.centre_of_mass(moving.data * moving_mask, moving.affine)
    turns = {"as scanned": np.zeros(3), "pitch -30": [-30.0, 0, 0], "yaw 30": [0, 0, 30.0], "roll 45": [0, 45.0, 0]}
    dice = {}
    for name, angles in turns.items():
        world = np.eye(4)
        world[:3, :3] = rotation_matrix(np.radians(angles))
        world[:3, 3] = centre + (np.array([25.0, -25.0, 20.0]) if name != "as scanned" else 0) - world[:3, :3] @ centre
        image = Image(moving.data, world @ moving.affine)
        lab = Image(moving_labels.data, world @ moving_labels.affine)
        reg = register(fixed, image, backend="deep", fixed_mask=fixed_mask, moving_mask=moving_mask)
        dice[name] = _mean_dice(reg.transform, lab, fixed_labels)
    assert dice["as scanned"] > 0.6, dice
    assert all(abs(value - dice["as scanned"]) <= 0.015 for value in dice.values()), dice


@pytest.mark.shared
def test_a_second_network_pass_raises_the_dice_of_a_registration_without_refinement(
    shared_data, monkeypatch
):
    """IXI pair 3-4, brain-masked and normalised (the workflow's inputs), networks alone: the
    second run of the network, on the moving scan as the first leaves it, corrects part of the
    residual (0.624 -> 0.640 when measured); with one pass the engine scores as it did before."""
    from atlasflow.registration import engine

    (fixed, fixed_mask, fixed_labels), (moving, moving_mask, moving_labels) = _prepared_ixi_pair(shared_data)
    dice = {}
    for passes in (1, 2):
        monkeypatch.setattr(engine, "NETWORK_PASSES", passes)
        reg = register(fixed, moving, backend="deep", fixed_mask=fixed_mask, moving_mask=moving_mask)
        dice[passes] = _mean_dice(reg.transform, moving_labels, fixed_labels)
    assert dice[2] > dice[1] + 0.008, dice


def _mean_dice(transform: Transform, moving_labels: Image, fixed_labels: Image) -> float:
    warped = apply_transform(moving_labels, transform, fixed_labels.grid, "nearest")
    return float(np.mean(list(dice_per_label(warped.data, fixed_labels.data).values())))


@pytest.mark.shared
def test_the_register_command_finds_the_brains_of_raw_whole_heads(shared_data, tmp_path):
    """Two raw IXI heads (scalp, neck, integer intensities, no mask files), as `atlasflow register
    --fixed F --moving M` gets them: with the brains found through the template (the default) the
    networks score as with the label maps' brains (0.61 on this pair); with the engine's head masks
    (--find-masks head) they lost 0.15 here."""
    from atlasflow.io.itk import load_transform
    from atlasflow.preprocess.reference import find_brain
    from atlasflow.registration.api import RegisterOutputs, register_files

    folder = shared_data / "ixi10"
    t1 = sorted((folder / "t1w").glob("*.nii.gz"))[1:3]
    labels = [load_image(p, dtype=None) for p in sorted((folder / "labels").glob("*.nii.gz"))[1:3]]
    dice = {}
    for find in ("brain", "head"):
        out = RegisterOutputs.in_dir(tmp_path / find)
        (tmp_path / find).mkdir()
        metrics = register_files(
            t1[0], t1[1], out, find_mask=find_brain if find == "brain" else None
        )
        dice[find] = _mean_dice(load_transform(out.affine, out.warp), labels[1], labels[0])
        if find == "brain":
            assert (
                metrics["fixed_mask"]
                == metrics["moving_mask"]
                == "brain found through the MNI152 template"
            )
            assert metrics["brain_mask_seconds"] > 0
            assert metrics["fixed_contrast"] == metrics["moving_contrast"] == "T1-like"
            assert "cross_contrast" not in metrics  # one contrast: judged by NCC
    assert dice["brain"] > 0.59, dice
    assert dice["brain"] > dice["head"] + 0.08, dice


def test_a_scan_that_is_no_brain_falls_back_to_the_head_and_says_why(tmp_path):
    """A blob is no head: what the template finds in it is refused, the engine's own foreground
    is used, and the metrics say so."""
    from atlasflow.io.images import save_image
    from atlasflow.preprocess.reference import find_brain
    from atlasflow.registration.api import RegisterOutputs, register_files

    blob = blob_image()
    save_image(blob, tmp_path / "f.nii.gz")
    save_image(blob, tmp_path / "m.nii.gz")
    out = RegisterOutputs.in_dir(tmp_path)
    metrics = register_files(
        tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", out, find_mask=find_brain, affine_only=True
    )
    assert metrics["fixed_mask"].startswith("head (no brain found: ")
    assert metrics["moving_mask"].startswith("head (no brain found: ")


@pytest.mark.shared
def test_two_contrasts_found_by_the_register_command_are_registered_as_such(shared_data, tmp_path):
    """A raw T2W onto the FLAIR of its session (open_ms patient04), refinement asked for: the brain
    finder reads a T2-like and a FLAIR-like scan, so the pair goes the two-contrast way (no local
    correlation refinement, judged by NMI) and stays within a millimetre of the authors' alignment.
    Refined regardless, this pair landed 2.6 mm from it (benchmarks/results/open_ms_points_refine30.md)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from open_ms_points import errors, head_points, mapped_points, reference_map

    from atlasflow.io.itk import load_transform
    from atlasflow.preprocess.reference import find_brain
    from atlasflow.registration.api import RegisterOutputs, register_files

    folder = shared_data / "open_ms" / "patient04"
    fixed_path, moving_path = folder / "study1_FLAIR.nii.gz", folder / "study1_T2W.nii.gz"
    out = RegisterOutputs.in_dir(tmp_path)
    metrics = register_files(fixed_path, moving_path, out, find_mask=find_brain, refine_steps=30)
    assert (metrics["fixed_contrast"], metrics["moving_contrast"]) == ("FLAIR-like", "T2-like")
    assert metrics["cross_contrast"] is True and metrics["same_contrast"] is False
    assert metrics["qc_pass"], metrics["qc_flags"]
    fixed = load_image(fixed_path)
    world, idx = head_points(fixed)
    truth = reference_map(folder, "study1_FLAIR", "study1_T2W")
    expected = world @ truth[:3, :3].T + truth[:3, 3]
    mean, _ = errors(mapped_points(load_transform(out.affine, out.warp), fixed, world, idx), expected)
    assert mean < 1.0, mean
