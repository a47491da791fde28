"""The demo cohort's plan: subjects, sessions, acquisition dates, file names and random streams.

Owns everything about the demo cohort that needs no image: its argument checks, the per-subject
random streams, the subject plan and :func:`demo_manifest` (the manifest :func:`make_demo_cohort
<atlasflow.synth.demo.make_demo_cohort>` writes). Torch-free, so cohort planning can read the demo
manifest cheaply.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from atlasflow import layout
from atlasflow.cohort.columns import CONTRAST_COLUMNS, known_columns
from atlasflow.errors import AtlasflowError

#: The demo manifest's columns: the cohort table's (atlasflow.cohort.columns), in its order, but
#: brain_mask: the demo gives none (preprocessing derives the masks from the label maps).
MANIFEST_COLUMNS = tuple(c for c in known_columns() if c != "brain_mask")
# Header orientations cycled over subjects (same image in world space, different voxel order), so
# preprocessing's reorientation always has work to do; PSR is how the IXI scans are stored.
ORIENTATIONS = ("RAS", "LPS", "PSR", "LAS")
#: The contrasts the demo can write beside every T1w (cohort columns; their appearance is in
#: :data:`atlasflow.synth.contrasts.APPEARANCES`), and those it writes unless told otherwise
#: (config ``demo.contrasts``).
SYNTH_CONTRASTS = ("t2w", "flair")
DEMO_CONTRASTS = SYNTH_CONTRASTS

# Random streams, one per (seed, subject, purpose): the manifest (acquisition dates) can then be
# produced without generating any image, and a subject's draws do not depend on the others (only
# the controls' velocity fields are centred on their group's mean).
STREAM_ANATOMY = 0
STREAM_DATES = 1
STREAM_TUMOUR = 2
STREAM_CONTRAST = 3  # with the session and the contrast: see contrast_rng
STREAM_SCAN = 10  # + session number


def subject_rng(seed: int, subject_index: int, stream: int) -> np.random.Generator:
    """The random stream ``stream`` of subject ``subject_index`` for the cohort seed ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([seed, subject_index, stream]))


def contrast_rng(
    seed: int, subject_index: int, session_index: int, column: str
) -> np.random.Generator:
    """The stream of one session's scan of contrast ``column`` (its pose, grid, scanner, noise).

    Apart from every T1w stream, so the T1w files of a seed are the same with or without other
    contrasts, and each contrast's draws do not depend on which others are written. (The last two
    words are >= 1: numpy's SeedSequence pads short entropy with zeros, so a trailing 0 could
    collide with a shorter key.)
    """
    key = [seed, subject_index, STREAM_CONTRAST, session_index + 1]
    return np.random.default_rng(np.random.SeedSequence([*key, CONTRAST_COLUMNS.index(column) + 1]))


@dataclass
class SubjectPlan:
    index: int
    subject: str
    group: str
    sessions: list[str]
    dates: list[dt.date]
    orientation: str

    @property
    def longitudinal(self) -> bool:
        return self.group == "tumour"


def check_arguments(
    seed: int,
    n_cross: int,
    n_long: int,
    n_timepoints: int,
    spacing_mm: float,
    contrasts: Sequence[str] = DEMO_CONTRASTS,
) -> None:
    """Raise AtlasflowError naming the first argument of the demo cohort out of range."""
    unknown = [c for c in contrasts if c not in SYNTH_CONTRASTS]
    if unknown or len(set(contrasts)) != len(contrasts):
        raise AtlasflowError(
            f"demo cohort: contrasts must be distinct names out of {list(SYNTH_CONTRASTS)}, "
            f"got {list(contrasts)}"
        )
    if seed < 0:
        raise AtlasflowError(f"demo cohort: seed must be >= 0, got {seed}")
    if n_cross < 0 or n_long < 0 or n_cross + n_long < 1:
        raise AtlasflowError(
            f"demo cohort: need at least one subject (n_cross={n_cross}, n_long={n_long})"
        )
    if n_long > 0 and n_timepoints < 2:
        raise AtlasflowError(
            f"demo cohort: longitudinal subjects need n_timepoints >= 2, got {n_timepoints}"
        )
    if not 0.5 <= spacing_mm <= 10.0:
        raise AtlasflowError(f"demo cohort: spacing_mm must lie in [0.5, 10] mm, got {spacing_mm}")


def plan_cohort(seed: int, n_cross: int, n_long: int, n_timepoints: int) -> list[SubjectPlan]:
    """Subjects, sessions and acquisition dates (controls first, then tumour subjects)."""
    total = n_cross + n_long
    width = max(2, len(str(total)))
    plans = []
    for index in range(total):
        longitudinal = index >= n_cross
        n_sessions = n_timepoints if longitudinal else 1
        rng = subject_rng(seed, index, STREAM_DATES)
        baseline = dt.date(2016, 1, 1) + dt.timedelta(days=int(rng.integers(0, 6 * 365)))
        dates = [baseline]
        for _ in range(n_sessions - 1):
            dates.append(dates[-1] + dt.timedelta(days=int(rng.integers(60, 121))))
        plans.append(
            SubjectPlan(
                index=index,
                subject=f"{index + 1:0{width}d}",
                group="tumour" if longitudinal else "control",
                sessions=[str(s + 1) for s in range(n_sessions)],
                dates=dates,
                orientation=ORIENTATIONS[index % len(ORIENTATIONS)],
            )
        )
    return plans


def anat_path(subject: str, session: str, suffix: str) -> str:
    """A scan's path relative to the cohort folder."""
    return f"sub-{subject}/ses-{session}/anat/sub-{subject}_ses-{session}_{suffix}.nii.gz"


def contrast_path(subject: str, session: str, column: str) -> str:
    """A contrast's scan path relative to the cohort folder (named as :mod:`atlasflow.layout` does:
    ``..._FLAIR.nii.gz``, ``..._ce-gadolinium_T1w.nii.gz``)."""
    suffix, entities = layout.CONTRASTS[column]
    return anat_path(subject, session, layout.name_tail(suffix, **entities))


def truth_prefix(subject: str, session: str) -> str:
    """Start of the truth files' paths of one session, relative to the cohort folder."""
    return f"truth/sub-{subject}/ses-{session}/sub-{subject}_ses-{session}"


def demo_manifest(
    seed: int = 0,
    n_cross: int = 8,
    n_long: int = 3,
    n_timepoints: int = 3,
    contrasts: Sequence[str] = DEMO_CONTRASTS,
    reference: str = "t1w",
) -> pd.DataFrame:
    """The manifest :func:`~atlasflow.synth.demo.make_demo_cohort` writes, computed without
    generating any image.

    Paths are relative to the cohort folder; cells that do not apply (and the columns of contrasts
    not in ``contrasts``) are empty strings. With another ``reference`` than the T1w (config
    ``contrasts.reference``), the label maps are the truth's ``space-<C>_dseg`` of that contrast,
    on its grid, as the workflow then needs them.
    """
    check_arguments(seed, n_cross, n_long, n_timepoints, 2.0, contrasts)
    rows = []
    for plan in plan_cohort(seed, n_cross, n_long, n_timepoints):
        for session, date in zip(plan.sessions, plan.dates, strict=True):
            rows.append(
                {
                    "subject": plan.subject,
                    "session": session,
                    "t1w": anat_path(plan.subject, session, "T1w"),
                    "labels": anat_path(plan.subject, session, "dseg")
                    if reference == "t1w" or reference not in contrasts
                    else f"{truth_prefix(plan.subject, session)}_space-"
                    f"{layout.CONTRASTS[reference][0]}_dseg.nii.gz",
                    "tumor_mask": anat_path(plan.subject, session, "label-tumor_mask")
                    if plan.longitudinal
                    else "",
                    "acq_date": date.isoformat(),
                    "group": plan.group,
                    **{
                        c: contrast_path(plan.subject, session, c) if c in contrasts else ""
                        for c in CONTRAST_COLUMNS
                    },
                }
            )
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
