"""SynthMorph-style synthetic training pairs, generated on the fly from anatomical label maps.

Owns: turning label maps into a small cached training set (2 mm, RAS, brain-centred, affinely
pre-aligned to the first map) and drawing random image pairs from it. Each synthetic image gets
random per-label intensities (either a jittered T1-like contrast or an arbitrary one, so the
networks do not rely on one contrast), a random smooth deformation (exponential of a random
stationary velocity field), a random affine, a multiplicative bias field, noise, blur and a
dilated-brain mask like the one the benchmark and the pipeline use.

Label sources: the 20 SynthSeg whole-head label maps in ``../shared/data/synthseg_label_maps`` when
present (FreeSurfer label numbers, extra-cerebral classes >= 500), else nilearn's MNI152 grey- and
white-matter probability maps (package data, no download), turned into a 3-class label map.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from atlasflow.errors import AtlasflowError
from atlasflow.io.atomic import atomic_file
from atlasflow.io.images import Grid, Image, load_image
from atlasflow.nn.layers import (
    compose_displacements,
    integrate_velocity,
    resize_displacement,
    warp_tensor,
)
from atlasflow.transforms import Transform, apply_transform

#: Label classes used for the Dice loss: FreeSurfer labels grouped into 17 classes (0 = outside
#: the brain, including the extra-cerebral SynthSeg classes >= 500). Left and right are merged.
FS_GROUPS: dict[int, int] = {
    2: 1,
    41: 1,
    77: 1,
    85: 1,
    30: 1,
    62: 1,
    72: 10,
    136: 1,
    137: 1,
    163: 1,
    164: 1,  # cerebral WM (+ small)
    3: 2,
    42: 2,  # cerebral cortex
    4: 3,
    43: 3,
    5: 3,
    44: 3,  # lateral ventricles
    7: 4,
    46: 4,  # cerebellum WM
    8: 5,
    47: 5,  # cerebellum cortex
    10: 6,
    49: 6,  # thalamus
    11: 7,
    50: 7,  # caudate
    12: 8,
    51: 8,  # putamen
    13: 9,
    52: 9,  # pallidum
    14: 10,
    15: 10,  # 3rd / 4th ventricle
    16: 11,  # brainstem
    17: 12,
    53: 12,  # hippocampus
    18: 13,
    54: 13,  # amygdala
    24: 14,  # CSF
    26: 15,
    58: 15,  # accumbens
    28: 16,
    60: 16,  # ventral DC
}
NUM_CLASSES = 17

#: Rough T1-weighted intensities (scale 0-1) per class, jittered per image for "T1-like" pairs.
T1_MEANS = np.array(
    [
        0.0,
        0.85,
        0.55,
        0.15,
        0.80,
        0.55,
        0.75,
        0.60,
        0.65,
        0.75,
        0.15,
        0.75,
        0.55,
        0.55,
        0.20,
        0.60,
        0.70,
    ],
    np.float32,
)

TRAIN_SHAPE = (80, 96, 80)
TRAIN_SPACING = 2.0


def group_of(label: int) -> int:
    """Dice class of a FreeSurfer label (0 for background and extra-cerebral labels)."""
    if label <= 0 or label >= 500:
        return 0
    return FS_GROUPS.get(int(label), 1)


# ----------------------------------------------------------------------------- label-map cache


@dataclass
class LabelSet:
    """Label maps on one common 2 mm RAS grid, stored as compact indices into ``labels``."""

    maps: np.ndarray  # (N, X, Y, Z) uint8 compact indices
    labels: np.ndarray  # (L,) original label numbers; index 0 is background
    grid: Grid
    source: str

    @property
    def groups(self) -> np.ndarray:
        return np.array([group_of(int(v)) for v in self.labels], np.int64)

    @property
    def brain(self) -> np.ndarray:
        """Per compact index: True for brain labels (not background, not extra-cerebral)."""
        return np.array([0 < v < 500 for v in self.labels])

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the maps, their labels and grid: the same data wherever it
        was read from (a resumed training run checks it)."""
        digest = hashlib.sha256()
        for part in (self.maps, self.labels, np.asarray(self.grid.shape), self.grid.affine):
            digest.update(np.ascontiguousarray(part).tobytes())
        return digest.hexdigest()[:16]


def _ras_grid_around(centre_world: np.ndarray, shape: tuple[int, int, int], spacing: float) -> Grid:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre_world - spacing * (np.array(shape) - 1) / 2
    return Grid(shape, affine)


def _brain_centre(image: Image) -> np.ndarray:
    data = np.asarray(image.data)
    idx = np.argwhere((data > 0) & (data < 500)).mean(0)
    return image.affine[:3, :3] @ idx + image.affine[:3, 3]


def _affine_to_reference(reference: np.ndarray, moving: np.ndarray, steps: int = 150) -> np.ndarray:
    """Voxel pull-back matrix (3x4, centred coordinates) aligning two one-hot class maps at 4 mm."""
    ref = F.avg_pool3d(torch.from_numpy(reference)[None].float(), 2)
    mov = F.avg_pool3d(torch.from_numpy(moving)[None].float(), 2)
    from atlasflow.nn.networks import centred_affine_grid
    from atlasflow.nn.optim import Adam

    params = torch.zeros(1, 3, 4, requires_grad=True)
    opt = Adam([params], lr=0.01)
    eye = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)[None]
    scale = torch.tensor([1.0, 1.0, 1.0, 10.0])  # translation in (half-res) voxels, order one
    for _ in range(steps):
        opt.zero_grad()
        matrix = eye + params * scale
        disp = centred_affine_grid(matrix, tuple(ref.shape[2:]))
        loss = (warp_tensor(mov, disp) - ref).pow(2).mean()
        loss.backward()
        opt.step()
    matrix = (eye + params.detach() * scale)[0].numpy().astype(np.float64)
    matrix[:, 3] *= 2.0  # half-res voxels -> 2 mm voxels
    return matrix


def _centred_to_world(matrix: np.ndarray, grid: Grid) -> np.ndarray:
    """World (RAS) 4x4 of a centred-voxel pull-back matrix on ``grid``."""
    c = (np.array(grid.shape) - 1) / 2
    vox = np.eye(4)
    vox[:3, :3] = matrix[:, :3]
    vox[:3, 3] = matrix[:, 3] + c - matrix[:, :3] @ c
    return grid.affine @ vox @ np.linalg.inv(grid.affine)


def _onehot_groups(compact: np.ndarray, groups: np.ndarray) -> np.ndarray:
    g = groups[compact]
    return np.stack([(g == k) for k in range(1, NUM_CLASSES)]).astype(np.float32)


def nilearn_label_map() -> Image:
    """A 3-class FreeSurfer-numbered label map (WM 2, cortex 3, CSF 24) from nilearn's MNI152."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm_img = datasets.load_mni152_wm_template(resolution=1)
    gm = np.asarray(gm_img.get_fdata(), np.float32)
    wm = np.asarray(wm_img.get_fdata(), np.float32)
    brain = ndimage.binary_fill_holes((gm + wm) > 0.3)
    labels = np.zeros(gm.shape, np.int16)
    labels[brain] = 24
    labels[(gm > 0.3) & (gm >= wm)] = 3
    labels[(wm > 0.3) & (wm > gm)] = 2
    return Image(labels, np.asarray(gm_img.affine, float))


def label_sources(source_dir: str | os.PathLike | None) -> list[Path] | None:
    """Label-map files in ``source_dir`` (None when the folder is absent or empty)."""
    if source_dir is None:
        return None
    files = sorted(Path(source_dir).glob("*.nii*"))
    return files or None


def build_label_set(
    source_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None = None,
    shape: tuple[int, int, int] = TRAIN_SHAPE,
    spacing: float = TRAIN_SPACING,
    limit: int | None = None,
) -> LabelSet:
    """Resample label maps to a common brain-centred RAS grid, pre-aligned (affine) to the first.

    The result is cached as ``.npz`` in ``cache_dir`` keyed by the source file names and sizes, so
    training starts in seconds the second time.
    """
    files = label_sources(source_dir)
    if limit is not None and files:
        files = files[:limit]
    key_src = (
        "nilearn-mni152"
        if files is None
        else "|".join(f"{p.name}:{p.stat().st_size}" for p in files)
    )
    key = hashlib.sha256(f"{key_src}|{shape}|{spacing}|v1".encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"labelset-{key}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        z = np.load(cache)
        grid = Grid(tuple(int(s) for s in z["shape"]), z["affine"])
        return LabelSet(z["maps"], z["labels"], grid, str(z["source"]))

    images = [nilearn_label_map()] if files is None else [load_image(p, dtype=None) for p in files]
    images = [Image(np.asarray(im.data).astype(np.int32), im.affine) for im in images]
    all_labels = np.unique(np.concatenate([np.unique(im.data) for im in images]))
    all_labels = np.concatenate([[0], all_labels[all_labels != 0]])
    if len(all_labels) > 255:
        raise AtlasflowError(f"{source_dir}: more than 255 distinct labels")
    lookup = {int(v): i for i, v in enumerate(all_labels)}
    groups = np.array([group_of(int(v)) for v in all_labels])

    maps = []
    ref_grid: Grid | None = None
    ref_onehot = None
    for im in images:
        grid = _ras_grid_around(_brain_centre(im), shape, spacing)
        moved = apply_transform(im, Transform.identity(), grid, "nearest").data
        compact = np.vectorize(lookup.get, otypes=[np.int64])(moved)
        if ref_grid is None:
            ref_grid, ref_onehot = grid, _onehot_groups(compact, groups)
            maps.append(compact.astype(np.uint8))
            continue
        # Align this map (on its own brain-centred grid) to the reference map.
        matrix = _affine_to_reference(ref_onehot, _onehot_groups(compact, groups))
        # Pull-back reference world -> image world: x -> T_centred(x + offset), offset between grids.
        to_own = np.eye(4)
        to_own[:3, 3] = grid.affine[:3, 3] - ref_grid.affine[:3, 3]
        world = _centred_to_world(matrix, grid) @ to_own
        aligned = apply_transform(im, Transform(world), ref_grid, "nearest").data
        maps.append(np.vectorize(lookup.get, otypes=[np.int64])(aligned).astype(np.uint8))
    label_set = LabelSet(
        np.stack(maps),
        all_labels.astype(np.int32),
        ref_grid,
        "nilearn" if files is None else str(source_dir),
    )
    if cache is not None:
        with atomic_file(cache, ".npz") as tmp:
            np.savez_compressed(
                tmp,
                maps=label_set.maps,
                labels=label_set.labels,
                shape=np.array(shape),
                affine=ref_grid.affine,
                source=label_set.source,
            )
    return label_set


# ------------------------------------------------------------------------------ random fields
# Torch counterparts of atlasflow.synth.fields: another algorithm (voxel noise, not world-mm plane
# waves) on a torch.Generator, kept apart so neither a seed's pairs nor the demo cohort change.


def _randu(gen: torch.Generator, low: float, high: float, size=()) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=gen)


def random_affine(
    gen: torch.Generator, rotation_deg: float, scale: float, shear: float, translation: float
) -> torch.Tensor:
    """Random (1, 3, 4) centred-voxel pull-back matrix: rotations, scales, shears, translation."""
    angles = torch.deg2rad(_randu(gen, -rotation_deg, rotation_deg, (3,)))
    c, s = torch.cos(angles), torch.sin(angles)
    rx = torch.tensor([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = torch.tensor([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = torch.tensor([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    scales = torch.diag(torch.exp(_randu(gen, -scale, scale, (3,))))
    sh = torch.eye(3) + torch.triu(_randu(gen, -shear, shear, (3, 3)), 1)
    matrix = rz @ ry @ rx @ sh @ scales
    t = _randu(gen, -translation, translation, (3, 1))
    return torch.cat([matrix, t], 1)[None]


def random_velocity(
    gen: torch.Generator, shape: tuple[int, int, int], max_std: float, coarse: int = 8
) -> torch.Tensor:
    """Smooth random velocity (1, 3, X, Y, Z) in voxels: coarse Gaussian noise, upsampled."""
    small = tuple(max(2, s // coarse) for s in shape)
    std = float(_randu(gen, 0.0, max_std))
    noise = torch.randn((1, 3, *small), generator=gen) * std
    return F.interpolate(noise, size=shape, mode="trilinear", align_corners=True)


def random_deformation(
    gen: torch.Generator, shape: tuple[int, int, int], max_std: float, affine: torch.Tensor | None
) -> torch.Tensor:
    """Pull-back displacement (1, 3, X, Y, Z) in voxels: first ``affine`` (centred voxels), then exp(v).

    Built at quarter resolution (the field is smooth, and the affine part is linear so trilinear
    upsampling keeps it exact) and upsampled, which keeps synthesis cheap on a CPU.
    """
    from atlasflow.nn.networks import centred_affine_grid

    quarter = tuple(max(2, s // 4) for s in shape)
    disp = integrate_velocity(random_velocity(gen, quarter, max_std / 4, coarse=2), 5)
    if affine is not None:
        scaled = affine.clone()
        scaled[:, :, 3] = scaled[:, :, 3] / 4.0
        aff = centred_affine_grid(scaled, quarter)
        disp = aff + warp_tensor(disp, aff)
    return resize_displacement(disp, shape)


def random_svf_pair(
    gen: torch.Generator, shape: tuple[int, int, int], max_std: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(w) and exp(-w) (1, 3, X, Y, Z, voxels) of one random smooth velocity ``w``."""
    quarter = tuple(max(2, s // 4) for s in shape)
    velocity = random_velocity(gen, quarter, max_std / 4, coarse=2)
    return (
        resize_displacement(integrate_velocity(velocity, 5), shape),
        resize_displacement(integrate_velocity(-velocity, 5), shape),
    )


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.3:
        return x
    radius = int(np.ceil(2.5 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = len(k)
        pad = [0, 0, 0]
        pad[axis] = radius
        x = F.conv3d(x, k.view(1, 1, *shape).repeat(c, 1, 1, 1, 1), padding=tuple(pad), groups=c)
    return x


# ------------------------------------------------------------------------------ pair generator


class PairGenerator:
    """Draws synthetic (fixed, moving) pairs with labels from a :class:`LabelSet`.

    ``sample()`` returns a dict of tensors with a batch dimension of one: ``fixed``, ``moving``
    (B, 1, X, Y, Z intensities in [0, 1], zero outside the dilated brain), ``fixed_mask``,
    ``moving_mask``, ``fixed_onehot``, ``moving_onehot`` (B, NUM_CLASSES, ...), the kind of pair and
    the contrast mode, ``affine`` (the true fixed->moving centred-voxel matrix) for affine pairs, and
    ``target`` (the true fixed->moving pull-back displacement, voxels) for 'same' pairs.
    """

    def __init__(
        self,
        label_set: LabelSet,
        seed: int = 0,
        max_std: float = 6.0,
        crop: tuple[int, int, int] | None = None,
        t1_probability: float = 0.6,
        same_probability: float = 0.4,
    ) -> None:
        self.set = label_set
        self.t1_probability = t1_probability
        self.same_probability = same_probability
        # Optional random crops (flow training): synthesised with a margin so that deformations
        # pull real anatomy, not padding, into the crop; the margin is cut off afterwards.
        self.crop = tuple(crop) if crop else None
        self.margin = 8
        self.gen = torch.Generator().manual_seed(seed)
        self.maps = torch.from_numpy(label_set.maps.astype(np.int64))
        self.groups = torch.from_numpy(label_set.groups)
        self.brain = torch.from_numpy(label_set.brain)
        self.shape = tuple(int(s) for s in label_set.maps.shape[1:])
        self.max_std = max_std
        self._brain_masks = [self._dilated_brain(i) for i in range(len(self.maps))]
        self._box: tuple[slice, ...] = tuple(slice(0, n) for n in self.shape)
        self._cropped = False

    def _dilated_brain(self, index: int) -> torch.Tensor:
        brain = self.brain[self.maps[index]].numpy()
        return torch.from_numpy(ndimage.binary_dilation(brain, iterations=2).astype(np.float32))[
            None, None
        ]

    def _intensities(self, t1_like: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.set.labels)
        if t1_like:
            means = torch.from_numpy(T1_MEANS)[self.groups] + 0.05 * torch.randn(
                n, generator=self.gen
            )
            extra = torch.from_numpy(~self.set.brain & (self.set.labels > 0))
            means = torch.where(extra, _randu(self.gen, 0.0, 0.5, (n,)), means)
        else:
            means = torch.rand(n, generator=self.gen)
        means[0] = 0.0
        stds = _randu(self.gen, 0.0, 0.06, (n,))
        return means.clamp(0, 1), stds

    def _synth(self, index: int, disp: torch.Tensor, t1_like: bool) -> tuple[torch.Tensor, ...]:
        labels = self.maps[index][self._box][None, None]
        means, stds = self._intensities(t1_like)
        image = means[labels] + stds[labels] * torch.randn(labels.shape, generator=self.gen)
        image = _blur(image, float(_randu(self.gen, 0.0, 1.0)))
        shape = tuple(disp.shape[2:])
        brain = self._brain_masks[index][(..., *self._box)]
        warped = warp_tensor(torch.cat([image, brain], 1), disp, padding_mode="zeros")
        image, mask = warped[:, :1], (warped[:, 1:2] > 0.5).float()
        warped_labels = warp_tensor(
            labels.float(), disp, mode="nearest", padding_mode="zeros"
        ).long()
        onehot = torch.zeros((1, NUM_CLASSES, *shape)).scatter_(1, self.groups[warped_labels], 1.0)
        # Multiplicative smooth bias field, gamma, noise, then the dilated brain mask.
        bias = F.interpolate(
            torch.randn((1, 1, 4, 5, 4), generator=self.gen) * float(_randu(self.gen, 0.0, 0.25)),
            size=shape,
            mode="trilinear",
            align_corners=True,
        )
        image = image.clamp_min(0) * torch.exp(bias)
        image = image + float(_randu(self.gen, 0.0, 0.03)) * torch.randn(
            image.shape, generator=self.gen
        )
        image = image * mask
        inside = image[mask > 0]
        top = (
            torch.quantile(inside[:: max(1, inside.numel() // 50000)], 0.99)
            if inside.numel()
            else 1.0
        )
        image = (image / max(float(top), 1e-3)).clamp(0, 1)
        image = image.pow(torch.exp(0.25 * torch.randn((), generator=self.gen)))
        if self._cropped:
            inner = (..., *(slice(self.margin, n - self.margin) for n in shape))
            return (image * mask)[inner], mask[inner], onehot[inner]
        return image * mask, mask, onehot

    def sample(self, kind: str | None = None) -> dict:
        """Draw one pair. ``kind``: 'same' (one label map, two deformations), 'cross' (two label
        maps), or 'affine' (a large random affine on the moving side); random when None."""
        n = len(self.maps)
        if kind is None:
            kind = (
                "same"
                if (n < 2 or torch.rand((), generator=self.gen) < self.same_probability)
                else "cross"
            )
        i = int(torch.randint(n, (), generator=self.gen))
        j = (
            i
            if (kind == "same" or n < 2)
            else int((i + 1 + torch.randint(n - 1, (), generator=self.gen)) % n)
        )
        t1_like = bool(torch.rand((), generator=self.gen) < self.t1_probability)
        shape = self.shape
        self._box = tuple(slice(0, n) for n in self.shape)
        self._cropped = self.crop is not None and kind != "affine"
        if self._cropped:
            shape = tuple(c + 2 * self.margin for c in self.crop)
            starts = [
                int(torch.randint(max(1, n - c + 1), (), generator=self.gen))
                for n, c in zip(self.shape, shape, strict=True)
            ]
            self._box = tuple(slice(a, a + c) for a, c in zip(starts, shape, strict=True))
        small_affine = lambda: random_affine(self.gen, 4.0, 0.04, 0.02, 2.0)  # noqa: E731
        target = None
        if kind == "affine":
            big = random_affine(self.gen, 15.0, 0.12, 0.06, 10.0)
            fixed_disp = random_deformation(self.gen, self.shape, 2.0, None)
            moving_disp = random_deformation(self.gen, self.shape, 2.0, big)
        elif kind == "same":
            # The moving image is the fixed one pulled through exp(-w): the answer (pull-back
            # fixed -> moving) is then exactly exp(w), a dense target for the flow network.
            fixed_disp = random_deformation(self.gen, shape, self.max_std / 2, small_affine())
            forward, backward = random_svf_pair(self.gen, shape, self.max_std)
            moving_disp = compose_displacements(backward, fixed_disp)
            target = forward
            big = None
        else:
            std = self.max_std if kind == "same" else self.max_std / 2
            fixed_disp = random_deformation(self.gen, shape, std / 2, small_affine())
            moving_disp = random_deformation(self.gen, shape, std, small_affine())
            big = None
        fixed, fixed_mask, fixed_onehot = self._synth(i, fixed_disp, t1_like)
        moving, moving_mask, moving_onehot = self._synth(j, moving_disp, t1_like)
        out = {
            "fixed": fixed,
            "moving": moving,
            "fixed_mask": fixed_mask,
            "moving_mask": moving_mask,
            "fixed_onehot": fixed_onehot,
            "moving_onehot": moving_onehot,
            "kind": kind,
            "t1_like": t1_like,
        }
        if target is not None:
            if self._cropped:
                target = target[(..., *(slice(self.margin, n - self.margin) for n in shape))]
            out["target"] = target
        if big is not None:
            # moving(y) ~ source(big(y)) and fixed(x) ~ source(x): fixed -> moving is big^-1.
            full = torch.cat([big[0], torch.tensor([[0.0, 0.0, 0.0, 1.0]])], 0)
            out["affine"] = torch.linalg.inv(full)[:3][None]
        return out
