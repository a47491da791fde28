"""Preprocessing of one scan: orientation, N4 bias correction, brain mask, intensity scale, grid.

Each step is a function from files to files so that the workflow can cache it as its own target:

1. :func:`reorient` - reorder the voxel array to RAS from the header (no resampling, no interpolation).
2. :func:`bias_correct` - N4 bias-field correction (:mod:`atlasflow.preprocess.n4`) inside a rough
   head/brain mask.
3. :func:`brain_mask` - the given mask, else the label map (dilated), else the template mask carried
   in by an affine registration of the template to the scan.
4. :func:`finalize` - intensity normalisation inside the mask (robust percentiles to [0, 1]) and
   resampling onto the working grid (isotropic spacing of the template, RAS, covering the brain).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Grid, Image, load_header, load_image, save_image
from atlasflow.io.itk import read_itk_affine
from atlasflow.preprocess import n4
from atlasflow.transforms import Transform, apply_transform


def to_ras(image: Image) -> Image:
    """Same image in world space, voxel array reordered so that axes run R, A, S."""
    ornt = nib.orientations.io_orientation(image.affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, target)
    data = nib.orientations.apply_orientation(image.data, transform)
    inv = nib.orientations.inv_ornt_aff(transform, image.data.shape[:3])
    return Image(np.ascontiguousarray(data), image.affine @ inv)


def check_image_content(image: Image, path: str | Path) -> None:
    """Reject images that cannot be preprocessed meaningfully."""
    spacing = image.grid.spacing
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0) or np.any(spacing > 20):
        raise AtlasflowError(f"{path}: implausible voxel size {np.round(spacing, 3).tolist()} mm")
    if float(image.data.max()) <= float(image.data.min()):
        raise AtlasflowError(f"{path}: image is constant ({float(image.data.min())}), nothing to align")


def reorient(in_path: str | Path, out_path: str | Path, dtype=np.float32) -> Image:
    """Step 1: reorient a file to RAS (intensity images as float32, label maps kept integer)."""
    image = load_image(in_path, dtype=dtype)
    if dtype is np.float32:
        check_image_content(image, in_path)
    ras = to_ras(image)
    save_image(ras, out_path)
    return ras


def head_mask(image: Image) -> np.ndarray:
    """Rough foreground mask: Otsu-like threshold, largest component, holes filled."""
    data = image.data
    positive = data[data > 0]
    if positive.size == 0:
        return np.ones(data.shape, bool)
    threshold = 0.5 * float(np.percentile(positive, 50)) * 0.3
    mask = data > threshold
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=2))


def bias_correct(in_path: str | Path, out_path: str | Path, mask_path: str | Path | None = None) -> Image:
    """Step 2: N4 bias-field correction (:mod:`atlasflow.preprocess.n4`) inside the given mask, or
    else a rough head mask.

    The bias field is smooth, so it is estimated on every 4th voxel (2nd on small images,
    :func:`atlasflow.preprocess.n4.shrink_factor`).
    """
    image = load_image(in_path)
    mask = load_image(mask_path).data > 0 if mask_path else head_mask(image)
    shrink = n4.shrink_factor(image.data.shape)
    out = image.with_data(n4.correct(image.data, mask, image.grid.spacing, shrink=shrink))
    out.data[~np.isfinite(out.data)] = 0
    save_image(out, out_path)
    return out


def brain_mask(
    image_path: str | Path,
    out_path: str | Path,
    *,
    given_mask: str | Path | None = None,
    labels: str | Path | None = None,
    template: Image | None = None,
    template_mask: np.ndarray | None = None,
    dilate_voxels: int = 1,
    lesion_mask: str | Path | None = None,
) -> Image:
    """Step 3: brain mask on the image's grid.

    Preference: a given mask; else the label map's foreground (dilated); else the template mask
    carried onto the scan (:func:`template_mask_on_scan`, the only option for a bare scan:
    deformed onto a T1-like scan and dilated like the labels, else affine and dilated 2 voxels).

    ``lesion_mask`` (the session's tumour or lesion mask, on any grid of the session: read
    through the scanner's coordinates) is added, dilated by ``dilate_voxels``: a tumour is brain,
    yet a mask found from a healthy template or a healthy parcellation can cut off its rim, and
    what lies outside the brain mask is zeroed by the preprocessing and can fall off the working
    grid (a glioblastoma collection's tumours did, and with them the tumour exclusion and the
    Jacobian volume check of every pair).
    """
    image = load_image(image_path)
    if given_mask:
        mask_img = to_ras(load_image(given_mask))
        mask = _on_grid(mask_img, image.grid) > 0.5
        source = "given"
    elif labels:
        lab = to_ras(load_image(labels, dtype=None))
        mask = ndimage.binary_dilation(_on_grid(lab, image.grid, "nearest") > 0, iterations=dilate_voxels)
        mask = ndimage.binary_fill_holes(mask)
        source = "labels"
    else:
        if template is None or template_mask is None:
            raise AtlasflowError(f"{image_path}: no brain mask, no labels and no template to derive one")
        mask, _ = template_brain(image, template, template_mask, dilate_voxels)
        source = "template"
    if lesion_mask:
        lesion = _on_grid(_binary(load_image(lesion_mask, dtype=None)), image.grid) > 0.5
        lesion = ndimage.binary_dilation(lesion, iterations=dilate_voxels)
        added = lesion & ~mask
        if added.any():
            volume = float(added.sum() * np.prod(image.grid.spacing)) / 1000.0
            print(f"{lesion_mask}: {volume:.1f} mL of the lesion added to the brain mask ({source})")
        mask = ndimage.binary_fill_holes(mask | lesion)
    if mask.sum() == 0:
        raise AtlasflowError(f"{image_path}: brain mask ({source}) is empty")
    out = image.with_data(mask.astype(np.uint8))
    save_image(out, out_path, dtype=np.uint8)
    return out


#: Instance-optimisation steps of the deformable step of :func:`template_mask_on_scan`.
TEMPLATE_MASK_REFINE_STEPS = 10
#: Thickest voxel (mm) of a scan whose template brain is deformed onto it; thicker slices keep the
#: affine mask. On 0.9 x 0.9 x 5 mm post-contrast T1 slabs (the glioblastoma collection with its
#: true voxel sizes) the deformation carried the template brain's edge out to the scalp on two
#: of five patients (both sessions), while the affine mask followed the brain.
TEMPLATE_MASK_MAX_DEFORM_MM = 4.0
#: A scan is T1-like when its white matter (where the T1w template is in its brightest quarter) is
#: brighter than its grey matter (the template's second quarter) by this ratio of medians. After
#: the affine alone, raw and uncorrected: 10 IXI T1w 1.16-1.35, open_ms T1W 1.14-1.19, FLAIR
#: 0.94-0.97, T2W 0.73-0.80. (A histogram rank correlation does not separate them: a FLAIR's dark
#: CSF agrees with a T1w's.)
T1_LIKE_WM_GM_RATIO = 1.05
#: Of the others, a scan is T2-like when its CSF (where the template is in its darkest tenth inside
#: the brain: ventricles and sulci) is at least this bright against its grey matter, else
#: FLAIR-like (CSF suppressed). Measured the same way: open_ms T2W 1.05-1.14, FLAIR 0.50-0.57.
T2_LIKE_CSF_GM_RATIO = 0.8
CONTRAST_CLASSES = ("T1-like", "T2-like", "FLAIR-like")


def contrast_class(template: Image, seen: np.ndarray, template_mask: np.ndarray) -> str | None:
    """Which of :data:`CONTRAST_CLASSES` ``seen`` (a scan on the T1w template's grid) shows, read
    from the order of its tissues: white matter against grey (:data:`T1_LIKE_WM_GM_RATIO`), then
    CSF against grey (:data:`T2_LIKE_CSF_GM_RATIO`). None when the brain shows nothing there (a
    failed alignment)."""
    inside = np.asarray(template_mask, bool)
    darkest, low, middle, high = np.percentile(template.data[inside], [10, 25, 50, 75])
    white = inside & (template.data >= high)
    grey = inside & (template.data >= low) & (template.data < middle)
    csf = inside & (template.data < darkest)
    if not white.any() or not grey.any() or not csf.any():
        return None
    grey_level = float(np.median(seen[grey]))
    if not grey_level > 0:
        return None
    if float(np.median(seen[white])) >= T1_LIKE_WM_GM_RATIO * grey_level:
        return "T1-like"
    if float(np.median(seen[csf])) >= T2_LIKE_CSF_GM_RATIO * grey_level:
        return "T2-like"
    return "FLAIR-like"


def template_mask_on_scan(
    image: Image, template: Image, template_mask: np.ndarray
) -> tuple[np.ndarray, bool, str | None]:
    """The template's brain mask carried onto ``image``'s grid (values in [0, 1]), whether a
    deformable registration carried it (else the affine alone), and the scan's contrast class
    read after the affine (:func:`contrast_class`).

    First the affine: the template (a skull-stripped brain) is the fixed image, so the similarity
    is measured inside its brain only, and the scan, whole head and neck included, moves: the
    engine's contrast-independent start (centres of mass, a rotation search, affine mutual
    information, :func:`atlasflow.registration.initial.initial_alignment`). Then, when the scan
    is T1-like there (:func:`contrast_class`), the deep engine deforms the template's brain
    onto the scan's (networks + :data:`TEMPLATE_MASK_REFINE_STEPS` of local-correlation
    refinement, inside the template brain and one voxel around it; the scan unmasked, as it
    comes) and the mask follows the inverse field. On the 10 whole-head IXI scans, against their
    labels dilated 1 voxel, the affine mask (dilated 2 voxels) scored Dice 0.85-0.94; the deformed
    one (dilated 1) 0.95-0.96, covering 96-98 % of the labelled brain, in ~2.5 s more per scan.
    Raw IXI pairs registered with such masks score 0.615 (the label maps' brains: 0.618, the
    engine's head masks: 0.562; benchmarks/results/register_raw_v2.md).
    A scan of another contrast (FLAIR, T2w) keeps the affine mask: local correlation across
    contrasts would pull the brain's edge to the wrong tissue.
    """
    from atlasflow.registration.initial import initial_alignment
    from atlasflow.registration.inputs import prepare
    from atlasflow.transforms import inverse_pull

    world = initial_alignment(prepare(template, template_mask), prepare(image))
    region = template.with_data(np.asarray(template_mask, np.float32))
    # ``world`` maps template points to scan points: the scan's intensities on the template.
    seen = apply_transform(image, Transform(world), template.grid, "linear").data
    contrast = contrast_class(template, seen, template_mask)
    if contrast == "T1-like" and float(image.grid.spacing.max()) <= TEMPLATE_MASK_MAX_DEFORM_MM:
        from atlasflow.registration.api import register

        reg = register(
            template,
            image,
            fixed_mask=ndimage.binary_dilation(template_mask, iterations=1),
            init_affine=world,
            refine_steps=TEMPLATE_MASK_REFINE_STEPS,
        )
        return (
            inverse_pull(region, reg.transform, reg.inverse_displacement, image.grid),
            True,
            contrast,
        )
    return inverse_pull(region, Transform(world), None, image.grid), False, contrast


def template_brain(
    image: Image, template: Image, template_mask: np.ndarray, dilate_voxels: int = 1
) -> tuple[np.ndarray, str | None]:
    """The brain mask of a bare scan (no labels, no mask): :func:`template_mask_on_scan`, dilated
    like a label map's when deformed, by 2 voxels when only the affine carried it (coarse at the
    brain's edge), holes filled. Boolean, on the scan's grid; with the scan's contrast class."""
    carried, deformed, contrast = template_mask_on_scan(image, template, template_mask)
    margin = dilate_voxels if deformed else max(dilate_voxels, 2)
    mask = ndimage.binary_fill_holes(ndimage.binary_dilation(carried > 0.5, iterations=margin))
    return mask, contrast


#: Brain volumes (mL) a found brain may have: adult brains with a margin are 1.0-2.0 L; infants
#: and a partial field of view go lower.
FOUND_BRAIN_ML = (300.0, 3000.0)


def implausible_brain(mask: np.ndarray, image: Image) -> str | None:
    """Why a brain found through the template cannot be this scan's (None when it can): its
    volume is not a brain's, or much of it lies where the scan shows nothing (a scan of
    something else, or a failed alignment)."""
    from atlasflow.registration.inputs import foreground_mask, normalise_intensities

    volume_ml = float(mask.sum()) * float(np.prod(image.grid.spacing)) / 1000.0
    low, high = FOUND_BRAIN_ML
    if not low <= volume_ml <= high:
        return f"found brain of {volume_ml:.0f} mL is outside {low:.0f}-{high:.0f} mL"
    head = foreground_mask(normalise_intensities(image.data), image.grid.spacing)
    inside = float((mask & head).sum()) / float(mask.sum())
    if inside < 0.9:
        return f"only {100 * inside:.0f} % of the found brain lies in the scan's foreground"
    return None


def _binary(image: Image) -> Image:
    """A label map or mask as 0/1 floats (any label > 0 is in), for linear resampling."""
    return image.with_data((np.asarray(image.data) > 0).astype(np.float32))


def _on_grid(image: Image, grid: Grid, interpolation: str = "linear") -> np.ndarray:
    if image.grid.same_as(grid):
        return image.data
    return apply_transform(image, Transform.identity(), grid, interpolation).data


def working_grid(image: Image, mask: np.ndarray, spacing: float, margin_mm: float = 10.0) -> Grid:
    """RAS grid with isotropic ``spacing`` covering the mask's bounding box plus a margin."""
    idx = np.argwhere(mask)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], float)
    lo, hi = idx.min(0), idx.max(0)
    box = lo + corners * (hi - lo)
    world = box @ image.affine[:3, :3].T + image.affine[:3, 3]
    wmin, wmax = world.min(0) - margin_mm, world.max(0) + margin_mm
    shape = tuple(int(np.ceil((wmax[i] - wmin[i]) / spacing)) + 1 for i in range(3))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = wmin
    return Grid(shape, affine)


def normalise_intensity(data: np.ndarray, mask: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Map the ``low``-``high`` percentiles inside the mask to [0, 1], clip, zero outside."""
    inside = data[mask]
    lo, hi = np.percentile(inside, [low, high])
    if hi <= lo:
        raise AtlasflowError("intensity range inside the brain mask is empty")
    out = np.clip((data - lo) / (hi - lo), 0, 1)
    return (out * mask).astype(np.float32)


def finalize(
    image_path: str | Path,
    mask_path: str | Path,
    out_image: str | Path,
    out_mask: str | Path,
    *,
    spacing: float = 2.0,
) -> Image:
    """Step 4: normalise intensities in the brain and resample image and mask to the working grid."""
    image = load_image(image_path)
    mask = load_image(mask_path).data > 0
    grid = working_grid(image, mask, spacing)
    try:
        norm = image.with_data(normalise_intensity(image.data, mask))
    except AtlasflowError as exc:
        raise AtlasflowError(f"{image_path}: {exc}") from None
    identity = Transform.identity()
    out = apply_transform(norm, identity, grid, "linear")
    out_m = apply_transform(image.with_data(mask.astype(np.uint8)), identity, grid, "nearest")
    out.data *= out_m.data > 0
    save_image(out, out_image, dtype=np.float32)
    save_image(out_m, out_mask, dtype=np.uint8)
    return out


def carry_labels(
    in_path: str | Path,
    reference_path: str | Path,
    out_path: str | Path,
    *,
    t1w_path: str | Path | None = None,
    contrast_grids: Sequence[tuple[str | Path, str | Path]] = (),
    lesion: bool = False,
) -> Image:
    """Resample a label map or mask (any orientation) onto a reference grid, nearest neighbour.

    A mask drawn on another contrast of the session (a lesion mask on the FLAIR) comes on that
    contrast's grid: when its grid is not the T1w's (``t1w_path``) but one of ``contrast_grids``
    (the contrast as given, its ``from-<contrast>_to-T1w`` transform), it is carried through that
    session alignment rather than through the scanner's coordinates, which a head movement
    between the two scans would leave off.

    With ``lesion`` (a tumour or lesion mask) most of its voxels must land on the reference grid
    (:data:`LESION_MIN_SHARE_ON_GRID`), else one error names the file: an empty tumour on the
    working grid would silently switch off the tumour exclusion and the volume checks.
    """
    transform = Transform.identity()
    if t1w_path is not None and not _same_grid(in_path, t1w_path):
        for image_path, affine_path in contrast_grids:
            if _same_grid(in_path, image_path):
                transform = Transform(read_itk_affine(affine_path))
                break
    labels = to_ras(load_image(in_path, dtype=None))
    reference = load_image(reference_path)
    if lesion:
        share = share_on_grid(labels, transform, reference.grid)
        if share < LESION_MIN_SHARE_ON_GRID:
            raise AtlasflowError(
                f"{in_path}: only {share:.0%} of the mask's voxels lie on the scan's working grid "
                f"({reference_path}, the brain found plus a margin): is it this session's mask, and "
                "do both headers give the true voxel sizes and positions?"
            )
    out = apply_transform(labels, transform, reference.grid, "nearest")
    save_image(out, out_path, dtype=_label_dtype(out.data))
    return out


#: Share of a tumour or lesion mask's voxels that must land on the working grid (see
#: :func:`carry_labels`); a mask at the brain's edge may lose a sliver, not half.
LESION_MIN_SHARE_ON_GRID = 0.5


def share_on_grid(labels: Image, transform: Transform, grid: Grid) -> float:
    """The share of ``labels``' voxels (> 0) whose centres fall inside ``grid`` once carried
    there (``transform``: grid world -> labels world, as :func:`carry_labels` samples); 1 for an
    empty map."""
    idx = np.argwhere(np.asarray(labels.data) > 0)
    if len(idx) == 0:
        return 1.0
    world = idx @ labels.affine[:3, :3].T + labels.affine[:3, 3]
    to_grid = np.linalg.inv(grid.affine) @ np.linalg.inv(transform.affine)
    vox = world @ to_grid[:3, :3].T + to_grid[:3, 3]
    inside = np.all((vox >= -0.5) & (vox <= np.array(grid.shape) - 0.5), axis=1)
    return float(inside.mean())


def _same_grid(a: str | Path, b: str | Path) -> bool:
    """Whether two files' headers describe one grid (shape and voxel-to-world map, 0.01 mm)."""
    first, second = load_header(a), load_header(b)
    return tuple(first.shape[:3]) == tuple(second.shape[:3]) and bool(
        np.allclose(first.affine, second.affine, atol=1e-2)
    )


def _label_dtype(data: np.ndarray) -> type:
    return np.uint8 if data.max() < 256 and data.min() >= 0 else np.int32
