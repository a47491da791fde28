"""Glue between the Snakemake workflow and the package: the cohort table the rules are built from.

The Snakefile calls :func:`resolve_cohort` once at parse time; it either validates the user's
manifest / BIDS folder (raising :class:`AtlasflowError` before any job runs) or describes the demo
cohort that the ``demo_data`` rule will generate.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from atlasflow.cohort.columns import (
    IMAGE_COLUMNS,
    known_columns,
    optional_columns,
)
from atlasflow.cohort.selection import BidsOptions, CohortNotes

#: The registration weights shipped with the package: deep.DEFAULT_MODEL, spelled here so that the
#: Snakefile can name it without importing torch (tests/test_provenance.py checks they agree).
SHIPPED_MODEL = (
    Path(__file__).resolve().parents[1] / "models" / "atlasflow_synthmorph_2mm.safetensors"
)


def _normalise(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    for column in optional_columns():
        if column not in table:
            table[column] = ""
    for column in known_columns():
        table[column] = table[column].fillna("").astype(str)
    return table.reset_index(drop=True)


def resolve_cohort(
    config: dict,
    workdir: Path | None = None,
    check_data: bool = True,
    notes: CohortNotes | None = None,
) -> pd.DataFrame:
    """The cohort as a table with string columns subject, session, the scans and the optional ones
    (every row has the reference scan of ``contrasts.reference``, the T1w by default).

    Paths are absolute for a user cohort; for the demo cohort they are the files the ``demo_data``
    rule writes (relative to the working directory, as Snakemake expects for outputs).
    ``check_data`` reads the voxels too (NaN, constant, truncated files, tumour masks holding values
    that ``longitudinal.tumor_labels`` does not name); jobs spawned by Snakemake skip it since the
    main process already did it. A BIDS folder is read under the config's ``bids`` section; its
    skipped inputs and choices go to ``notes`` when given.
    """
    from atlasflow.cohort.manifest import choose_reference

    cohort = config.get("cohort")
    if cohort is None:
        from atlasflow.synth.plan import DEMO_CONTRASTS, demo_manifest

        demo = config["demo"]
        table = demo_manifest(
            seed=demo["seed"],
            n_cross=demo["n_cross"],
            n_long=demo["n_long"],
            n_timepoints=demo["n_timepoints"],
            contrasts=demo.get("contrasts", DEMO_CONTRASTS),
            # auto: the T1w (the demo has T1w scans)
            reference=choose_reference(None, (config.get("contrasts") or {}).get("reference"))[0],
        )
        table = _normalise(table)
        for column in IMAGE_COLUMNS:
            table[column] = [f"{demo['dir']}/{v}" if v else "" for v in table[column]]
        return table
    from atlasflow.cohort.manifest import load_cohort
    from atlasflow.cohort.validate import validate_cohort
    from atlasflow.longitudinal.compartments import TumourLabels

    source = cohort_source(config, workdir)
    notes = CohortNotes() if notes is None else notes
    labels = TumourLabels.of((config.get("longitudinal") or {}).get("tumor_labels"))
    reference, _ = choose_reference(source, (config.get("contrasts") or {}).get("reference"))
    options = replace(BidsOptions.from_config(config), reference=reference)
    table = load_cohort(source, notes, options, reference)
    table = validate_cohort(
        table, source, check_data=check_data, notes=notes, tumor_labels=labels, reference=reference
    )
    return _normalise(table)


def cohort_source(config: dict, workdir: Path | None = None) -> Path | None:
    """The manifest CSV or BIDS folder of ``config`` (None: the demo cohort).

    A relative path is taken from the working directory, else from ``workdir`` (the workflow's).
    """
    if config.get("cohort") is None:
        return None
    source = Path(config["cohort"])
    if not source.is_absolute() and workdir is not None and not source.exists():
        source = Path(workdir) / source
    return source


def session_order(table: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted per subject by acquisition date (session label where dates are missing)."""
    table = table.copy()
    table["_date"] = pd.to_datetime(table["acq_date"].replace("", None), errors="coerce")
    table = table.sort_values(["subject", "_date", "session"], na_position="last", kind="stable")
    return table.drop(columns="_date")


def baselines(table: pd.DataFrame) -> pd.DataFrame:
    """The first session of every subject."""
    return session_order(table).groupby("subject", sort=True).head(1)


def atlas_members(table: pd.DataFrame, min_subjects: int = 2) -> list[tuple[str, str]]:
    """Scans the atlas is built from: each subject's baseline, tumour-free subjects first.

    A tumour has no counterpart in other brains, so subjects with a tumour mask only join the
    atlas when there are too few tumour-free subjects to reach ``min_subjects``.
    """
    base = baselines(table)
    clean = base[base["tumor_mask"] == ""]
    chosen = clean if len(clean) >= min_subjects else base
    if len(chosen) < min_subjects:
        from atlasflow.errors import AtlasflowError

        raise AtlasflowError(
            f"the atlas needs at least {min_subjects} subjects (atlas.min_subjects); the cohort has {len(chosen)}"
        )
    return list(zip(chosen["subject"], chosen["session"], strict=True))
