"""The deep registration engine end to end on tiny volumes: grids, recovery, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import ball, blob_image, tiny_net_config, translated

from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Grid, Image
from atlasflow.nn import RegistrationModel
from atlasflow.nn.model_io import save_model
from atlasflow.registration.engine import register_deep
from atlasflow.registration.working_grid import WorkingGrid
from atlasflow.transforms import Transform, apply_transform, world_coordinates

TINY = tiny_net_config()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """An untrained small model: the engine must still work (fallbacks + instance optimisation)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(RegistrationModel(TINY), path)
    return str(path)


def test_working_grid_is_ras_padded_and_invertible():
    # A PSR-oriented grid like the IXI heads.
    affine = np.array([[0, 0, 2.0, -88], [-2.0, 0, 0, 118], [0, 2.0, 0, -135], [0, 0, 0, 1]])
    fixed = Grid((20, 22, 18), affine)
    work = WorkingGrid.for_grid(fixed)
    assert all(s % 16 == 0 for s in work.shape)
    data = np.random.default_rng(0).random((20, 22, 18, 3)).astype(np.float32)
    assert np.array_equal(work.to_fixed(work.to_working(data)), data)
    # Each working voxel sits at the same world point as the fixed voxel it came from.
    world_fixed = world_coordinates(fixed)
    world_work = world_coordinates(Grid(work.shape, work.affine))
    assert np.allclose(work.to_fixed(world_work), world_fixed, atol=1e-6)
    assert np.all(np.diag(work.affine)[:3] > 0)  # RAS voxel axes


def test_sample_moving_reads_the_voxels_its_matrix_names():
    """Grid voxel ijk reads moving voxel M @ ijk: integer shifts and an axis swap give exact
    copies, a half-voxel shift the mean of two neighbours, outside is zero."""
    from atlasflow.registration.working_grid import sample_moving

    rng = np.random.default_rng(0)
    moving = torch.from_numpy(rng.random((1, 1, 9, 8, 7), dtype=np.float32))
    shift = torch.eye(4)
    shift[:3, 3] = torch.tensor([2.0, -1.0, 0.0])
    out = sample_moving(moving, shift, (5, 6, 7))[0, 0]
    torch.testing.assert_close(out[:, 1:, :], moving[0, 0, 2:7, 0:5, :])
    assert float(out[:, 0].abs().max()) < 1e-6  # j = -1 lies outside
    swap = torch.tensor([[0.0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    torch.testing.assert_close(
        sample_moving(moving, swap, (7, 8, 9))[0, 0], moving[0, 0].permute(2, 1, 0)
    )
    half = torch.eye(4)
    half[0, 3] = 0.5
    torch.testing.assert_close(
        sample_moving(moving, half, (8, 8, 7))[0, 0], (moving[0, 0, :-1] + moving[0, 0, 1:]) / 2
    )


def test_working_grid_cropped_to_a_region_keeps_world_positions_and_extends_fields():
    affine = np.array([[0, 0, 2.0, -88], [-2.0, 0, 0, 118], [0, 2.0, 0, -135], [0, 0, 0, 1]])
    fixed = Grid((40, 44, 36), affine)
    region = np.zeros(fixed.shape, bool)
    region[10:20, 12:30, 5:15] = True
    work = WorkingGrid.for_grid(fixed, region=region, margin=2)
    full = WorkingGrid.for_grid(fixed)
    assert np.prod(work.shape) < np.prod(full.shape) / 2
    # world positions: a working voxel holds the fixed voxel at the same world point
    world_fixed = world_coordinates(fixed)
    world_work = world_coordinates(Grid(work.shape, work.affine))
    back = work.to_fixed(world_work)
    crop = tuple(slice(lo - 2, hi + 2) for lo, hi in ((10, 20), (12, 30), (5, 15)))
    assert tuple(b.start for b in work.crop) == tuple(c.start for c in crop)
    assert np.allclose(back[crop], world_fixed[crop], atol=1e-6)
    data = np.random.default_rng(1).random((*fixed.shape, 3)).astype(np.float32)
    assert np.array_equal(work.to_fixed(work.to_working(data))[crop], data[crop])
    # outside the crop a field repeats its value at the nearest face of the crop
    out = work.to_fixed(work.to_working(data))
    assert np.array_equal(out[0, 20, 10], data[crop[0].start, 20, 10])
    assert np.array_equal(out[15, 43, 10], data[15, crop[1].stop - 1, 10])


def _known_deformation(fixed: Image) -> Transform:
    """A rotation + shift + smooth bump, as a fixed->moving Transform."""
    angle = np.deg2rad(6.0)
    affine = np.eye(4)
    affine[:3, :3] = [
        [np.cos(angle), -np.sin(angle), 0],
        [np.sin(angle), np.cos(angle), 0],
        [0, 0, 1],
    ]
    affine[:3, 3] = [3.0, -2.0, 1.5]
    world = world_coordinates(fixed.grid)
    bump = np.exp(-((world / 14.0) ** 2).sum(-1))[..., None] * np.array([2.5, 0.0, -1.5])
    return Transform(affine, Image(bump.astype(np.float32), fixed.affine.copy()))


def _mean_error(result: Transform, truth: Transform, fixed: Image, mask: np.ndarray) -> float:
    world = world_coordinates(fixed.grid)

    def apply(t: Transform) -> np.ndarray:
        pts = world + (t.displacement.data if t.displacement is not None else 0)
        return pts @ t.affine[:3, :3].T + t.affine[:3, 3]

    return float(np.linalg.norm(apply(result) - apply(truth), axis=-1)[mask].mean())


def test_register_deep_recovers_known_deformation(tiny_model):
    fixed = blob_image(shape=(28, 32, 24))
    truth = _known_deformation(fixed)
    # The moving image satisfies moving(truth(x)) = fixed(x): fixed sampled through the inverse.
    moving = _warp_by_inverse(fixed, truth)
    mask = fixed.data > 0.15
    result = register_deep(fixed, moving, fixed_mask=mask, model_path=tiny_model, refine_steps=30)
    identity_error = _mean_error(Transform.identity(), truth, fixed, mask)
    error = _mean_error(result.transform, truth, fixed, mask)
    assert error < 0.6 * identity_error, (error, identity_error)
    warped = apply_transform(moving, result.transform, fixed.grid).data
    assert np.abs(warped - fixed.data)[mask].mean() < np.abs(moving.data - fixed.data)[mask].mean()
    # Forward and inverse displacement compose to about the identity (in world mm).
    assert result.inverse_displacement.data.shape == fixed.data.shape + (3,)
    assert result.velocity.grid.same_as(fixed.grid)


def _flipped_x(image: Image) -> Image:
    """The same world content stored with the first voxel axis reversed (an L-first header)."""
    affine = image.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ [image.data.shape[0] - 1, 0, 0] + affine[:3, 3]
    affine[:3, 0] *= -1
    return Image(np.ascontiguousarray(image.data[::-1]), affine)


@pytest.fixture(scope="module")
def still_model(tmp_path_factory) -> str:
    """A model whose velocity network predicts zero everywhere: a registration with it moves only
    by what it is given."""
    torch.manual_seed(0)
    model = RegistrationModel(TINY)
    with torch.no_grad():
        model.flow.flow.weight.zero_()
        model.flow.flow.bias.zero_()
    path = tmp_path_factory.mktemp("model") / "still.safetensors"
    save_model(model, path)
    return str(path)


def test_init_velocity_continues_a_registration_from_its_field(tiny_model, still_model):
    """A registration started from an earlier one's velocity, with a network that adds nothing
    and no optimisation of its own, reproduces the earlier deformation: exactly from the coarse
    field (the network's grid, world mm), roughly from the full-grid field (resampled; the
    padding outside the fixed image reads as zero). The fixed image is stored L-first, so axis order and signs are exercised."""
    fixed = _flipped_x(blob_image(shape=(28, 32, 24)))
    truth = Transform(np.eye(4), _known_deformation(fixed).displacement)  # the smooth bump alone
    moving = _warp_by_inverse(fixed, truth)
    mask = fixed.data > 0.15
    known = {"init_affine": np.eye(4), "affine_network": False, "affine_steps": 0}
    first = register_deep(
        fixed, moving, fixed_mask=mask, model_path=tiny_model, refine_steps=30, **known
    )
    first_error = _mean_error(first.transform, truth, fixed, mask)
    assert first_error < 0.8 * _mean_error(Transform.identity(), truth, fixed, mask)
    coarse = first.coarse_velocity
    assert coarse.data.shape[-1] == 3 and np.prod(coarse.data.shape[:3]) * 4 < fixed.data.size
    exact = register_deep(
        fixed, moving, fixed_mask=mask, model_path=still_model, init_velocity=coarse, **known
    )
    np.testing.assert_allclose(
        exact.transform.displacement.data, first.transform.displacement.data, atol=1e-3
    )
    np.testing.assert_allclose(exact.coarse_velocity.data, coarse.data, atol=1e-5)
    resampled = register_deep(
        fixed,
        moving,
        fixed_mask=mask,
        model_path=still_model,
        init_velocity=first.velocity,
        **known,
    )
    size = np.linalg.norm(first.transform.displacement.data, axis=-1)[mask].mean()
    difference = np.linalg.norm(
        resampled.transform.displacement.data - first.transform.displacement.data, axis=-1
    )
    assert difference[mask].mean() < 0.25 * size
    assert _mean_error(resampled.transform, truth, fixed, mask) < 1.2 * first_error
    with pytest.raises(AtlasflowError, match="3-vector"):
        register_deep(fixed, moving, model_path=tiny_model, init_velocity=fixed)
    # Without the full-grid velocity (the atlas members): the same transform and coarse field.
    lean = register_deep(
        fixed,
        moving,
        fixed_mask=mask,
        model_path=tiny_model,
        refine_steps=30,
        full_velocity=False,
        **known,
    )
    assert lean.velocity is None and first.velocity is not None
    np.testing.assert_array_equal(
        lean.transform.displacement.data, first.transform.displacement.data
    )
    np.testing.assert_array_equal(lean.coarse_velocity.data, coarse.data)


def test_init_velocity_needs_the_deep_backend():
    from atlasflow.registration.api import register

    fixed = blob_image(shape=(16, 16, 16))
    field = Image(np.zeros((16, 16, 16, 3), np.float32), fixed.affine)
    with pytest.raises(AtlasflowError, match="deep backend"):
        register(fixed, fixed, backend="ants", init_velocity=field)


def _warp_by_inverse(fixed: Image, truth: Transform) -> Image:
    """moving = fixed o truth^-1, found by fixed-point inversion of the smooth truth."""
    world = world_coordinates(fixed.grid)
    inv_affine = np.linalg.inv(truth.affine)
    # y = A (x + u(x)) -> x = A^-1 y - u(x); iterate on the smooth u.
    target = world @ inv_affine[:3, :3].T + inv_affine[:3, 3]
    x = target.copy()
    for _ in range(20):
        u = np.exp(-((x / 14.0) ** 2).sum(-1))[..., None] * np.array([2.5, 0.0, -1.5])
        x = target - u
    vox = (x - fixed.affine[:3, 3]) @ np.linalg.inv(fixed.affine[:3, :3]).T
    from atlasflow.transforms import sample_voxels

    return fixed.with_data(sample_voxels(fixed.data, vox).astype(np.float32))


def test_register_deep_is_deterministic_and_affine_only_has_no_warp(tiny_model):
    fixed = blob_image(shape=(24, 28, 20), seed=1)
    moving = blob_image(shape=(26, 26, 22), seed=2)
    a = register_deep(fixed, moving, model_path=tiny_model, refine_steps=5, seed=3)
    b = register_deep(fixed, moving, model_path=tiny_model, refine_steps=5, seed=3)
    assert np.array_equal(a.transform.affine, b.transform.affine)
    assert np.array_equal(a.transform.displacement.data, b.transform.displacement.data)
    assert a.seconds > 0
    aff = register_deep(fixed, moving, model_path=tiny_model, affine_only=True)
    assert not np.any(aff.transform.displacement.data)
    assert aff.transform.displacement.grid.same_as(fixed.grid)


def test_register_deep_rejects_bad_inputs(tiny_model):
    fixed = blob_image(shape=(24, 28, 20))
    with pytest.raises(AtlasflowError, match="fixed_mask"):
        register_deep(fixed, fixed, fixed_mask=np.ones((3, 3, 3)), model_path=tiny_model)
    with pytest.raises(AtlasflowError, match="not found"):
        register_deep(fixed, fixed, model_path="/nonexistent/model.safetensors")


def test_cost_mask_marks_voxels_left_out_of_the_similarity(tiny_model):
    """The moving image is the fixed one shifted by 2 voxels with a bright patch pasted in (no
    counterpart); leaving the patch out through ``cost_mask`` must still recover the shift."""
    fixed = blob_image(shape=(32, 32, 32), seed=4)
    moving = translated(fixed, [-2.0 * fixed.affine[0, 0], 0.0, 0.0])
    patch = np.zeros(fixed.data.shape, bool)
    patch[12:20, 12:20, 12:20] = True
    moving.data[np.roll(patch, -2, axis=0)] = 3.0
    excluded = np.zeros_like(patch)
    excluded[8:22, 10:22, 10:22] = True
    mask = fixed.data > 0.1
    result = register_deep(
        fixed, moving, fixed_mask=mask, cost_mask=excluded, model_path=tiny_model, refine_steps=0
    )
    keep = mask & ~excluded
    warped = apply_transform(moving, result.transform, fixed.grid).data
    before = np.corrcoef(fixed.data[keep], moving.data[keep])[0, 1]
    after = np.corrcoef(fixed.data[keep], warped[keep])[0, 1]
    assert after > before and after > 0.95, (before, after)


def test_label_term_pulls_corresponding_regions_together(tiny_model):
    """Identical images, but a region labelled 3 voxels apart: with the region left out of the
    similarity, the label Dice moves the field inside it towards the labelled counterpart."""
    fixed = blob_image(shape=(32, 32, 32), seed=5)
    centre = np.array([16, 16, 16])
    fixed_labels = ball(fixed.data.shape, centre, 5)
    moving_labels = ball(fixed.data.shape, centre + [3, 0, 0], 5)
    common = dict(
        fixed_mask=fixed.data > -1,
        cost_mask=ball(fixed.data.shape, centre, 8) > 0,
        model_path=tiny_model,
        refine_steps=60,
        affine_steps=0,
        init_affine=np.eye(4),
    )
    plain = register_deep(fixed, fixed, **common)
    guided = register_deep(
        fixed,
        fixed,
        fixed_labels=fixed_labels,
        moving_labels=moving_labels,
        label_weight=2.0,
        **common,
    )
    spacing = float(fixed.affine[0, 0])

    def mean_shift_vox(result):
        return float(result.transform.displacement.data[..., 0][fixed_labels > 0].mean()) / spacing

    assert abs(mean_shift_vox(plain)) < 0.3
    assert mean_shift_vox(guided) > 1.0


def test_distance_term_grows_a_region_from_inside(tiny_model):
    """A ball that grows (radius 5 -> 7 voxels) between identical images, its surroundings left out
    of the similarity: matching signed distances maps it by an expansion of its inside (Jacobian
    > 1 in its core, no folding), and the carried baseline ball has the follow-up volume."""
    from atlasflow.transforms import jacobian_determinant, transported_volume_mm3

    fixed = blob_image(shape=(32, 32, 32), seed=6)
    ijk = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), -1)
    radius = np.linalg.norm(ijk - 16, axis=-1)
    fixed_labels, moving_labels = (radius <= 5).astype(np.uint8), (radius <= 7).astype(np.uint8)
    result = register_deep(
        fixed,
        fixed,
        fixed_mask=fixed.data > -1,
        cost_mask=radius <= 10,
        model_path=tiny_model,
        refine_steps=60,
        affine_steps=0,
        init_affine=np.eye(4),
        fixed_labels=fixed_labels,
        moving_labels=moving_labels,
        label_weight=1.0,
        label_term="distance",
    )
    det = jacobian_determinant(result.transform.displacement)
    assert det.min() > 0
    assert det[radius <= 2].mean() > 1.3, "the core expands with the region"
    voxel = float(abs(np.linalg.det(fixed.affine[:3, :3])))
    change = (
        transported_volume_mm3(
            fixed.with_data(fixed_labels.astype(np.float32)),
            result.transform,
            result.inverse_displacement,
            fixed.grid,
        )
        - fixed_labels.sum() * voxel
    )
    true_change = (moving_labels.sum() - fixed_labels.sum()) * voxel
    assert abs(change - true_change) <= 0.15 * true_change, (change, true_change)
