"""The demo cohort's tables: label table, participants, sessions, dataset description, truth.

Owns the text files :func:`~atlasflow.synth.demo.make_demo_cohort` writes beside the images
(``dseg.tsv``, ``participants.tsv``, ``sub-XX/sub-XX_sessions.tsv``,
``dataset_description.json``, ``truth/tumor_volumes.tsv``, ``truth/parameters.json``,
``truth/contrast_parameters.json``, ``truth/README.md``) and, last, ``manifest.csv``. The truth README is package data
(``assets/truth_README.md``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import pandas as pd

from atlasflow.io.atomic import atomic_write_text
from atlasflow.synth.plan import SubjectPlan, demo_manifest

# dseg label table (0 = background).
DSEG_LABELS = (
    (1, "CSF", "cerebrospinal fluid"),
    (2, "GM", "grey matter"),
    (3, "WM", "white matter"),
    (4, "TUM", "tumour"),
)
TUMOUR_LABEL = 4


def truth_readme() -> str:
    """The text written to ``truth/README.md``: what every truth file holds and how it was made."""
    return resources.files("atlasflow.synth").joinpath("assets/truth_README.md").read_text("utf-8")


def _tsv(frame: pd.DataFrame) -> str:
    return frame.to_csv(sep="\t", index=False, lineterminator="\n")


def write_tables(
    out_dir: Path,
    plans: list[SubjectPlan],
    seed: int,
    n_cross: int,
    n_long: int,
    n_timepoints: int,
    spacing_mm: float,
    parameters: dict,
    volume_rows: list[dict],
    contrasts: Sequence[str] = (),
    contrast_parameters: dict | None = None,
) -> None:
    """Write every text file of the cohort; the manifest last, so its presence means complete.

    Without ``contrasts`` the files are those of a T1w-only cohort (no contrast parameters, no
    mention of contrasts in the dataset description).
    """
    manifest = demo_manifest(seed, n_cross, n_long, n_timepoints, contrasts)
    atomic_write_text(
        out_dir / "dseg.tsv",
        _tsv(
            pd.DataFrame(
                [{"index": i, "name": name, "abbreviation": abbr} for i, abbr, name in DSEG_LABELS]
            )
        ),
    )
    atomic_write_text(
        out_dir / "participants.tsv",
        _tsv(
            pd.DataFrame([{"participant_id": f"sub-{p.subject}", "group": p.group} for p in plans])
        ),
    )
    for plan in plans:
        sessions = pd.DataFrame(
            {
                "session_id": [f"ses-{s}" for s in plan.sessions],
                "acq_time": [d.isoformat() for d in plan.dates],
            }
        )
        atomic_write_text(
            out_dir / f"sub-{plan.subject}/sub-{plan.subject}_sessions.tsv", _tsv(sessions)
        )
    description = {
        "Name": "atlasflow demo cohort (synthetic, from the MNI152 2009 template shipped with nilearn)",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": [
            {
                "Name": "atlasflow.synth.demo.make_demo_cohort",
                "Description": f"seed={seed} n_cross={n_cross} n_long={n_long} "
                f"n_timepoints={n_timepoints} spacing_mm={spacing_mm}"
                + (f" contrasts={','.join(contrasts)}" if contrasts else ""),
            }
        ],
    }
    atomic_write_text(
        out_dir / "dataset_description.json", json.dumps(description, indent=2) + "\n"
    )
    volumes = pd.DataFrame(
        volume_rows,
        columns=[
            "subject",
            "session",
            "acq_date",
            "days",
            "volume_mm3",
            "volume_change_mm3",
            "true_volume_mm3",
            "true_volume_change_mm3",
        ],
    )
    atomic_write_text(out_dir / "truth/tumor_volumes.tsv", _tsv(volumes))
    atomic_write_text(
        out_dir / "truth/parameters.json", json.dumps(parameters, indent=1, sort_keys=True) + "\n"
    )
    if contrasts:
        atomic_write_text(
            out_dir / "truth/contrast_parameters.json",
            json.dumps(contrast_parameters, indent=1, sort_keys=True) + "\n",
        )
    atomic_write_text(out_dir / "truth/README.md", truth_readme())
    # The manifest last: its presence means the cohort is complete.
    atomic_write_text(out_dir / "manifest.csv", manifest.to_csv(index=False, lineterminator="\n"))
