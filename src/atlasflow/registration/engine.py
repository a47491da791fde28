"""The deep registration engine: one public function, :func:`register_deep`.

Owns the path from two Images on any grids to a world-space :class:`~atlasflow.transforms.Transform`:

1. working grid = the fixed grid, cropped to the fixed mask's bounding box (+8 voxels) when a
   mask is given, with its voxel axes reordered to RAS (a permutation, no resampling) and padded
   to a multiple of 16, so the networks always see brains the way round they were trained
   (:mod:`~atlasflow.registration.working_grid`);
2. initial alignment (or ``init_affine``): centres of mass matched and the best start of a coarse
   rotation search scored by mutual information (:func:`searched_start`);
3. deep affine (12 parameters around the identity), kept only when it improves the similarity, then
   a short test-time optimisation of the affine (Adam on LNCC at quarter resolution;
   :mod:`~atlasflow.registration.affine`);
4. deep SVF (U-Net, half-resolution velocity), integrated by scaling and squaring (7 steps);
5. optional instance optimisation of the velocity for ``refine_steps`` steps (Adam, LNCC +
   diffusion, masked by the fixed mask minus the cost mask), coarse-to-fine
   (:mod:`~atlasflow.registration.refine`);
6. conversion to world millimetres on the fixed grid: forward displacement, inverse displacement
   (exp of the negated velocity, unless ``inverse=False``) and the velocity itself.

Everything runs in torch on ``device`` with deterministic algorithms; model loading is cached and
not counted in ``seconds``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Image
from atlasflow.nn import deterministic_kernels
from atlasflow.nn.layers import integrate_velocity, resize_displacement, warp_tensor
from atlasflow.nn.losses import local_ncc
from atlasflow.nn.model_io import load_model
from atlasflow.nn.networks import RegistrationModel
from atlasflow.registration.affine import AFFINE_STEPS, align_affine
from atlasflow.registration.initial import deformation_helps, initial_alignment, rotation_candidates
from atlasflow.registration.inputs import (
    needs_preparation,
    on_working_grid,
    prepare,
    to_original_grid,
)
from atlasflow.registration.options import RegistrationOptions
from atlasflow.registration.refine import label_targets, refine
from atlasflow.registration.working_grid import (
    WorkingPair,
    coarse_affine,
    coarse_from_world,
    coarse_to_world,
    prepare_pair,
    sample_moving,
)
from atlasflow.transforms import Transform

MODEL_DIR = Path(__file__).resolve().parents[1] / "models"
DEFAULT_MODEL = MODEL_DIR / "atlasflow_synthmorph_2mm.safetensors"
#: Runs of the velocity network of a registration without refinement (see register_deep).
NETWORK_PASSES = 2


@dataclass
class DeepResult:
    """Output of :func:`register_deep` (all fields on the fixed grid, RAS mm)."""

    transform: Transform  # fixed -> moving
    # x_fixed = y + v(y), y = affine^-1 x_moving (None: not asked for)
    inverse_displacement: Image | None
    velocity: Image | None  # stationary velocity field (world mm; None when not asked for)
    seconds: float  # compute time, model loading excluded
    # The same velocity on the network's own grid (half the working resolution, world mm): 1/8 of
    # the voxels, and exact as ``init_velocity`` of a later registration on the same working grid.
    coarse_velocity: Image | None = None


# ------------------------------------------------------------------------------------ helpers


_MODEL_CACHE: dict[tuple[str, float], RegistrationModel] = {}


def get_model(model_path: str | os.PathLike | None, device: str = "cpu") -> RegistrationModel:
    """Load (once per process) the model at ``model_path`` or the shipped default."""
    path = Path(model_path) if model_path is not None else DEFAULT_MODEL
    if not path.is_file():
        raise AtlasflowError(f"{path}: registration model not found")
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _MODEL_CACHE:
        model, _ = load_model(path, device)
        for p in model.parameters():
            p.requires_grad_(False)
        _MODEL_CACHE[key] = model
    return _MODEL_CACHE[key]


# ------------------------------------------------------------------------------------ public


def register_deep(
    fixed: Image,
    moving: Image,
    options: RegistrationOptions | None = None,
    *,
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
    cost_mask: np.ndarray | None = None,
    fixed_labels: np.ndarray | None = None,
    moving_labels: np.ndarray | None = None,
    init_affine: np.ndarray | None = None,
    init_velocity: Image | None = None,
    affine_network: bool = True,
    **changes: Any,
) -> DeepResult:
    """Register ``moving`` to ``fixed``; the transform maps fixed world points to moving ones.

    ``options`` (:class:`~atlasflow.registration.options.RegistrationOptions`, with ``changes``
    to its fields given as keywords) say how: the weights (``model_path``), ``refine_steps``,
    ``affine_only``, ``affine_steps``, ``device``, ``seed``, the label term, the fields returned,
    ``cross_contrast`` (two contrasts: the path of raw scans, :func:`_register_prepared`, without
    ``refine_steps``).

    Masks live on their own image's grid (similarity only inside); ``cost_mask`` (fixed grid) marks
    voxels left out of the similarity (for example a tumour). ``init_affine`` (4x4, fixed world ->
    moving world) replaces the searched start (:func:`searched_start`); with ``affine_network=False``
    it is only refined by ``affine_steps`` of test-time optimisation (an atlas iteration, whose
    members are already affinely aligned to the template). ``fixed_labels``/``moving_labels``
    (integer maps on their image's grid) add ``label_weight`` x soft Dice over the labels present
    in both to the instance optimisation (``refine_steps`` > 0). ``label_term="distance"`` treats
    the labels as one region (label > 0) and matches clipped signed distances to its edge instead
    (:func:`signed_distance`): depth inside and distance outside are kept, so a growing region
    is mapped by an expansion of its inside, not by stretching a thin shell at its edge.
    ``init_velocity`` (world mm, typically a previous result's ``coarse_velocity``) is a deformation
    to start from, after the affine: the network sees the moving image warped by it and its
    prediction is added (a cascade; the atlas iterations carry each member's field this way).
    ``full_velocity=False`` leaves the velocity on the fixed grid out (``velocity`` is None;
    ``coarse_velocity`` holds it on the network's grid), as ``inverse=False`` does the inverse.
    """
    opts = RegistrationOptions.of(options, **changes)
    masks = {
        "fixed_mask": fixed_mask,
        "moving_mask": moving_mask,
        "cost_mask": cost_mask,
        "fixed_labels": fixed_labels,
        "moving_labels": moving_labels,
    }
    _check_inputs(fixed, moving, **masks)
    if opts.cross_contrast:
        # Two contrasts: the contrast-independent path (the workflow's preprocessed scans pass
        # through its preparation unchanged), without the instance refinement, whose local
        # correlation is a one-contrast similarity: across contrasts it bent the anatomy while
        # raising the mutual information (demo FLAIRs onto the MNI T1w at 4 mm: 6.4-6.8 mm from
        # the true map with 30 steps, 3.0-3.2 mm without; their T1w, one contrast, 2.0-2.4 mm).
        # One network pass: a second one compounds what local correlation accepts across
        # contrasts (demo FLAIR of a tumour subject onto the template: 5.2 -> 6.3 mm).
        opts = replace(opts, cross_contrast=False, refine_steps=0, network_passes=1)
        return _register_prepared(fixed, moving, opts, masks, init_affine, init_velocity)
    if needs_preparation(fixed, moving, fixed_mask, moving_mask):
        return _register_prepared(fixed, moving, opts, masks, init_affine, init_velocity)
    device = opts.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    # Affine-only registration still works without any weights (moments + test-time optimisation).
    no_weights = opts.affine_only and opts.model_path is None and not DEFAULT_MODEL.exists()
    model = None if no_weights else get_model(opts.model_path, device)
    torch.manual_seed(opts.seed)
    deterministic_kernels()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    start = time.perf_counter()

    pair = prepare_pair(fixed, moving, fixed_mask, moving_mask, cost_mask, fixed_labels, device)
    world = (
        searched_start(fixed, moving, fixed_mask, moving_mask)
        if init_affine is None
        else np.asarray(init_affine, float)
    )
    affine_steps = AFFINE_STEPS if opts.affine_steps is None else opts.affine_steps
    world = align_affine(pair, world, model if affine_network else None, affine_steps)
    if opts.affine_only:
        return _affine_result(world, fixed, time.perf_counter() - start)

    steps = model.config.integration_steps
    # Without refinement, a second pass of the network on the moving image as the first leaves
    # it corrects part of the residual (9 IXI pairs, networks alone: Dice 0.621 -> 0.636, +0.35 s);
    # with refinement the steps do that (30 steps: 0.697 -> 0.698), and a carried field (an atlas
    # iteration) is already a cascade.
    passes = opts.network_passes or (
        NETWORK_PASSES if opts.refine_steps == 0 and init_velocity is None else 1
    )
    velocity, disp_half, moving_w = _network_velocity(pair, model, world, init_velocity, passes)
    if opts.refine_steps > 0:
        labels = {}
        if fixed_labels is not None and moving_labels is not None:
            labels = label_targets(
                pair,
                world,
                fixed,
                moving,
                fixed_labels,
                moving_labels,
                opts.label_weight,
                opts.label_term,
            )
        velocity, disp_half = refine(
            pair, moving_w, velocity, opts.refine_steps, steps, opts.fine_squarings, **labels
        )
    result = _on_fixed_grid(pair, fixed, world, velocity, disp_half, steps, opts)
    result.seconds = time.perf_counter() - start
    return result


def searched_start(
    fixed: Image, moving: Image, fixed_mask: np.ndarray | None, moving_mask: np.ndarray | None
) -> np.ndarray:
    """Where a registration of two prepared scans starts (fixed world -> moving world): their
    centres of mass matched, turned by the best of the rotation search's grid (-30..30 degrees
    about each axis, mutual information on ~6 mm copies, :func:`rotation_candidates`); the
    affine network and the local-correlation steps go on from there.

    Centres of mass alone left the rotation to those steps, which cannot undo a head turned in
    its scanner: open_ms T1w brains, preprocessed by the workflow, with their headers turned 30
    degrees about the left-right axis and moved 40 mm registered to the template at NCC 0.71
    and 0.74 instead of 0.85 and 0.86 (45 degrees: 0.55); from the search, 0.85-0.87 at every
    angle tried, for ~0.25 s. The 9 IXI pairs scored as before (0.636 networks alone, 0.697 +
    30 steps).
    """
    return rotation_candidates(prepare(fixed, fixed_mask), prepare(moving, moving_mask))[0]


def _register_prepared(
    fixed: Image,
    moving: Image,
    opts: RegistrationOptions,
    masks: dict[str, np.ndarray | None],
    init_affine: np.ndarray | None,
    init_velocity: Image | None,
) -> DeepResult:
    """Scans as users have them (:mod:`atlasflow.registration.inputs`): normalised, masked and on
    working grids, started from the contrast-independent alignment of
    :mod:`atlasflow.registration.initial`, registered, and the fields carried back to the
    user's fixed grid. The affine found by mutual information is kept as it is: the engine's own
    affine steps (local correlation on a coarse grid) were measured to move it away from the
    dataset authors' alignment on the open_ms scans (0.3-1.5 mm -> 1-6 mm)."""
    start = time.perf_counter()
    pf, pm = prepare(fixed, masks["fixed_mask"]), prepare(moving, masks["moving_mask"])
    world = initial_alignment(pf, pm) if init_affine is None else np.asarray(init_affine, float)
    result = register_deep(
        pf.image,
        pm.image,
        opts,
        fixed_mask=pf.mask,
        moving_mask=pm.mask,
        cost_mask=on_working_grid(masks["cost_mask"], fixed, pf, "linear"),
        fixed_labels=on_working_grid(masks["fixed_labels"], fixed, pf, "nearest"),
        moving_labels=on_working_grid(masks["moving_labels"], moving, pm, "nearest"),
        init_affine=world,
        init_velocity=init_velocity,
        affine_network=False,
        affine_steps=0 if init_affine is None else opts.affine_steps,
    )
    if not opts.affine_only and not deformation_helps(pf, pm, result):
        result = _affine_result(result.transform.affine, pf.image, result.seconds, result.coarse_velocity)
    if pf.resampled:
        result.transform = Transform(result.transform.affine, to_original_grid(result.transform.displacement, fixed.grid))
        result.inverse_displacement = to_original_grid(result.inverse_displacement, fixed.grid)
        result.velocity = to_original_grid(result.velocity, fixed.grid)
    result.seconds = time.perf_counter() - start
    return result


def _affine_result(world: np.ndarray, fixed: Image, seconds: float, coarse: Image | None = None) -> DeepResult:
    """An affine-only result: zero fields on the fixed grid (and a zero coarse velocity when the
    deformation it replaces had one)."""
    zeros = np.zeros((*fixed.data.shape, 3), np.float32)
    return DeepResult(
        Transform(world, Image(zeros, fixed.affine.copy())),
        Image(zeros.copy(), fixed.affine.copy()),
        Image(zeros.copy(), fixed.affine.copy()),
        seconds,
        None if coarse is None else coarse.with_data(np.zeros_like(coarse.data)),
    )


def _check_inputs(fixed: Image, moving: Image, **masks: np.ndarray | None) -> None:
    """Masks and labels on their image's grid (``fixed_*``, ``cost_mask``: fixed; ``moving_*``:
    moving), both images 3-D."""
    for name, mask in masks.items():
        image = moving if name.startswith("moving") else fixed
        if mask is not None and tuple(np.shape(mask)) != tuple(image.data.shape[:3]):
            raise AtlasflowError(
                f"{name} has shape {np.shape(mask)}, expected {image.data.shape[:3]}"
            )
    if fixed.data.ndim != 3 or moving.data.ndim != 3:
        raise AtlasflowError("register_deep needs 3-D images")


def _network_velocity(
    pair: WorkingPair,
    model: RegistrationModel,
    world: np.ndarray,
    init_velocity: Image | None,
    passes: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The deep SVF on the affinely aligned pair (or on the pair as ``init_velocity`` leaves it),
    from ``passes`` runs of the network, each on the moving image as the previous leaves it.

    Returns the half-resolution velocity (voxel units), its displacement and the moving image
    on the working grid after the affine.
    """
    work, steps = pair.work, model.config.integration_steps
    with torch.no_grad():
        moving_w = sample_moving(pair.moving_t, pair.vox_matrix(world, work.affine), work.shape)
        start_velocity = None
        if init_velocity is not None:
            coarse_shape = tuple(n // 2 for n in work.shape)
            start_velocity = coarse_from_world(
                init_velocity, coarse_affine(work, coarse_shape), coarse_shape
            ).to(pair.device)
        for _ in range(passes):
            velocity, disp_half, kept = _network_pass(pair, model, moving_w, start_velocity, steps)
            if not kept:  # the network found nothing better: another pass would see the same
                break
            start_velocity = velocity
    return velocity, disp_half, moving_w


def _network_pass(
    pair: WorkingPair,
    model: RegistrationModel,
    moving_w: torch.Tensor,
    start_velocity: torch.Tensor | None,
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One run of the network on the moving image warped by ``start_velocity`` (half-resolution
    voxels; None: as the affine leaves it): the velocity, its displacement, and whether the
    network's field was kept."""
    moving_s = moving_w
    if start_velocity is not None:
        start_disp = integrate_velocity(start_velocity, steps)
        moving_s = warp_tensor(moving_w, resize_displacement(start_disp, pair.work.shape))
    velocity = model.flow(torch.cat([pair.fixed_t, moving_s], 1)).contiguous()
    half_shape = tuple(velocity.shape[2:])
    if start_velocity is not None and tuple(start_velocity.shape[2:]) != half_shape:
        raise AtlasflowError(
            f"network field {half_shape} is not half the working grid {pair.work.shape}"
        )
    # Keep the network's field only when it improves the (masked) similarity at half
    # resolution; otherwise keep the start (the identity, or ``init_velocity``).
    fixed_h, moving_h, cost_h = (
        F.interpolate(t, size=half_shape, mode="trilinear", align_corners=True)
        for t in (pair.fixed_t, moving_w, pair.cost_t)
    )
    if start_velocity is not None:
        # Stationary fields add to first order (exp(u) o exp(r) ~ exp(u + r)): one field,
        # integrated once, keeps a single transform representation. The start is scored
        # like the candidate (the half-resolution image warped at half resolution): scored
        # off the full-resolution warp instead, it looked better and every residual lost.
        start_h = warp_tensor(moving_h, start_disp)
        velocity = start_velocity + velocity
    disp_half = integrate_velocity(velocity, steps)
    if local_ncc(fixed_h, warp_tensor(moving_h, disp_half), 3, cost_h) <= local_ncc(
        fixed_h, moving_h if start_velocity is None else start_h, 3, cost_h
    ):
        if start_velocity is None:
            return torch.zeros_like(velocity), torch.zeros_like(velocity), False
        return start_velocity, start_disp, False
    return velocity, disp_half, True


def _on_fixed_grid(
    pair: WorkingPair,
    fixed: Image,
    world: np.ndarray,
    velocity: torch.Tensor,
    disp_half: torch.Tensor,
    steps: int,
    opts: RegistrationOptions,
) -> DeepResult:
    """Fields in working voxels -> world mm on the fixed grid (``seconds`` left at 0)."""
    work = pair.work
    with torch.no_grad():
        forward = resize_displacement(disp_half, work.shape)
        backward = (
            resize_displacement(integrate_velocity(-velocity, steps), work.shape)
            if opts.inverse
            else None
        )
        velocity_full = resize_displacement(velocity, work.shape) if opts.full_velocity else None
    linear = torch.from_numpy(work.affine[:3, :3]).float()

    def to_world(field: torch.Tensor) -> Image:
        vec = torch.einsum("wc,cxyz->xyzw", linear, field[0].cpu()).numpy()
        return Image(work.to_fixed(vec).astype(np.float32), fixed.affine.copy())

    half_shape = tuple(velocity.shape[2:])
    return DeepResult(
        Transform(world, to_world(forward)),
        to_world(backward) if backward is not None else None,
        to_world(velocity_full) if velocity_full is not None else None,
        0.0,
        coarse_to_world(velocity, coarse_affine(work, half_shape)),
    )
