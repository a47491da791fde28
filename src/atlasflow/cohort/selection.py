"""BIDS file names and the rule that takes one file per session and role among several.

A session of a BIDS dataset in the wild may hold several T1w scans (``run-``, ``acq-``, ``rec-``,
``part-``, ``chunk-``, ``echo-`` entities), several label maps or masks, and files that are not raw
scans at all. atlasflow takes one file per session and role (manifest column); the rule, set by
:class:`BidsOptions` (config ``bids:``, ``atlasflow validate --prefer/--choose``), is:

1. never an input (listed as skipped with the reason, :func:`not_an_input`): a scan with a
   ``space-`` or ``desc-`` entity (an fMRIPrep-style derivative in raw ``anat/``), a label map or
   mask in a space other than the scan's (``space-`` other than ``orig``), a ``part-`` other than
   ``mag`` (phase, real, imaginary images);
2. ``prefer`` (default ``rec-norm``, ``part-mag``): ``entity-value`` items, most wanted first; a
   file matching an earlier item wins (values compared without regard to case);
3. then the plainest name: fewest entities besides ``run-`` (``sub-01_T1w`` over
   ``sub-01_acq-fast_T1w``);
4. then the first acquisition by name (its name without ``run-``, numbers in numeric order);
5. then ``choose`` among the runs of that acquisition: ``last-run`` (default; a scan is repeated
   because the first try was bad, so the highest ``run-`` is the one to keep; no ``run-`` counts
   as the first), ``first-run``; or ``error``: no choice at all, a session whose files step 2 does
   not settle is a problem listing them.

Every choice among several files is kept as a :class:`Choice` (which file, which were passed over
and why) for the validation summary and the provenance record. :class:`CohortNotes` collects what
discovery found besides the table: skipped inputs, choices, problems.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

CHOOSE = ("last-run", "first-run", "error")
DEFAULT_PREFER = ("rec-norm", "part-mag")
_PREFER_ITEM = re.compile(r"[A-Za-z0-9]+-[A-Za-z0-9]+")
_NIFTI_NAME = re.compile(r"(?P<stem>[^/]+?)\.nii(?:\.gz)?")

#: BIDS suffixes of the other contrasts of a session (a ``ce-`` T1w is the ``t1ce`` one).
CONTRAST_SUFFIXES = {"T2w": "t2w", "FLAIR": "flair", "PDw": "pdw"}
#: Suffixes of scans (as opposed to label maps and masks).
SCAN_SUFFIXES = ("T1w", *CONTRAST_SUFFIXES)
#: Roles a ``derivatives/`` pipeline may provide: label maps and masks, never scans.
DERIVED_ROLES = ("labels", "tumor_mask", "brain_mask")
_TUMOUR_LABELS = ("tumor", "tumour", "lesion")


@dataclass(frozen=True)
class BidsOptions:
    """How a BIDS folder becomes a cohort table (config ``bids:``).

    ``derivatives``: pipeline folders under ``derivatives/`` whose label maps and masks are read,
    in precedence order; None reads every pipeline folder (in name order), () none.
    ``derivatives_first``: a pipeline's file wins over one in raw ``anat/`` (default: raw wins).
    ``reference``: the role every session must have to be a row (config ``contrasts.reference``,
    the T1w by default).
    """

    prefer: tuple[str, ...] = DEFAULT_PREFER
    choose: str = "last-run"
    derivatives: tuple[str, ...] | None = None
    derivatives_first: bool = False
    reference: str = "t1w"

    def __post_init__(self) -> None:
        from atlasflow.errors import AtlasflowError

        if self.choose not in CHOOSE:
            raise AtlasflowError(
                f"bids.choose must be one of {', '.join(CHOOSE)}, not {self.choose!r}"
            )
        for item in self.prefer:
            if not _PREFER_ITEM.fullmatch(item):
                raise AtlasflowError(
                    f"bids.prefer item {item!r} is not an entity-value pair such as rec-norm"
                )

    @classmethod
    def from_config(cls, config: Mapping | None) -> BidsOptions:
        """The options of a workflow config (its ``bids`` section and ``contrasts.reference``;
        defaults where absent)."""
        section = dict((config or {}).get("bids") or {})
        derivatives = section.get("derivatives")
        contrasts = (config or {}).get("contrasts") or {}
        return cls(
            prefer=tuple(section.get("prefer", DEFAULT_PREFER)),
            choose=section.get("choose", "last-run"),
            derivatives=None if derivatives is None else tuple(derivatives),
            derivatives_first=bool(section.get("derivatives_first", False)),
            reference=contrasts.get("reference") or "t1w",
        )


@dataclass(frozen=True)
class Candidate:
    """A file that may fill a role of a session: its path (relative to the BIDS root), entities,
    suffix and source (``anat`` or the name of a ``derivatives/`` pipeline)."""

    path: str
    entities: Mapping[str, str]
    suffix: str
    source: str = "anat"

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]


@dataclass(frozen=True)
class Choice:
    """One file taken for a role of a session among several, and the others with why not."""

    folder: str
    role: str
    chosen: str
    passed_over: tuple[tuple[str, str], ...]

    def line(self) -> str:
        others = "; ".join(f"{path} ({why})" for path, why in self.passed_over)
        return f"{self.role} of {self.folder}: took {self.chosen}, passed over {others}"

    def as_dict(self) -> dict:
        return {
            "folder": self.folder,
            "role": self.role,
            "chosen": self.chosen,
            "passed_over": [{"path": p, "reason": r} for p, r in self.passed_over],
        }


@dataclass
class CohortNotes:
    """What reading a cohort found besides its table: inputs skipped (path relative to the cohort
    folder, reason), choices among several files, problems (one line each) that
    :func:`atlasflow.cohort.validate.validate_cohort` reports together with its own, and the rows
    (their origin) without a session that validation gave one because other scans of the cohort
    have sessions (:func:`atlasflow.cohort.columns.fill_mixed_sessions`)."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    sessions_filled: list[str] = field(default_factory=list)

    def sessions_filled_line(self) -> str:
        """What was done to the scans without a session of a mixed cohort ("" when nothing)."""
        from atlasflow.cohort.columns import MIXED_COHORT_SESSION

        n = len(self.sessions_filled)
        if not n:
            return ""
        return (
            f"{n} scan{'s' if n != 1 else ''} without a session named ses-{MIXED_COHORT_SESSION} "
            f"(e.g. {self.sessions_filled[0]}): the cohort mixes scans with and without sessions, "
            "so every output has a ses- level"
        )

    def skipped_rows(self) -> list[tuple[str, str, str]]:
        """(path, status, reason) of every input not used: ``skipped`` or ``passed-over``."""
        rows = [(path, "skipped", reason) for path, reason in self.skipped]
        for choice in self.choices:
            rows += [(path, "passed-over", why) for path, why in choice.passed_over]
        return rows


def parse_name(filename: str) -> tuple[dict[str, str], str] | None:
    """('sub-01_ses-2_T1w.nii.gz') -> ({'sub': '01', 'ses': '2'}, 'T1w'); None if not BIDS-like."""
    match = _NIFTI_NAME.fullmatch(filename)
    if not match:
        return None
    *pairs, suffix = match["stem"].split("_")
    entities: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep or not key or not value:
            return None
        entities[key] = value
    return entities, suffix


def role_of(entities: Mapping[str, str], suffix: str) -> str | None:
    """The manifest column a BIDS file fills (None: not one atlasflow reads)."""
    if suffix == "T1w":
        return "t1ce" if "ce" in entities else "t1w"
    if suffix in CONTRAST_SUFFIXES:
        return CONTRAST_SUFFIXES[suffix]
    if suffix == "dseg":
        return "labels"
    if suffix == "mask":
        names = (entities.get("label", "").lower(), entities.get("desc", "").lower())
        if any(n in _TUMOUR_LABELS for n in names):
            return "tumor_mask"
        if "brain" in names:
            return "brain_mask"
    return None


def not_an_input(entities: Mapping[str, str], suffix: str) -> str | None:
    """Why a file of a role is never taken (None: it may be)."""
    space = entities.get("space")
    if suffix in SCAN_SUFFIXES and (space is not None or "desc" in entities):
        entity = f"space-{space}" if space is not None else f"desc-{entities['desc']}"
        return f"a derivative ({entity}), not a raw scan"
    if space is not None and space.lower() != "orig":
        return f"in space-{space}, not on the scan's grid (space-orig or no space- entity needed)"
    part = entities.get("part")
    if part is not None and part.lower() != "mag":
        return f"part-{part} image; only magnitude (part-mag) images are scans"
    return None


def _natural(text: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text))


def _run(candidate: Candidate) -> int:
    value = candidate.entities.get("run", "")
    return int(value) if value.isdigit() else 0


def _acquisition(candidate: Candidate) -> str:
    """The file name without its run- entity."""
    return (
        "_".join(f"{k}-{v}" for k, v in candidate.entities.items() if k != "run")
        + f"_{candidate.suffix}"
    )


def _matches(candidate: Candidate, item: str) -> bool:
    key, _, value = item.partition("-")
    return candidate.entities.get(key, "").lower() == value.lower()


def choose(
    candidates: Sequence[Candidate], options: BidsOptions
) -> tuple[Candidate, list[tuple[Candidate, str]]] | None:
    """The file taken among ``candidates`` (non-empty) and each other one with why it was not.

    None when ``options.choose`` is ``error`` and the preferences leave more than one file.
    """

    def preference(c: Candidate) -> tuple[int, ...]:
        return tuple(0 if _matches(c, item) else 1 for item in options.prefer)

    best = min(preference(c) for c in candidates)
    tied = [c for c in candidates if preference(c) == best]
    if len(tied) > 1 and options.choose == "error":
        return None
    sign = -1 if options.choose == "last-run" else 1

    def key(c: Candidate) -> tuple:
        rest = [k for k in c.entities if k not in ("sub", "ses", "run")]
        return (preference(c), len(rest), _natural(_acquisition(c)), sign * _run(c), c.name)

    ordered = sorted(candidates, key=key)
    chosen = ordered[0]
    return chosen, [(c, _why_not(c, chosen, key, options)) for c in ordered[1:]]


def _why_not(c: Candidate, chosen: Candidate, key, options: BidsOptions) -> str:
    mine, theirs = key(c), key(chosen)
    if mine[0] != theirs[0]:
        item = options.prefer[
            next(i for i, (a, b) in enumerate(zip(mine[0], theirs[0], strict=True)) if a != b)
        ]
        return f"not {item} (bids.prefer)"
    if mine[1] != theirs[1]:
        return "more entities than the file taken (the plainest name is taken)"
    if mine[2] != theirs[2]:
        return "another acquisition; the first by name is taken (bids.prefer, e.g. acq-<label>, chooses)"
    if mine[3] != theirs[3]:
        which = "highest" if options.choose == "last-run" else "lowest"
        run = c.entities.get("run", "none")
        return f"run {run}; bids.choose {options.choose} takes the {which} run"
    return "same entities; the first by name is taken"
