"""Multi-label tumour masks: compartment volumes, the response on the enhancing compartment, the
Jacobian-vs-mask volume check, and validation of the values a tumour mask may hold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import SCAN_AFFINE, SCAN_SHAPE, brain, head, write_manifest, write_nifti

from atlasflow.cli.main import main as cli_main
from atlasflow.cohort.images import clear_image_cache
from atlasflow.cohort.manifest import load_cohort
from atlasflow.cohort.validate import validate_cohort
from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Image, save_image
from atlasflow.longitudinal import change as lg
from atlasflow.longitudinal.compartments import (
    AGREEMENT_MIN_CHANGE_PCT,
    TumourLabels,
    jacobian_mask_check,
    mask_volumes,
)

# 2 mm voxels: 8 mm^3 each, so 125 voxels are exactly 1 ml.
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (30, 30, 30)


def labelled(path: Path, counts: dict[int, int], binary: bool = False) -> str:
    """A mask with ``counts[label]`` voxels of each label, in consecutive voxels (C order)."""
    flat = np.zeros(int(np.prod(SHAPE)), np.uint8)
    start = 1000
    for label, n in counts.items():
        flat[start : start + n] = 1 if binary else label
        start += n
    save_image(Image(flat.reshape(SHAPE), AFFINE), path, dtype=np.uint8)
    return str(path)


# Baseline: necrosis 1 ml, oedema 2 ml, enhancing 4 ml (label 4); follow-up: necrosis 1 ml,
# oedema 5 ml, enhancing 1 ml (label 3, the BraTS 2023 number): the whole tumour keeps its 7 ml
# while the enhancing tumour shrinks by 75 %.
BASELINE = {1: 125, 2: 250, 4: 500}
FOLLOWUP = {1: 125, 2: 625, 3: 125}


def sessions(tmp_path: Path, binary: bool = False) -> list[dict]:
    return [
        {
            "session": "1",
            "acq_date": "2020-01-01",
            "tumor_mask": labelled(tmp_path / "b.nii.gz", BASELINE, binary),
        },
        {
            "session": "2",
            "acq_date": "2020-03-01",
            "tumor_mask": labelled(tmp_path / "f.nii.gz", FOLLOWUP, binary),
        },
    ]


def test_compartment_volumes_are_exact(tmp_path):
    volumes = mask_volumes(labelled(tmp_path / "m.nii.gz", BASELINE), TumourLabels.of(None))
    assert volumes.whole_mm3 == 7000.0
    assert volumes.compartments_mm3 == {"necrosis": 1000.0, "oedema": 2000.0, "enhancing": 4000.0}
    assert volumes.multi_label
    binary = mask_volumes(labelled(tmp_path / "b.nii.gz", BASELINE, True), TumourLabels.of(None))
    assert binary.whole_mm3 == 7000.0 and not binary.multi_label


def test_table_has_compartment_volumes_and_judges_the_enhancing_tumour(tmp_path):
    table = lg.tumour_table(sessions(tmp_path))
    base, follow = table.iloc[0], table.iloc[1]
    # The whole tumour (any non-zero label) is unchanged ...
    assert base["volume_mm3"] == follow["volume_mm3"] == 7000.0
    assert follow["change_from_baseline_pct"] == 0.0
    # ... compartments in ml, with their changes ...
    assert [base[f"{c}_volume_ml"] for c in ("necrosis", "oedema", "enhancing")] == [1, 2, 4]
    assert [follow[f"{c}_volume_ml"] for c in ("necrosis", "oedema", "enhancing")] == [1, 5, 1]
    assert follow["oedema_change_from_baseline_ml"] == 3.0
    assert follow["oedema_change_from_baseline_pct"] == 150.0
    assert follow["enhancing_change_from_baseline_ml"] == -3.0
    assert follow["enhancing_change_from_baseline_pct"] == -75.0
    # ... and the response is read on the enhancing tumour: -75 % is a partial response.
    assert list(table["response_compartment"]) == ["enhancing", "enhancing"]
    assert follow["response_change_pct"] == -75.0
    assert list(table["response"]) == ["baseline", "partial_response"]


def test_binary_masks_keep_the_whole_tumour_response(tmp_path):
    table = lg.tumour_table(sessions(tmp_path, binary=True))
    assert list(table["volume_mm3"]) == [7000.0, 7000.0]
    assert list(table["response_compartment"]) == ["whole", "whole"]
    assert list(table["response"]) == ["baseline", "stable"]
    assert table["enhancing_volume_ml"].isna().all()  # no compartments in a binary mask


def test_no_enhancing_tumour_at_baseline_judges_the_whole_mask(tmp_path):
    rows = sessions(tmp_path)
    rows[0]["tumor_mask"] = labelled(tmp_path / "b2.nii.gz", {1: 125, 2: 250})
    rows[1]["tumor_mask"] = labelled(tmp_path / "f2.nii.gz", {1: 125, 2: 500})  # +100 % whole
    table = lg.tumour_table(rows)
    assert list(table["response_compartment"]) == ["whole", "whole"]
    assert table.loc[1, "response"] == "progression"
    assert table.loc[1, "enhancing_volume_ml"] == 0.0


def test_configured_labels_name_the_columns(tmp_path):
    labels = TumourLabels.of({"core": [1, 4], "oedema": [2]})
    table = lg.tumour_table(sessions(tmp_path), labels)
    assert table.loc[0, "core_volume_ml"] == 5.0 and table.loc[1, "core_volume_ml"] == 1.0
    assert "enhancing_volume_ml" not in table
    # Label 3 is no compartment of these labels: tumour (whole), but in none of the compartments.
    assert table.loc[1, "volume_mm3"] == 7000.0
    assert list(table["response_compartment"]) == ["whole", "whole"]


@pytest.mark.parametrize(
    "jacobian, mask, ratio, flag",
    [
        (20.0, 20.0, 1.0, "agree"),
        (10.0, 20.0, 0.5, "agree"),
        (40.0, 20.0, 2.0, "agree"),
        (50.0, 20.0, 2.5, "disagree"),
        (-15.0, 20.0, -0.75, "disagree"),
        (2.0, 5.0, 0.4, "small_change"),
        (3.0, 0.0, None, "small_change"),
        (30.0, 0.0, None, "disagree"),
        (None, 20.0, None, "not_evaluable"),
    ],
)
def test_jacobian_mask_check(jacobian, mask, ratio, flag):
    got_ratio, got_flag = jacobian_mask_check(jacobian, mask)
    assert got_flag == flag
    assert got_ratio == (pytest.approx(ratio) if ratio is not None else None)
    assert AGREEMENT_MIN_CHANGE_PCT == 10.0  # the documented threshold


def test_table_flags_a_jacobian_that_disagrees_with_the_masks(tmp_path):
    rows = sessions(tmp_path, binary=True)
    rows[1]["tumor_mask"] = labelled(tmp_path / "f3.nii.gz", {1: 1750}, binary=True)  # +100 %
    metrics = {}
    for session, change in (("2", -2000.0),):  # the deformation shrank the tumour by 25 %
        path = tmp_path / f"m{session}.json"
        path.write_text(
            json.dumps(
                {
                    "jacobian_volume_change_mm3": change,
                    "baseline_tumor_mm3_on_grid": 8000.0,
                    "mass_effect_mean_mm": 1.5,
                }
            )
        )
        metrics[session] = str(path)
    out = lg.write_tumour_table(rows, tmp_path / "t.tsv", metrics)
    back = pd.read_csv(tmp_path / "t.tsv", sep="\t", keep_default_na=False)
    assert out.loc[1, "change_from_baseline_pct"] == 100.0
    assert out.loc[1, "jacobian_volume_change_pct"] == -25.0
    assert out.loc[1, "jacobian_mask_agreement"] == -0.25
    assert list(back["jacobian_mask_flag"]) == ["", "disagree"]
    assert back.loc[1, "mass_effect_mean_mm"] == "1.5"  # existing columns kept
    # Agreeing numbers read "agree".
    Path(metrics["2"]).write_text(
        json.dumps({"jacobian_volume_change_mm3": 7000.0, "baseline_tumor_mm3_on_grid": 8000.0})
    )
    out = lg.write_tumour_table(rows, tmp_path / "t.tsv", metrics)
    assert out.loc[1, "jacobian_mask_flag"] == "agree"
    assert out.loc[1, "jacobian_mask_agreement"] == pytest.approx(0.875)


def test_table_command_reads_the_labels(tmp_path):
    rows = sessions(tmp_path)
    args = ["longitudinal", "table"]
    for r in rows:
        args += ["--session", r["session"], r["acq_date"], r["tumor_mask"]]
    out = tmp_path / "t.tsv"
    assert cli_main([*args, "--tumor-labels", "core=1,4", "oedema=2", "--output", str(out)]) == 0
    table = pd.read_csv(out, sep="\t")
    assert list(table["core_volume_ml"]) == [5.0, 1.0]
    assert cli_main([*args, "--output", str(out)]) == 0  # default: BraTS
    assert list(pd.read_csv(out, sep="\t")["enhancing_volume_ml"]) == [4.0, 1.0]


def test_labels_travel_from_config_to_command_line():
    labels = TumourLabels.of({"necrosis": [1], "oedema": [2], "enhancing": [3, 4]})
    assert labels.flags() == "--tumor-labels necrosis=1 oedema=2 enhancing=3,4"
    assert TumourLabels.parse(labels.flags().split()[1:]) == labels
    assert TumourLabels.parse(None) == labels  # the default is the BraTS convention
    assert TumourLabels.parse([]).allowed == {1}  # {}: binary masks only
    with pytest.raises(AtlasflowError, match="label 2 is in both a and b"):
        TumourLabels.of({"a": [2], "b": [2]})
    with pytest.raises(AtlasflowError, match="'whole' is reserved"):
        TumourLabels.of({"whole": [1]})


def test_workflow_passes_the_configured_labels():
    from factories import REPO
    from test_workflow_plan import config

    from atlasflow.workflow_plan import WorkflowPlan

    cfg = config(longitudinal={"tumor_labels": {"core": [1], "enhancing": [4]}})
    plan = WorkflowPlan.from_config(cfg, REPO, check_data=False)
    assert plan.tumor_label_flags() == "--tumor-labels core=1 enhancing=4"
    default = WorkflowPlan.from_config(config(), REPO, check_data=False)
    assert default.tumor_label_flags() == "--tumor-labels necrosis=1 oedema=2 enhancing=3,4"


def test_tumour_frequency_counts_every_label(tmp_path):
    a = labelled(tmp_path / "a.nii.gz", {4: 10})
    b = labelled(tmp_path / "b.nii.gz", {2: 10})
    freq = lg.tumour_frequency([a, b], tmp_path / "freq.nii.gz")
    assert freq.data.max() == 1.0 and int((freq.data > 0).sum()) == 10


# ------------------------------------------------------------------------------- validation


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_image_cache()
    yield
    clear_image_cache()


def cohort_with_mask(tmp_path: Path, mask: np.ndarray) -> Path:
    data = tmp_path / "data"
    write_nifti(data / "a.nii.gz", head(0))
    write_nifti(data / "b.nii.gz", head(1))
    write_nifti(data / "mask.nii.gz", mask)
    rows = [
        {"subject": "01", "session": "1", "t1w": "data/a.nii.gz", "tumor_mask": "data/mask.nii.gz"},
        {"subject": "01", "session": "2", "t1w": "data/b.nii.gz", "tumor_mask": ""},
    ]
    return write_manifest(tmp_path, rows)


def brats_mask(values: tuple) -> np.ndarray:
    mask = np.zeros(SCAN_SHAPE, np.uint8 if max(values) < 256 else np.int16)
    for i, v in enumerate(values):
        mask[5 + i, 5:9, 5:9] = v
    return mask


@pytest.mark.parametrize("values", [(1,), (1, 2, 4), (2, 3), (4,)])
def test_validation_accepts_brats_masks(tmp_path, values):
    manifest = cohort_with_mask(tmp_path, brats_mask(values))
    assert len(validate_cohort(load_cohort(manifest), manifest)) == 2


@pytest.mark.parametrize(
    "mask, expected",
    [
        (brats_mask((255,)), "value(s) 255 that are not tumour labels"),
        (brats_mask((1, 2, 7)), "value(s) 7 that are not tumour labels"),
        (brain().astype(np.float32) * 0.7, "non-integer values (e.g. 0.7)"),
        (
            (np.arange(np.prod(SCAN_SHAPE)) % 300).reshape(SCAN_SHAPE).astype(np.int16),
            "too many distinct values",
        ),
    ],
)
def test_validation_refuses_other_values_in_one_line(tmp_path, mask, expected):
    manifest = cohort_with_mask(tmp_path, mask)
    with pytest.raises(AtlasflowError) as info:
        validate_cohort(load_cohort(manifest), manifest)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("manifest.csv row 2 (subject 01, session 1): tumor_mask ")
    assert "mask.nii.gz" in message and expected in message


def test_validation_reads_the_configured_labels(tmp_path, capsys):
    manifest = cohort_with_mask(tmp_path, brats_mask((1, 2, 4)))
    custom = TumourLabels.of({"core": [1], "enhancing": [4]})
    with pytest.raises(AtlasflowError, match=r"value\(s\) 2 that are not tumour labels.*core 1"):
        validate_cohort(load_cohort(manifest), manifest, tumor_labels=custom)
    # The command line: `atlasflow validate --tumor-labels`, one line and exit 1.
    assert cli_main(["validate", str(manifest), "--tumor-labels", "core=1", "enhancing=4"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "value(s) 2" in err
    assert cli_main(["validate", str(manifest)]) == 0


def test_workflow_validation_reads_the_config_labels(tmp_path):
    from atlasflow.cohort.planning import resolve_cohort

    manifest = cohort_with_mask(tmp_path, brats_mask((1, 2, 4)))
    config = {"cohort": str(manifest), "longitudinal": {"tumor_labels": {"core": [1]}}}
    with pytest.raises(AtlasflowError, match=r"value\(s\) 2, 4 that are not tumour labels"):
        resolve_cohort(config)
    config["longitudinal"]["tumor_labels"] = {}  # binary masks only
    with pytest.raises(AtlasflowError, match="inside 1 \\(binary mask\\) \\(longitudinal"):
        resolve_cohort(config)
    del config["longitudinal"]
    assert len(resolve_cohort(config)) == 2


def test_scaled_integer_masks_are_read_as_scaled(tmp_path):
    # Stored 0/2/4 with slope 0.5: the values are 0/1/2, all tumour labels.
    manifest = cohort_with_mask(tmp_path, brats_mask((2, 4)))
    write_nifti(tmp_path / "data" / "mask.nii.gz", brats_mask((2, 4)), SCAN_AFFINE, scl_slope=0.5)
    assert len(validate_cohort(load_cohort(manifest), manifest)) == 2
    write_nifti(tmp_path / "data" / "mask.nii.gz", brats_mask((2, 4)), SCAN_AFFINE, scl_slope=3)
    with pytest.raises(AtlasflowError, match=r"value\(s\) 6, 12 that"):
        validate_cohort(load_cohort(manifest), manifest)


def test_subject_report_shows_compartments_and_the_flag(tmp_path):
    from atlasflow.reports.inputs import read_tumor_table
    from atlasflow.reports.subject import _tumor_table_html, response_rule

    metrics = tmp_path / "m.json"
    metrics.write_text(
        json.dumps({"jacobian_volume_change_mm3": 3000.0, "baseline_tumor_mm3_on_grid": 7000.0})
    )
    lg.write_tumour_table(sessions(tmp_path), tmp_path / "t.tsv", {"2": str(metrics)})
    rows = read_tumor_table(tmp_path / "t.tsv")
    assert rows[1]["response_compartment"] == "enhancing"
    # The whole mask kept its volume while the deformation grew the baseline tumour by 43 %.
    assert rows[1]["jacobian_mask_flag"] == "disagree"
    html = _tumor_table_html(rows)
    assert "<th>enhancing (ml)</th>" in html and "<th>oedema (ml)</th>" in html
    assert '<span class="badge partial_response">partial response (enhancing)</span>' in html
    assert '<span class="badge flag">disagree</span>' in html
    assert "outside 0.5-2" in response_rule()
    # A binary subject's table has no compartment columns to show.
    lg.write_tumour_table(sessions(tmp_path, binary=True), tmp_path / "b.tsv")
    assert "(ml)" not in _tumor_table_html(read_tumor_table(tmp_path / "b.tsv"))
