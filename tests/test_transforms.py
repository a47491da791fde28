"""Transforms: ITK/ANTs file conventions, warping, Jacobians, velocity integration."""

import numpy as np
import pytest
import torch
from factories import ball, blob_image
from scipy.ndimage import gaussian_filter

from atlasflow.io.images import Image, load_image, save_image
from atlasflow.io.itk import load_transform, read_itk_affine, save_transform
from atlasflow.nn.layers import compose_displacements, integrate_velocity, resize_displacement
from atlasflow.transforms import (
    Transform,
    apply_transform,
    folding_fraction,
    jacobian_determinant,
    transported_volume_mm3,
    world_coordinates,
)


def random_transform(grid, seed=0, amplitude=3.0):
    rng = np.random.default_rng(seed)
    affine = np.eye(4)
    affine[:3, :3] += rng.normal(0, 0.04, (3, 3))
    affine[:3, 3] = rng.normal(0, 2, 3)
    disp = np.stack([gaussian_filter(rng.normal(size=grid.shape), 3) for _ in range(3)], -1)
    disp *= amplitude / np.abs(disp).max()
    return Transform(affine, Image(disp.astype(np.float32), grid.affine.copy()))


def oblique(image: Image) -> Image:
    """The same array on an oblique, anisotropic, LPS-ish grid (exercises every convention)."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[-c, -s, 0, 0], [s, -c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    affine = rot @ np.diag([2.0, 2.5, 1.5, 1.0])
    affine[:3, 3] = [30, -20, 10]
    return Image(image.data, affine)


def test_itk_affine_round_trip(tmp_path):
    t = random_transform(blob_image().grid)
    save_transform(t, tmp_path / "a.mat", tmp_path / "w.nii.gz")
    back = load_transform(tmp_path / "a.mat", tmp_path / "w.nii.gz")
    np.testing.assert_allclose(back.affine, t.affine, atol=1e-10)
    np.testing.assert_allclose(back.displacement.data, t.displacement.data, atol=1e-6)


def test_ants_reads_our_affine_as_the_same_point_mapping(tmp_path):
    ants = pytest.importorskip("ants")
    t = random_transform(blob_image().grid)
    save_transform(t, tmp_path / "a.mat", None)
    itk = ants.read_transform(str(tmp_path / "a.mat"))
    point_ras = np.array([12.0, -7.0, 5.0])
    expected = t.affine[:3, :3] @ point_ras + t.affine[:3, 3]
    lps = itk.apply_to_point(tuple(point_ras * [-1, -1, 1]))
    np.testing.assert_allclose(np.array(lps) * [-1, -1, 1], expected, atol=1e-5)
    np.testing.assert_allclose(read_itk_affine(tmp_path / "a.mat"), t.affine, atol=1e-10)


@pytest.mark.parametrize("interpolation, ants_name", [("linear", "linear"), ("nearest", "nearestNeighbor")])
def test_ants_applying_our_files_gives_our_warped_image(tmp_path, interpolation, ants_name):
    """The DESIGN contract: ants.apply_transforms(fixed, moving, [warp, affine]) == our warping."""
    ants = pytest.importorskip("ants")
    fixed = oblique(blob_image((20, 22, 18), seed=1))
    moving = blob_image((24, 26, 22), seed=2)
    if interpolation == "nearest":
        moving = moving.with_data(np.digitize(moving.data, [0.2, 0.5, 0.8]).astype(np.float32))
    t = random_transform(fixed.grid, seed=3)
    save_transform(t, tmp_path / "a.mat", tmp_path / "w.nii.gz")
    save_image(fixed, tmp_path / "f.nii.gz")
    save_image(moving, tmp_path / "m.nii.gz")
    ours = apply_transform(moving, t, fixed.grid, interpolation).data
    theirs = ants.apply_transforms(
        ants.image_read(str(tmp_path / "f.nii.gz")),
        ants.image_read(str(tmp_path / "m.nii.gz")),
        [str(tmp_path / "w.nii.gz"), str(tmp_path / "a.mat")],
        interpolator=ants_name,
    ).numpy()
    assert np.abs(ours).max() > 0.1, "the warped image should not be empty"
    if interpolation == "linear":
        np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(moving.data).max())
    else:
        assert (ours == theirs).mean() > 0.999


def test_identity_transform_reproduces_the_image(blob):
    out = apply_transform(blob, Transform.identity(), blob.grid)
    np.testing.assert_allclose(out.data, blob.data, atol=1e-5)


def test_label_interpolation_keeps_only_existing_labels(blob):
    labels = blob.with_data(np.digitize(blob.data, [0.2, 0.5, 0.8]).astype(np.int16) * 7)
    t = random_transform(blob.grid, seed=4)
    for mode in ("nearest", "label"):
        out = apply_transform(labels, t, blob.grid, mode).data
        assert set(np.unique(out)) <= set(np.unique(labels.data))
        assert out.dtype == labels.data.dtype


def test_jacobian_of_a_linear_field_is_its_determinant(blob):
    matrix = np.array([[1.1, 0.05, 0], [0.0, 0.9, 0.02], [0.03, 0, 1.2]])
    x = world_coordinates(blob.grid)
    disp = Image((x @ (matrix - np.eye(3)).T).astype(np.float32), blob.affine)
    det = jacobian_determinant(disp)
    np.testing.assert_allclose(det, np.linalg.det(matrix), rtol=1e-4)


def test_transported_volume_of_a_ball_under_known_maps():
    """Change of variables: the image of a ball under x -> A x has volume det(A) x its volume;
    under a uniform expansion about its centre, written as displacement + exact inverse, the
    volume grows by the cube of the factor."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    region = Image(ball((40, 40, 40), (20, 20, 20), 8).astype(np.float32), affine)
    base = float(region.data.sum() * 8)
    assert transported_volume_mm3(region, Transform(np.eye(4)), None, region.grid) == pytest.approx(base)
    scale = np.diag([1.1, 0.95, 1.2, 1.0])
    carried = transported_volume_mm3(region, Transform(scale), None, region.grid)
    assert carried == pytest.approx(base * np.linalg.det(scale[:3, :3]), rel=0.01)
    # x -> c + 1.2 (x - c): displacement 0.2 (x - c); its inverse y -> c + (y - c) / 1.2 as a
    # displacement of y: -(1 - 1/1.2) (y - c).
    centre = world_coordinates(region.grid)[20, 20, 20]
    offset = world_coordinates(region.grid) - centre
    forward = Image((0.2 * offset).astype(np.float32), affine)
    inverse = Image((-(1 - 1 / 1.2) * offset).astype(np.float32), affine)
    carried = transported_volume_mm3(region, Transform(np.eye(4), forward), inverse, region.grid)
    assert carried == pytest.approx(base * 1.2**3, rel=0.02)


def test_folding_is_detected():
    grid = blob_image((16, 16, 16)).grid
    x = world_coordinates(grid)
    folded = np.zeros_like(x)
    folded[..., 0] = -3.0 * (x[..., 0] - x[..., 0].mean())  # det = 1 - 3 < 0 everywhere
    assert folding_fraction(Image(folded.astype(np.float32), grid.affine)) > 0.9
    assert folding_fraction(Image(np.zeros_like(folded, dtype=np.float32), grid.affine)) == 0.0


def test_velocity_exponential_is_invertible_and_fold_free():
    rng = np.random.default_rng(0)
    shape = (20, 22, 18)
    field = np.stack([gaussian_filter(rng.normal(size=shape), 4) for _ in range(3)])
    v = torch.from_numpy(field / np.abs(field).max() * 3.0).float()[None]
    fwd = integrate_velocity(v)
    inv = integrate_velocity(-v)
    roundtrip = compose_displacements(fwd, inv)
    core = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    assert roundtrip[core].abs().mean() < 0.05 * fwd[core].abs().mean()
    disp = Image(fwd[0].permute(1, 2, 3, 0).numpy(), np.eye(4))
    assert folding_fraction(disp) == 0.0


def test_resize_displacement_scales_vectors():
    disp = torch.ones(1, 3, 10, 10, 10)
    up = resize_displacement(disp, (19, 19, 19))
    np.testing.assert_allclose(up.numpy(), 2.0, atol=1e-5)


def test_load_image_of_written_warp_is_vector(tmp_path):
    t = random_transform(blob_image().grid)
    save_transform(t, tmp_path / "a.mat", tmp_path / "w.nii.gz")
    raw = load_image(tmp_path / "w.nii.gz", allow_vector=True)
    assert raw.data.shape[-1] == 3
