"""The atlas label map: the majority vote of the members' labels in atlas space, with probability
maps, and the leave-one-out consistency that scores it.

Both stream over the label maps (one in memory at a time): memory grows with the number of
labels, not of members.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from atlasflow.errors import AtlasflowError
from atlasflow.io.atomic import atomic_write_text
from atlasflow.io.images import Image, load_image, save_image


def _label_counts(label_paths: Sequence[str | Path]) -> tuple[Image, dict[int, np.ndarray]]:
    """Per label, how many of the maps hold it at each voxel; one map in memory at a time."""
    counts: dict[int, np.ndarray] = {}
    first: Image | None = None
    for path in label_paths:
        labels = load_image(path, dtype=None)
        if first is None:
            first = labels
        elif not labels.grid.same_as(first.grid):
            raise AtlasflowError(f"{path}: grid differs from {label_paths[0]}; cannot vote")
        data = labels.data.astype(np.int64)
        for value in np.unique(data):
            counts.setdefault(int(value), np.zeros(data.shape, np.uint16))
            counts[int(value)] += data == value
    if first is None:
        raise AtlasflowError("no label maps to vote")
    return first, counts


def _majority(
    counts: dict[int, np.ndarray], shape: tuple[int, ...], exclude: np.ndarray | None = None
) -> np.ndarray:
    """Label with the most votes at each voxel (ties to the lower label); ``exclude``: one map's
    own votes taken out (leave-one-out)."""
    best = np.zeros(shape, np.int32)
    vote = np.zeros(shape, np.int32)
    for value in sorted(counts):
        c = (
            counts[value]
            if exclude is None
            else counts[value].astype(np.int32) - (exclude == value)
        )
        better = c > best
        vote[better] = value
        best[better] = c[better]
    return vote


def label_vote(
    label_paths: Sequence[str | Path], out_dseg: str | Path, out_probseg: str | Path | None = None
) -> tuple[Image, dict[int, np.ndarray]]:
    """Majority vote of label maps on one grid (streamed), with per-label probability maps.

    Memory holds one count array per label, whatever the number of maps. Probability maps are
    written as one 4-D NIfTI (last axis = label, in the order of the TSV written beside it) when
    ``out_probseg`` is given: the vote counts, stored as integers with the scale factor 1 / number
    of maps, so readers get the exact fractions from a quarter of float32's bytes.
    """
    first, counts = _label_counts(label_paths)
    values = sorted(counts)
    vote = _majority(counts, first.data.shape)
    n = len(label_paths)
    out = first.with_data(
        vote.astype(np.uint8 if max(values) < 256 and min(values) >= 0 else np.int32)
    )
    save_image(out, out_dseg)
    if out_probseg is not None:
        foreground = [v for v in values if v != 0]
        # Filled in place (stacking per-label arrays would hold them twice), in Fortran order:
        # each label's volume is then one block, and NIfTI's own order, written without a copy.
        prob = np.empty(
            (*vote.shape, len(foreground)), np.uint8 if n < 256 else np.uint16, order="F"
        )
        for i, v in enumerate(foreground):
            prob[..., i] = counts[v]
        save_image(Image(prob, first.affine), out_probseg, slope=1.0 / n)
        atomic_write_text(
            Path(str(out_probseg).replace(".nii.gz", ".tsv")),
            "index\tlabel\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(foreground)),
        )
    return out, {v: counts[v] for v in values}


def dice_mean(a: np.ndarray, b: np.ndarray) -> float:
    labels = np.intersect1d(np.unique(a), np.unique(b))
    labels = labels[labels != 0]
    if not len(labels):
        return 0.0
    return float(
        np.mean(
            [2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in labels]
        )
    )


def leave_one_out_consistency(label_paths: Sequence[str | Path]) -> list[float]:
    """For every subject: Dice of its atlas-space labels with the vote of all the others.

    Two streaming passes (the counts, then each map against the counts without it), so memory
    does not grow with the number of maps.
    """
    first, counts = _label_counts(label_paths)
    scores = []
    for path in label_paths:
        m = load_image(path, dtype=None).data.astype(np.int32)
        scores.append(dice_mean(m, _majority(counts, first.data.shape, exclude=m)))
    return scores
