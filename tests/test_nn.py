"""Networks, losses and the torch transform primitives the deep engine relies on."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atlasflow.io.images import Image
from atlasflow.nn import AffineNet, NetConfig, RegistrationModel, VelocityUNet
from atlasflow.nn.layers import compose_displacements, integrate_velocity, warp_tensor
from atlasflow.nn.losses import (
    box_filter,
    diffusion_loss,
    fixed_statistics,
    inverse_consistency_loss,
    lncc_loss,
    local_ncc,
    mse_loss,
    soft_dice_loss,
)
from atlasflow.nn.networks import KeypointAffineNet, centred_affine_grid
from atlasflow.nn.optim import Adam
from atlasflow.transforms import folding_fraction


def smooth_field(shape, amplitude, seed=0):
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 3, 4, 4, 4), generator=gen) * amplitude
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def smooth_volume(shape=(24, 24, 24), seed=0):
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 1, 10, 10, 10), generator=gen)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def test_unet_outputs_half_resolution_velocity():
    net = VelocityUNet([8, 16, 16, 16], [16, 16, 8, 8])
    out = net(torch.randn(2, 2, 32, 48, 32))
    assert out.shape == (2, 3, 16, 24, 16)
    # The flow head starts near zero so an untrained network is close to the identity.
    assert out.abs().max() < 1e-2


def test_affine_net_starts_at_identity_and_has_12_outputs():
    net = AffineNet([8, 8, 16, 16, 16])
    out = net(torch.randn(1, 2, 32, 32, 32))
    assert out.shape == (1, 3, 4)
    assert torch.allclose(out[0, :, :3], torch.eye(3))
    assert torch.allclose(out[0, :, 3], torch.zeros(3))


def test_keypoint_affine_net_solves_the_affine_of_its_keypoints(monkeypatch):
    net = KeypointAffineNet([4, 4, 4, 4], keypoints=12)
    gen = torch.Generator().manual_seed(0)
    fixed = torch.randn((1, 12, 3), generator=gen) * 20
    truth = torch.tensor([[[1.05, 0.1, 0.0, 4.0], [-0.08, 0.97, 0.05, -6.0], [0.0, 0.1, 1.0, 2.5]]])
    moving = fixed @ truth[0, :, :3].T + truth[0, :, 3]
    conf = torch.randn((2, 12), generator=gen)
    monkeypatch.setattr(net, "keypoints", lambda images: (torch.cat([fixed, moving]), conf))
    out = net(torch.zeros(1, 2, 32, 32, 32))
    assert out.shape == (1, 3, 4)
    # The identity prior only nudges a well-posed fit.
    assert torch.allclose(out[..., :3], truth[..., :3], atol=0.01)
    assert torch.allclose(out[..., 3], truth[..., 3], atol=0.05)  # voxels


def test_keypoint_affine_net_keypoints_live_in_centred_voxels():
    torch.manual_seed(0)
    net = KeypointAffineNet([4, 8, 8, 8], keypoints=6)
    points, conf = net.keypoints(torch.rand(2, 1, 32, 48, 32))
    assert points.shape == (2, 6, 3) and conf.shape == (2, 6)
    half = torch.tensor([16.0, 24.0, 16.0])
    assert (points.abs() <= half).all()  # soft-argmax stays inside the (centred) grid
    assert torch.isfinite(net(torch.rand(1, 2, 32, 48, 32))).all()


def test_cost_volume_peaks_at_the_true_shift():
    net = VelocityUNet([4, 4, 4, 4], [4, 4, 4, 4], cost_radius=1)
    fixed = smooth_volume((32, 32, 32), seed=1)
    moving = torch.roll(fixed, shifts=2, dims=2)  # moving(x + 2 e_i) = fixed(x)
    cost = net.cost(torch.cat([fixed, moving], 1), 2, torch.Size((16, 16, 16)))
    assert cost.shape == (1, 27, 16, 16, 16)
    inner = cost[..., 3:-3, 3:-3, 3:-3].mean((0, 2, 3, 4))
    # Shift +1 (downsampled voxels) along i: channel (dx=2, dy=1, dz=1) -> 2 * 9 + 1 * 3 + 1.
    assert int(inner.argmax()) == 22
    same = net.cost(torch.cat([fixed, fixed], 1), 2, torch.Size((16, 16, 16)))
    assert int(same[..., 3:-3, 3:-3, 3:-3].mean((0, 2, 3, 4)).argmax()) == 13


def test_inference_gives_what_the_modules_give_with_gradients():
    """Without gradients the convolutions go straight to oneDNN whatever their size, and the
    correlation features are built channels-last: the outputs match the autograd path."""
    from atlasflow.nn.networks import conv3d

    torch.manual_seed(0)
    small = torch.nn.Conv3d(91, 32, 3, padding=1)  # below PyTorch's own oneDNN threshold
    x = torch.randn(1, 91, 6, 7, 6).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        fast = conv3d(small, x)
    assert torch.allclose(fast, small(x), atol=1e-5)
    net = VelocityUNet([8, 8, 8, 8], [8, 8, 8, 8], cost_radius=1)
    pair = torch.rand(1, 2, 32, 48, 32)
    with torch.no_grad():
        inferred = net(pair)
    trained = net(pair.requires_grad_(True))
    assert trained.requires_grad
    assert torch.allclose(inferred, trained.detach(), atol=1e-5, rtol=1e-4)


def test_box_filter_keeps_channels_last():
    x = torch.randn(1, 27, 6, 7, 5)
    last = box_filter(x.contiguous(memory_format=torch.channels_last_3d), 3)
    assert last.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(last, box_filter(x, 3), atol=1e-6)


def test_warp_samples_at_identity_plus_displacement():
    """Against grid_sample at coordinates written out in full, for a source whose grid differs
    from the displacement's and a batch of two (the cached identity is shared by both)."""
    gen = torch.Generator().manual_seed(3)
    src = torch.rand((2, 2, 9, 11, 8), generator=gen)
    disp = torch.randn((2, 3, 5, 6, 7), generator=gen) * 2
    loc = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in (5, 6, 7)], indexing="ij"))[None]
    loc = loc + disp
    normalised = torch.stack([2 * loc[:, axis] / (n - 1) - 1 for axis, n in ((2, 8), (1, 11), (0, 9))], -1)
    expected = F.grid_sample(src, normalised, padding_mode="border", align_corners=True)
    assert torch.allclose(warp_tensor(src, disp), expected, atol=1e-5)
    assert torch.allclose(warp_tensor(src, disp), expected, atol=1e-5)  # from the cache


def test_network_init_keeps_the_signal_scale():
    # PyTorch's default init shrank features ~3x per layer, which starved the velocity layer.
    torch.manual_seed(0)
    net = VelocityUNet([16, 32, 32, 32], [32, 32, 16, 16])
    x = torch.rand(1, 2, 32, 48, 32)
    deepest = x
    for block in net.enc:
        deepest = block(deepest)
    assert deepest.pow(2).mean().sqrt() > 0.1 * x.pow(2).mean().sqrt()


def test_config_of_version_1_files_is_the_pooled_network():
    old = NetConfig.from_dict({"affine_channels": [4, 4, 4, 4, 4]})
    assert old.affine_kind == "pooled" and old.cost_radius == 0
    assert isinstance(RegistrationModel(old).affine, AffineNet)
    assert isinstance(RegistrationModel(NetConfig()).affine, KeypointAffineNet)
    with pytest.raises(ValueError, match="affine_kind"):
        NetConfig.from_dict({"affine_kind": "magic"})


def test_registration_model_config_round_trip():
    config = NetConfig(
        unet_encoder=[8, 8, 8, 8], unet_decoder=[8, 8, 8, 8], affine_channels=[4, 4, 4, 4, 4]
    )
    model = RegistrationModel(NetConfig.from_dict(config.to_dict()))
    assert model.flow(torch.zeros(1, 2, 16, 16, 16)).shape == (1, 3, 8, 8, 8)


def test_centred_affine_grid_matches_direct_formula():
    matrix = torch.tensor([[[1.1, 0.05, 0.0, 1.5], [0.0, 0.95, 0.1, -2.0], [0.02, 0.0, 1.0, 0.5]]])
    shape = (5, 6, 7)
    disp = centred_affine_grid(matrix, shape)
    c = (np.array(shape) - 1) / 2
    ijk = np.array([3, 1, 6], float)
    expected = matrix[0, :, :3].numpy() @ (ijk - c) + c + matrix[0, :, 3].numpy() - ijk
    assert np.allclose(disp[0, :, 3, 1, 6].numpy(), expected, atol=1e-5)


def test_integrated_smooth_field_is_diffeomorphic_and_inverts():
    shape = (24, 24, 24)
    velocity = smooth_field(shape, 3.0)
    forward = integrate_velocity(velocity, 7)
    backward = integrate_velocity(-velocity, 7)
    disp = Image(forward[0].permute(1, 2, 3, 0).numpy(), np.eye(4))
    assert folding_fraction(disp) < 1e-3
    residual = compose_displacements(forward, backward)[..., 4:-4, 4:-4, 4:-4]
    # exp(v) o exp(-v) ~ identity (interior, away from border clamping), much smaller than |u|.
    assert residual.abs().max() < 0.1 * forward.abs().max()
    assert residual.abs().mean() < 0.05


def test_box_filter_matches_average_pooling():
    x = torch.randn(1, 2, 9, 10, 11)
    for window in (3, 5, 7):
        pad = window // 2
        ref = F.avg_pool3d(F.pad(x, [pad, window - 1 - pad] * 3), window, stride=1)
        assert torch.allclose(box_filter(x, window), ref, atol=1e-5)


def test_box_filter_gradient_is_the_box_filter_of_the_gradient():
    """The hand-written backward (the filter is its own adjoint) matches average pooling's."""
    x = torch.randn(1, 2, 7, 8, 9, dtype=torch.float64)
    weights = torch.randn(1, 2, 7, 8, 9, dtype=torch.float64)
    for window in (3, 5):
        pad = window // 2
        a = x.clone().requires_grad_(True)
        (box_filter(a, window) * weights).sum().backward()
        b = x.clone().requires_grad_(True)
        (F.avg_pool3d(F.pad(b, [pad, window - 1 - pad] * 3), window, stride=1) * weights).sum().backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-10)


def test_lncc_with_precomputed_fixed_statistics_and_its_gradient_are_unchanged():
    fixed = smooth_volume()
    moving = torch.roll(fixed, 2, dims=3) + 0.1 * smooth_volume(seed=1)
    mask = (fixed > fixed.mean()).float()
    a = moving.clone().requires_grad_(True)
    value = local_ncc(fixed, a, 5, mask, fixed_stats=fixed_statistics(fixed, 5))
    value.backward()
    # reference: both images differentiated (five filtered channels)
    f = fixed.clone().requires_grad_(True)
    b = moving.clone().requires_grad_(True)
    reference = local_ncc(f, b, 5, mask)
    reference.backward()
    assert value.item() == pytest.approx(reference.item(), abs=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_lncc_is_one_for_identical_images_and_drops_after_shift():
    vol = smooth_volume()
    assert local_ncc(vol, vol, 5).item() == pytest.approx(1.0, abs=1e-3)
    assert lncc_loss(vol, 2.0 * vol, 5).item() == pytest.approx(0.0, abs=1e-3)
    shifted = torch.roll(vol, 3, dims=2)
    assert local_ncc(vol, shifted, 5).item() < 0.9


def test_masked_losses_ignore_excluded_voxels():
    vol = smooth_volume()
    other = vol.clone()
    other[..., :12] = torch.rand_like(other[..., :12])
    mask = torch.zeros_like(vol)
    mask[..., 14:] = 1  # away from the box-filter footprint of the changed half
    assert local_ncc(vol, other, 3, mask).item() == pytest.approx(1.0, abs=5e-3)
    assert local_ncc(vol, other, 3).item() < 0.8
    assert mse_loss(vol, other, mask).item() == pytest.approx(0.0, abs=1e-8)
    assert mse_loss(vol, other).item() > 0.01


def test_soft_dice_and_diffusion():
    labels = torch.randint(0, 4, (1, 16, 16, 16))
    onehot = F.one_hot(labels, 4).permute(0, 4, 1, 2, 3).float()
    assert soft_dice_loss(onehot, onehot).item() == pytest.approx(0.0, abs=1e-6)
    shuffled = onehot[:, [0, 2, 3, 1]]
    assert soft_dice_loss(onehot, shuffled).item() > 0.5
    assert diffusion_loss(torch.ones(1, 3, 8, 8, 8)).item() == 0.0
    assert diffusion_loss(smooth_field((8, 8, 8), 1.0)).item() > 0.0


def test_inverse_consistency_small_for_exact_inverse():
    velocity = smooth_field((20, 20, 20), 1.0)
    fwd, bwd = integrate_velocity(velocity), integrate_velocity(-velocity)
    assert inverse_consistency_loss(fwd, bwd).item() < 0.05 * fwd.pow(2).sum(1).mean().item()


def test_gradients_flow_through_warp_and_losses():
    fixed = smooth_volume(seed=1)
    moving = torch.roll(fixed, 2, dims=3)
    velocity = torch.zeros(1, 3, 12, 12, 12, requires_grad=True)
    disp = F.interpolate(
        integrate_velocity(velocity), size=(24, 24, 24), mode="trilinear", align_corners=True
    )
    loss = lncc_loss(fixed, warp_tensor(moving, disp), 5) + 0.1 * diffusion_loss(velocity)
    loss.backward()
    assert velocity.grad is not None and velocity.grad.abs().sum() > 0
    net = VelocityUNet([4, 4, 4, 4], [4, 4, 4, 4])
    out = net(torch.cat([fixed, moving], 1))
    lncc_loss(fixed, warp_tensor(moving, F.interpolate(out, size=(24, 24, 24))), 5).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_test_time_adam_follows_torch_adam():
    torch.manual_seed(0)
    target = torch.randn(3, 4)

    def trajectory(optimiser):
        p = torch.zeros(3, 4, requires_grad=True)
        q = torch.ones(5, requires_grad=True)
        opt = optimiser([p, q], lr=0.05)
        for _ in range(30):
            opt.zero_grad()
            (((p - target) ** 4).sum() + 0.3 * (q**2).sum()).backward()
            opt.step()
        return p.detach(), q.detach()

    ours, theirs = trajectory(Adam), trajectory(torch.optim.Adam)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(ours[0], torch.zeros(3, 4))


def test_deterministic_kernels_and_adam_do_not_import_the_compiler():
    # A fresh interpreter: whether the compiler was imported depends on the whole process. Its
    # import is the ~1.3 s that each registration job used to pay at start-up.
    code = (
        "import sys, torch; from atlasflow.nn import deterministic_kernels; from atlasflow.nn.optim import Adam; "
        "deterministic_kernels(); p = torch.zeros(2, requires_grad=True); opt = Adam([p], lr=0.1); "
        "(p - 1).pow(2).sum().backward(); opt.step(); "
        "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), "
        "any(m.startswith(('torch._inductor', 'torch._dynamo')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "False"]
