"""Label maps and masks of a BIDS folder's ``derivatives/<pipeline>/sub-*/[ses-*/]anat/`` folders.

BIDS puts what a pipeline (or a rater) made from the raw scans under ``derivatives/<pipeline>/``:
label maps (``_dseg``), brain masks (``desc-brain_mask``, ``label-brain_mask``) and tumour or
lesion masks (``label-tumor_mask``, ``label-lesion_mask``, or the same as ``desc-``).
:func:`find_derivatives` lists them per subject and session as
:class:`~atlasflow.cohort.selection.Candidate` files, for :mod:`atlasflow.cohort.bids` to weigh
against the files in raw ``anat/``. Only files on the scan's grid are taken: no ``space-`` entity or
``space-orig``; a file in another space (``space-MNI152NLin2009cAsym``) is listed as skipped.
Scans in ``derivatives/`` (``desc-preproc_T1w``) are pipeline outputs, not inputs, and are not looked at.
Which pipelines are read, and in what order, is :class:`~atlasflow.cohort.selection.BidsOptions`'s
``derivatives`` (default: every folder under ``derivatives/``, in name order).
"""

from __future__ import annotations

import os
from pathlib import Path

from atlasflow.cohort.selection import (
    DERIVED_ROLES,
    BidsOptions,
    Candidate,
    CohortNotes,
    not_an_input,
    parse_name,
    role_of,
)

#: (subject, session or None) -> role -> files, in precedence order (pipeline order, then name).
Derived = dict[tuple[str, str | None], dict[str, list[Candidate]]]


def is_folder(entry: os.DirEntry) -> bool | None:
    """Whether a directory entry is a folder (following links); None for a link loop or another
    entry that cannot be looked at (``Too many levels of symbolic links``)."""
    try:
        return entry.is_dir()
    except OSError:
        return None


def folders(path: Path) -> list[str]:
    """Names of the folders in ``path``, sorted; entries that cannot be looked at are left out."""
    try:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries if is_folder(e))
    except OSError:
        return []


def find_derivatives(root: Path, options: BidsOptions, notes: CohortNotes) -> Derived:
    """The label maps and masks of ``root/derivatives/<pipeline>/`` (see the module docstring).

    Files in another space, or whose name disagrees with its folder, are listed in
    ``notes.skipped`` with the reason; a pipeline named in ``options.derivatives`` that is not
    there too.
    """
    base = root / "derivatives"
    if options.derivatives == ():
        return {}
    names = folders(base) if options.derivatives is None else list(options.derivatives)
    found: Derived = {}
    for pipeline in names:
        folder = base / pipeline
        if not folder.is_dir():
            notes.skipped.append(
                (f"derivatives/{pipeline}", "named in bids.derivatives but there is no such folder")
            )
            continue
        for child in folders(folder):
            if not child.startswith("sub-"):
                continue
            subject = child[4:]
            anats = [(None, folder / child / "anat")] + [
                (s[4:], folder / child / s / "anat")
                for s in folders(folder / child)
                if s.startswith("ses-")
            ]
            for session, anat in anats:
                if anat.is_dir():
                    _read_anat(anat, root, pipeline, subject, session, notes, found)
    return found


def _read_anat(
    anat: Path,
    root: Path,
    pipeline: str,
    subject: str,
    session: str | None,
    notes: CohortNotes,
    found: Derived,
) -> None:
    rel = anat.relative_to(root).as_posix()
    try:
        with os.scandir(anat) as entries:
            names = sorted(e.name for e in entries if is_folder(e) is False)
    except OSError:
        return
    for name in names:
        parsed = parse_name(name)
        if parsed is None:
            continue
        entities, suffix = parsed
        role = role_of(entities, suffix)
        if role not in DERIVED_ROLES:
            continue
        path = f"{rel}/{name}"
        reason = not_an_input(entities, suffix)
        if reason is None and (entities.get("sub") != subject or entities.get("ses") != session):
            where = f"sub-{subject}" + ("" if session is None else f"/ses-{session}")
            reason = f"the file name's sub/ses entities do not match its folder ({where})"
        if reason is not None:
            notes.skipped.append((path, reason))
            continue
        found.setdefault((subject, session), {}).setdefault(role, []).append(
            Candidate(path, entities, suffix, source=pipeline)
        )
