"""The whole pipeline on the 10 IXI subjects, from raw scans: atlasflow's workflow vs an antspyx script.

Issue 23's measurement, one run, same machine, same raw inputs (../shared/data/ixi10: whole-head
T1w at 2 mm with DLMUSE labels; the labels give both methods the brain mask):

- atlasflow: `snakemake --cores C` on a fresh output folder with the default config and
  `atlas.iterations` 4: reorient, N4, brain mask, normalisation, template registration, the atlas,
  every subject registered to it, labels warped and voted, per-subject and cohort reports. Wall time
  of the whole invocation (Snakemake's own start-up and planning included).
- antspyx, the script a user would write with the same tools: per subject N4
  (`ants.n4_bias_correction`), brain = N4 image x (labels > 0), SyN to the MNI152 template at 2 mm;
  `ants.build_template` (SyN, --ants-iterations, default 3: its own default) on the brains in MNI
  space; SyN of each to that template; labels carried to the template through both transforms in
  one interpolation (genericLabel). No reports. The MNI template at 2 mm with its brain mask is made
  beforehand by `atlasflow template` (outside both times, a few seconds).

Printed: wall seconds of each, the ratio, and the label consistency of both atlases (per subject,
the Dice of its labels in atlas space with the majority vote of the other subjects', mean and min).

    python benchmarks/ixi_pipeline.py --work /tmp/ixi_pipeline [--cores 2] [--ants-threads 2]
        [--order atlasflow-first|ants-first] [--no-ants] [--set KEY=VALUE ...] [--table FILE]

--set changes the atlasflow config (dotted keys, values read as YAML), e.g. --set warm_commands=false.
The work folder's results are removed before each run: every run is from raw scans.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _measure import emit_table  # noqa: E402
from ixi_template_dice import IXI, write_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_workflow(configfile: Path, cores: str, log: Path) -> float:
    """Wall seconds of one whole-workflow invocation (default target)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(REPO),
           "--cores", cores, "--configfile", str(configfile)]
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"the workflow failed (exit {done.returncode}); see {log}")
    return seconds


def make_template(folder: Path) -> tuple[Path, Path]:
    """The workflow's MNI152 template and brain mask at 2 mm, for the ANTs script."""
    image, mask = folder / "mni_T1w.nii.gz", folder / "mni_mask.nii.gz"
    if not image.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "atlasflow", "template", "--source", "mni152", "--spacing", "2",
             "--out-image", str(image), "--out-mask", str(mask)],
            check=True,
        )
    return image, mask


def ants_pipeline(
    scans: list[tuple[str, Path, Path]], template: Path, template_mask: Path, folder: Path, iterations: int
) -> tuple[dict[str, float], list[Path]]:
    """The antspyx script: seconds per stage, and every subject's labels in the ANTs atlas space."""
    import ants

    folder.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    mni = ants.image_read(str(template)) * ants.image_read(str(template_mask))
    brains, labels = [], []
    for _subject, t1w, label_path in scans:
        raw = ants.image_read(str(t1w))
        label = ants.image_read(str(label_path))
        mask = ants.threshold_image(label, 1, 1e9)
        brains.append(ants.n4_bias_field_correction(raw, mask=mask) * mask)
        labels.append(label)
    seconds["N4 + mask"] = time.perf_counter() - start

    start = time.perf_counter()
    to_mni = [ants.registration(fixed=mni, moving=brain, type_of_transform="SyN") for brain in brains]
    seconds["SyN to MNI"] = time.perf_counter() - start

    start = time.perf_counter()
    atlas = ants.build_template(
        image_list=[reg["warpedmovout"] for reg in to_mni], iterations=iterations, type_of_transform="SyN"
    )
    seconds["build_template"] = time.perf_counter() - start

    start = time.perf_counter()
    warped = []
    for (subject, _t1w, _labels), reg, label in zip(scans, to_mni, labels, strict=True):
        to_atlas = ants.registration(fixed=atlas, moving=reg["warpedmovout"], type_of_transform="SyN")
        moved = ants.apply_transforms(
            fixed=atlas, moving=label, transformlist=to_atlas["fwdtransforms"] + reg["fwdtransforms"],
            interpolator="genericLabel",
        )
        path = folder / f"sub-{subject}_space-antsatlas_dseg.nii.gz"
        ants.image_write(moved, str(path))
        warped.append(path)
    seconds["SyN to atlas + labels"] = time.perf_counter() - start
    ants.image_write(atlas, str(folder / "ants_atlas_T1w.nii.gz"))
    return seconds, warped


def set_key(config: dict, dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        config = config.setdefault(key, {})
    config[last] = value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/atlasflow_ixi_pipeline")
    p.add_argument("--cores", default="2")
    p.add_argument("--ants-threads", default="2", help="ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS for ANTs")
    p.add_argument("--ants-iterations", type=int, default=3, help="ants.build_template iterations")
    p.add_argument("--order", choices=["atlasflow-first", "ants-first"], default="atlasflow-first")
    p.add_argument("--no-ants", action="store_true", help="atlasflow only (no ratio)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="atlasflow config changes")
    p.add_argument("--table", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if not IXI.exists():
        print(f"{IXI} is absent: nothing to measure", file=sys.stderr)
        return 1
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = args.ants_threads
    # Rules call `atlasflow` from the running interpreter's environment; keep its bin folder first
    # anyway so the antspyx script and the workflow see the same installation.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    from atlasflow import layout
    from atlasflow.atlas.labels import leave_one_out_consistency

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    work = Path(args.work)
    manifest = write_manifest(work)
    rows = [line.split(",") for line in manifest.read_text().splitlines()[1:]]
    scans = [(row[0], Path(row[2]), Path(row[3])) for row in rows]
    out = work / "results"
    config: dict = {"cohort": str(manifest), "outdir": str(out), "atlas": {"iterations": 4}}
    for item in args.set:
        key, _, value = item.partition("=")
        set_key(config, key, yaml.safe_load(value))
    configfile = work / "config.yaml"
    configfile.write_text(json.dumps(config))
    template, template_mask = make_template(work / "mni")

    load_start = os.getloadavg()
    times: dict[str, float] = {}
    ants_stages: dict[str, float] = {}
    ants_labels: list[Path] = []

    def atlasflow_run() -> None:
        shutil.rmtree(out, ignore_errors=True)
        times["atlasflow"] = run_workflow(configfile, args.cores, work / "snakemake.log")

    def ants_run() -> None:
        nonlocal ants_stages, ants_labels
        shutil.rmtree(work / "ants", ignore_errors=True)
        start = time.perf_counter()
        ants_stages, ants_labels = ants_pipeline(scans, template, template_mask, work / "ants", args.ants_iterations)
        times["antspyx"] = time.perf_counter() - start

    order = [atlasflow_run] if args.no_ants else [atlasflow_run, ants_run]
    if args.order == "ants-first":
        order.reverse()
    for step in order:
        step()
    load_end = os.getloadavg()

    af_labels = [Path(layout.anat(out, "dseg", row[0], row[1], space="atlas")) for row in rows]
    af_loo = leave_one_out_consistency(af_labels)
    table = [
        "| pipeline | wall s | label consistency mean | min |",
        "|---|---|---|---|",
        f"| atlasflow workflow (raw scans to atlas, labels and reports; atlas 4 iterations) | {times['atlasflow']:.0f} "
        f"| {sum(af_loo) / len(af_loo):.3f} | {min(af_loo):.3f} |",
    ]
    lines = []
    if not args.no_ants:
        ants_loo = leave_one_out_consistency(ants_labels)
        table.append(
            f"| antspyx script (N4, SyN to MNI, build_template {args.ants_iterations} iterations, SyN to it) "
            f"| {times['antspyx']:.0f} | {sum(ants_loo) / len(ants_loo):.3f} | {min(ants_loo):.3f} |"
        )
        lines += [
            "",
            f"atlasflow / antspyx wall time: {times['atlasflow'] / times['antspyx']:.2f} "
            f"(antspyx {times['antspyx'] / times['atlasflow']:.1f}x longer).",
            "antspyx stages: " + ", ".join(f"{name} {s:.0f} s" for name, s in ants_stages.items()) + ".",
        ]
    settings = ", ".join(args.set) or "default config"
    lines += [
        f"{len(scans)} subjects; atlasflow {settings}, --cores {args.cores}; ANTs ITK threads {args.ants_threads}; "
        f"order {args.order}; load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in load_start)}, "
        f"at end {', '.join(f'{x:.2f}' for x in load_end)}.",
        f"Command: `{command}`",
    ]
    text = "\n".join(table + lines) + "\n"
    emit_table(text, args.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
