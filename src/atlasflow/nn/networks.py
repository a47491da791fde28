"""Registration networks: a small affine CNN and a U-Net that predicts a stationary velocity field.

Both take the concatenated pair ``(fixed, moving)`` as a (B, 2, X, Y, Z) tensor on the working grid
(isotropic voxels, sides a multiple of 16) and run channels-last 3-D, which was ~1.8x faster for
convolutions on the CPUs we measured.

* :class:`AffineNet` predicts 12 numbers around the identity: a 3x3 matrix ``I + D`` and a
  translation ``t`` (voxels) acting on voxel coordinates centred on the grid centre ``c``:
  ``x_moving = (I + D) (x - c) + c + t`` (a pull-back, fixed voxel -> moving voxel).
* :class:`KeypointAffineNet` (the default affine network, ``NetConfig.affine_kind="keypoints"``)
  finds K soft keypoints in each image with one shared CNN and solves the affine that maps the
  fixed keypoints onto the moving ones in closed form (weighted least squares). Position is
  explicit, so translation, rotation and scale come out of geometry instead of having to be read
  off globally pooled features (the older :class:`AffineNet`, ``affine_kind="pooled"``, kept so
  that version-1 model files still load).
* :class:`VelocityUNet` predicts a velocity field at half resolution (voxel units of the half-res
  grid); its decoder stops at half resolution, which is what keeps the forward pass cheap.

Convolutions are initialised He-normal for the LeakyReLU slope (biases zero): PyTorch's default
init shrinks the signal ~3x per layer here, so the decoder features that feed the velocity layer
had a spatial spread of ~0.003 and the velocity could not grow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` in channels-last 3-D memory format (a no-op for tensors that are not 5-D)."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else x


def init_conv_weights(module: nn.Module) -> None:
    """He-normal init (LeakyReLU 0.2) for every Conv3d / Linear in ``module``, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def conv3d(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, through oneDNN on the CPU at inference whatever the size.

    PyTorch hands a batch-1 3x3x3 convolution to oneDNN only when batch x channels x the first two
    spatial sizes exceed 20480; below that (the U-Net's 1/8 and 1/16 levels on a 2 mm brain) it
    takes an im2col path that was 3-6x slower on one thread (91 -> 32 channels on 12x14x12
    voxels: 31 against 5 ms). With gradients the module's own path is kept.
    """
    if (
        torch.is_grad_enabled()
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or x.dim() != 5
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
        or not torch.backends.mkldnn.is_available()
    ):
        return conv(x)
    return torch.ops.aten.mkldnn_convolution(
        x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups
    )


class ConvBlock(nn.Module):
    """3x3x3 convolution (optionally strided) + LeakyReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, stride=stride, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(conv3d(self.conv, x))


@dataclass
class NetConfig:
    """Hyper-parameters that define the architecture (saved next to the weights)."""

    unet_encoder: list[int] = field(default_factory=lambda: [16, 32, 32, 32])
    unet_decoder: list[int] = field(default_factory=lambda: [32, 32, 16, 16])
    affine_channels: list[int] = field(default_factory=lambda: [16, 32, 32, 64, 64])
    integration_steps: int = 7
    #: "keypoints" (:class:`KeypointAffineNet`) or "pooled" (:class:`AffineNet`, version-1 files).
    affine_kind: str = "keypoints"
    affine_keypoints: int = 32
    #: Shift radius of the correlation features fed to the U-Net decoder (0: none, version 1).
    cost_radius: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NetConfig:
        known = {
            k: data[k]
            for k in (
                "unet_encoder",
                "unet_decoder",
                "affine_channels",
                "integration_steps",
                "affine_kind",
                "affine_keypoints",
                "cost_radius",
            )
            if k in data
        }
        known.setdefault("cost_radius", 0)
        # Sidecars written before the keypoint network existed describe the pooled network.
        known.setdefault("affine_kind", "pooled")
        if known["affine_kind"] not in ("keypoints", "pooled"):
            raise ValueError(f"unknown affine_kind {known['affine_kind']!r}")
        return cls(**known)


class VelocityUNet(nn.Module):
    """U-Net from a (fixed, moving) pair to a half-resolution stationary velocity field.

    Encoder levels run at 1/2, 1/4, 1/8, 1/16 of the input resolution (the first convolution is
    strided, so no full-resolution feature map is ever stored); the decoder climbs back to 1/2.
    Output: (B, 3, X/2, Y/2, Z/2) in half-resolution voxel units, channel order i, j, k.
    """

    def __init__(self, encoder: list[int], decoder: list[int], cost_radius: int = 0) -> None:
        super().__init__()
        if len(decoder) != len(encoder):
            raise ValueError("decoder needs one entry per encoder level")
        self.cost_radius = cost_radius
        cost = (2 * cost_radius + 1) ** 3 if cost_radius > 0 else 0
        self.enc = nn.ModuleList()
        cin = 2
        for cout in encoder:
            self.enc.append(nn.Sequential(ConvBlock(cin, cout, stride=2), ConvBlock(cout, cout)))
            cin = cout
        # Decoder: from the deepest level up to 1/2 resolution, concatenating skips (and, with
        # cost_radius > 0, the local correlation of the two images at that level's resolution).
        self.dec = nn.ModuleList()
        skips = encoder[:-1][::-1]
        for i, skip in enumerate(skips):
            self.dec.append(ConvBlock(cin + skip + cost, decoder[i]))
            cin = decoder[i]
        self.head = ConvBlock(cin, decoder[-1])
        self.flow = nn.Conv3d(decoder[-1], 3, 3, padding=1)
        init_conv_weights(self)
        # Start near the identity so early training does not fold the field.
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        x = channels_last(pair)
        feats = []
        for block in self.enc:
            x = block(x)
            feats.append(x)
        levels = range(len(feats) - 2, -1, -1)
        for block, skip, level in zip(self.dec, feats[:-1][::-1], levels, strict=True):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            parts = [x, skip]
            if self.cost_radius > 0:
                parts.append(channels_last(self.cost(pair, 2 ** (level + 1), skip.shape[2:])))
            x = block(torch.cat(parts, 1))
        return conv3d(self.flow, self.head(x))

    def cost(self, pair: torch.Tensor, factor: int, size: torch.Size) -> torch.Tensor:
        """Local normalised correlation of fixed and shifted moving, downsampled by ``factor``.

        One channel per integer shift in [-r, r]^3 (voxels of the downsampled grid). This is the
        evidence a block-matching method would use; handing it to the decoder means the network
        only has to learn to read displacements off it, not to discover image comparison from
        scratch, which plain early fusion did not do within thousands of CPU steps.
        """
        from atlasflow.nn.losses import box_filter

        small = F.avg_pool3d(pair.contiguous(), factor)
        mean = box_filter(small, 3)
        std = (box_filter(small * small, 3) - mean * mean).clamp_min(0).add(1e-4).sqrt()
        norm = (small - mean) / std
        fixed, moving = norm[:, :1], norm[:, 1:2]
        r = self.cost_radius
        padded = F.pad(moving, [r] * 6, mode="replicate")
        n = fixed.shape[2:]
        span = range(2 * r + 1)
        # Shifts stacked on the last axis and moved to the channel axis: a channels-last tensor
        # without a copy, the layout the decoder's convolutions take.
        shifted = torch.stack(
            [padded[:, 0, dx : dx + n[0], dy : dy + n[1], dz : dz + n[2]] for dx in span for dy in span for dz in span],
            -1,
        )
        cost = box_filter((shifted * fixed[:, 0, ..., None]).permute(0, 4, 1, 2, 3), 3)
        if tuple(cost.shape[2:]) != tuple(size):
            cost = F.interpolate(cost, size=tuple(size), mode="trilinear", align_corners=False)
        return cost


class AffineNet(nn.Module):
    """Strided CNN encoder + global pooling -> 12 affine parameters around the identity.

    Runs on the pair downsampled by 2 (so ~4 mm voxels for a 2 mm working grid). The translation
    output is scaled by ``translation_scale`` voxels (of the full-resolution grid) so the linear
    layer works with numbers of order one.
    """

    def __init__(self, channels: list[int], translation_scale: float = 10.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 2
        for cout in channels:
            layers += [ConvBlock(cin, cout, stride=2), ConvBlock(cout, cout)]
            cin = cout
        self.features = nn.Sequential(*layers)
        # Coordinates are appended before pooling so that the pooled features know *where*
        # things are, which a plain average would lose (needed for translation).
        self.fc = nn.Sequential(nn.Linear(cin * 4, 64), nn.LeakyReLU(0.2), nn.Linear(64, 12))
        init_conv_weights(self)
        nn.init.zeros_(self.fc[-1].weight)
        nn.init.zeros_(self.fc[-1].bias)
        self.translation_scale = translation_scale

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """Return (B, 3, 4) pull-back matrices in centred full-resolution voxel coordinates."""
        small = F.avg_pool3d(pair, 2)
        f = self.features(channels_last(small))
        b, c = f.shape[:2]
        coords = [torch.linspace(-1, 1, n, device=f.device, dtype=f.dtype) for n in f.shape[2:]]
        grid = torch.stack(torch.meshgrid(*coords, indexing="ij"))  # (3, x, y, z)
        weight = torch.relu(f)
        total = weight.sum((2, 3, 4)) + 1e-6
        centroid = [(weight * g).sum((2, 3, 4)) / total for g in grid]
        pooled = torch.cat([f.mean((2, 3, 4)), *centroid], 1)
        out = self.fc(pooled).view(b, 3, 4)
        matrix = torch.eye(3, device=out.device, dtype=out.dtype) + 0.1 * out[:, :, :3]
        translation = self.translation_scale * out[:, :, 3:]
        return torch.cat([matrix, translation], 2)


class KeypointAffineNet(nn.Module):
    """Soft keypoints in each image + closed-form weighted least-squares affine.

    One CNN (shared by both images, one channel in) runs on the image downsampled by 2; a small
    U-Net-style decoder brings the deepest features back to 1/8 of the input resolution, where a
    1x1 convolution gives ``keypoints`` heat maps. The soft-argmax of each map is a keypoint
    (centred full-resolution voxel coordinates); a second 1x1 convolution gives each keypoint a
    confidence. The pull-back affine ``x_moving = M x_fixed + t`` (centred voxels) is the weighted
    least-squares fit of the moving keypoints from the fixed ones, slightly pulled towards the
    identity so that degenerate keypoint sets stay well posed.
    """

    heat_level = 2  # encoder level of the heat maps: 1/8 of the input resolution

    def __init__(self, channels: list[int], keypoints: int = 32, ridge: float = 1e-3) -> None:
        super().__init__()
        if len(channels) <= self.heat_level:
            raise ValueError(f"keypoint affine network needs > {self.heat_level} levels")
        self.enc = nn.ModuleList()
        cin = 1
        for level, cout in enumerate(channels):
            stride = 1 if level == 0 else 2
            self.enc.append(nn.Sequential(ConvBlock(cin, cout, stride), ConvBlock(cout, cout)))
            cin = cout
        self.dec = nn.ModuleList()
        for skip in channels[self.heat_level : -1][::-1]:
            self.dec.append(ConvBlock(cin + skip, skip))
            cin = skip
        self.heat = nn.Conv3d(cin, keypoints, 1)
        self.confidence = nn.Conv3d(cin, keypoints, 1)
        init_conv_weights(self)
        self.ridge = ridge

    def keypoints(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keypoints (B, K, 3) in centred full-resolution voxels and their weights (B, K)."""
        full = image.shape[2:]
        x = channels_last(F.avg_pool3d(image, 2))
        feats = []
        for block in self.enc:
            x = block(x)
            feats.append(x)
        for block, skip in zip(self.dec, feats[self.heat_level : -1][::-1], strict=True):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        heat = self.heat(x).flatten(2).float().softmax(-1)  # (B, K, N)
        stride = 2 ** (self.heat_level + 1)
        axes = [
            stride * torch.arange(n, device=x.device, dtype=heat.dtype)
            + (stride - 1) / 2
            - (s - 1) / 2
            for n, s in zip(x.shape[2:], full, strict=True)
        ]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # (3, N)
        points = torch.einsum("bkn,cn->bkc", heat, coords)
        conf = (self.confidence(x).flatten(2).float() * heat).sum(-1)
        return points, conf

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """Return (B, 3, 4) pull-back matrices in centred full-resolution voxel coordinates."""
        b = pair.shape[0]
        points, conf = self.keypoints(torch.cat([pair[:, :1], pair[:, 1:2]], 0))
        fixed, moving = points[:b], points[b:]
        weight = torch.softmax(conf[:b] + conf[b:], -1)  # (B, K), sums to one
        scale = 32.0  # voxels; keeps the normal equations well conditioned
        ones = torch.ones_like(fixed[..., :1])
        p = torch.cat([fixed / scale, ones], -1)  # (B, K, 4)
        q = moving / scale
        eye = torch.eye(4, device=p.device, dtype=p.dtype)
        lhs = p.transpose(1, 2) @ (weight[..., None] * p) + self.ridge * eye
        prior = torch.cat([torch.eye(3), torch.zeros(1, 3)], 0).to(p)  # identity, as p -> q
        rhs = p.transpose(1, 2) @ (weight[..., None] * q) + self.ridge * prior
        solution = torch.linalg.solve(lhs, rhs).transpose(1, 2)  # (B, 3, 4)
        return torch.cat([solution[:, :, :3], scale * solution[:, :, 3:]], 2).to(pair.dtype)


class RegistrationModel(nn.Module):
    """The two networks that make up the deep engine, saved and loaded together."""

    def __init__(self, config: NetConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetConfig()
        self.affine: nn.Module = (
            KeypointAffineNet(self.config.affine_channels, self.config.affine_keypoints)
            if self.config.affine_kind == "keypoints"
            else AffineNet(self.config.affine_channels)
        )
        self.flow = VelocityUNet(
            self.config.unet_encoder, self.config.unet_decoder, self.config.cost_radius
        )
        self.to(memory_format=torch.channels_last_3d)


def centred_affine_grid(matrix: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Voxel displacement (B, 3, X, Y, Z) of the pull-back ``x -> M (x - c) + c + t``."""
    from atlasflow.nn.layers import identity_grid

    grid = identity_grid(shape, matrix.device).to(matrix.dtype)
    centre = torch.tensor([(s - 1) / 2 for s in shape], device=matrix.device, dtype=matrix.dtype)
    x = grid - centre.view(1, 3, 1, 1, 1)
    mapped = torch.einsum(
        "bij,bjxyz->bixyz", matrix[:, :, :3], x.expand(matrix.shape[0], -1, -1, -1, -1)
    )
    mapped = mapped + matrix[:, :, 3].view(-1, 3, 1, 1, 1) + centre.view(1, 3, 1, 1, 1)
    return mapped - grid
