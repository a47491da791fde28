"""Atlas build on the 10 IXI subjects: atlasflow (4 iterations) vs ants.build_template (3, SyN).

One run, same machine, same preprocessed inputs (issue 4, item 6). The workflow preprocesses the 10
whole-head IXI scans of ../shared/data/ixi10 (brain mask from their DLMUSE labels) and makes the
reference template (invocation 1, not part of either atlas time, reported apart). Then, each timed on its own:

- atlasflow, invocation 2: the whole atlas from the preprocessed scans (`atlas/atlas_T1w.nii.gz`:
  the members' affines and iteration 0, `atlas.iterations` 4, the default settings of config.yaml);
- atlasflow, invocation 3: every subject registered to the atlas, labels warped, the atlas label vote;
- ANTs: `ants.build_template(iterations=3, type_of_transform="SyN")` on the workflow's own
  `_desc-preproc_T1w` images (times their `_desc-brain_mask`), then every subject registered to
  that template (SyN) and its `_desc-preproc_dseg` labels warped (genericLabel).

Label consistency (both methods): for each subject, the Dice of its labels in atlas space with the
majority vote of the other subjects' (`atlasflow.atlas.build.leave_one_out_consistency`).

Both builds run `--repeats` times (default 3, ~16 min in all), alternating (atlasflow, ANTs,
atlasflow, ...; the atlas folder is removed before each atlasflow build), and the table reports
the medians: on a shared 2-core machine one build's time varied by +-20 % from one minute to the
next. The labels are those of the last builds.

    python benchmarks/ixi_atlas.py --work /tmp/atlasflow_ixi_atlas [--cores 2] [--ants-threads 2] [--repeats 3]

Cached workflow outputs are not rerun: use a fresh --work folder for a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _measure import emit_table  # noqa: E402
from ixi_template_dice import IXI, write_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def anat(out: Path, subject: str, name: str) -> Path:
    return out / f"sub-{subject}" / "ses-1" / "anat" / f"sub-{subject}_ses-1_{name}"


def snakemake(configfile: Path, cores: str, targets: list[Path]) -> float:
    """Wall seconds of one workflow invocation up to ``targets``."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(REPO),
           "--cores", cores, "--configfile", str(configfile), "--", *map(str, targets)]
    # Rules call the `atlasflow` console command: the interpreter's own bin folder must be on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - start


def ants_brains(images: list[Path], masks: list[Path]) -> list:
    import ants

    return [ants.image_read(str(i)) * ants.image_read(str(m)) for i, m in zip(images, masks, strict=True)]


def ants_build(brains: list) -> tuple[float, object]:
    """Seconds of ``ants.build_template`` (3 iterations, SyN) on the masked images, and the template."""
    import ants

    start = time.perf_counter()
    template = ants.build_template(image_list=brains, iterations=3, type_of_transform="SyN")
    return time.perf_counter() - start, template


def ants_register(brains: list, template, labels: list[Path], folder: Path) -> tuple[float, list[Path]]:
    """Every subject registered to the ANTs template and its labels warped: seconds, label files."""
    import ants

    folder.mkdir(parents=True, exist_ok=True)
    ants.image_write(template, str(folder / "ants_template_T1w.nii.gz"))
    warped = []
    start = time.perf_counter()
    for brain, label_path in zip(brains, labels, strict=True):
        reg = ants.registration(fixed=template, moving=brain, type_of_transform="SyN")
        moved = ants.apply_transforms(
            fixed=template, moving=ants.image_read(str(label_path)), transformlist=reg["fwdtransforms"],
            interpolator="genericLabel",
        )
        path = folder / label_path.name.replace("desc-preproc", "space-antsatlas")
        ants.image_write(moved, str(path))
        warped.append(path)
    return time.perf_counter() - start, warped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/atlasflow_ixi_atlas")
    p.add_argument("--cores", default="2")
    p.add_argument("--ants-threads", default="2", help="ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS for ANTs")
    p.add_argument("--iterations", type=int, default=4, help="atlasflow atlas.iterations")
    p.add_argument(
        "--atlas-set", nargs="*", default=[], metavar="KEY=VALUE",
        help="other atlas settings for atlasflow, for example refine_steps=30 sharpen=false (values read as YAML)",
    )
    p.add_argument("--no-ants", action="store_true", help="atlasflow only (a quick comparison of settings; no ratio)")
    p.add_argument(
        "--repeats", type=int, default=3, help="builds of each method, alternating; the medians are reported (1: one each)"
    )
    p.add_argument("--table", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if not IXI.exists():
        print(f"{IXI} is absent: nothing to measure", file=sys.stderr)
        return 1
    # ITK reads this when ants is first imported (in ants_brains).
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = args.ants_threads
    from atlasflow.atlas.build import leave_one_out_consistency

    load_start = os.getloadavg()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    work = Path(args.work)
    manifest = write_manifest(work)
    out = work / "results"
    subjects = [line.split(",")[0] for line in manifest.read_text().splitlines()[1:]]
    configfile = work / "config.yaml"
    atlas_config = {"iterations": args.iterations}
    for item in args.atlas_set:
        key, _, value = item.partition("=")
        atlas_config[key] = yaml.safe_load(value)
    configfile.write_text(json.dumps({"cohort": str(manifest), "outdir": str(out), "atlas": atlas_config}))

    # The reference template (MNI152 resampled, cached between workflows) is an input of the atlas,
    # like the preprocessed scans: made here, outside both build times.
    prep_targets = [out / "template" / "template_T1w.nii.gz"] + [anat(out, s, name) for s in subjects for name in (
        "desc-preproc_T1w.nii.gz", "desc-brain_mask.nii.gz", "desc-preproc_dseg.nii.gz")]
    prep_s = snakemake(configfile, args.cores, prep_targets)
    brains = [] if args.no_ants else ants_brains(
        [anat(out, s, "desc-preproc_T1w.nii.gz") for s in subjects],
        [anat(out, s, "desc-brain_mask.nii.gz") for s in subjects],
    )
    builds, ants_builds, template = [], [], None
    for _ in range(args.repeats):
        # A fresh atlas each time: the whole atlas stage reruns, the preprocessed scans are kept.
        for folder in (out / "atlas", out / "logs" / "atlas", out / "benchmarks" / "atlas_iteration"):
            shutil.rmtree(folder, ignore_errors=True)
        builds.append(snakemake(configfile, args.cores, [out / "atlas" / "atlas_T1w.nii.gz"]))
        if brains:
            seconds, template = ants_build(brains)
            ants_builds.append(seconds)
    build_s = statistics.median(builds)
    af_labels = [anat(out, s, "space-atlas_dseg.nii.gz") for s in subjects]
    register_s = snakemake(configfile, args.cores, [out / "atlas" / "atlas_dseg.nii.gz", *af_labels])

    af_loo = leave_one_out_consistency(af_labels)
    settings = "".join(f", atlas.{key} {value}" for key, value in atlas_config.items() if key != "iterations")
    rows = [(f"atlasflow ({args.iterations} iterations{settings})", build_s, build_s + register_s, af_loo)]
    ratios = []
    if brains:
        ants_build_s = statistics.median(ants_builds)
        ants_register_s, ants_labels = ants_register(
            brains, template, [anat(out, s, "desc-preproc_dseg.nii.gz") for s in subjects], work / "ants"
        )
        ants_loo = leave_one_out_consistency(ants_labels)
        rows.append(("ants.build_template (3 iterations, SyN)", ants_build_s, ants_build_s + ants_register_s, ants_loo))
        ratios = [
            f"Time ratio ANTs / atlasflow: build {ants_build_s / build_s:.1f}x, "
            f"build + registering subjects {(ants_build_s + ants_register_s) / (build_s + register_s):.1f}x."
        ]
    load_end = os.getloadavg()

    repeats = []
    if args.repeats > 1:
        repeats = [
            f"Builds, in the order run (medians in the table): atlasflow {', '.join(f'{b:.1f}' for b in builds)} s"
            + (f"; ANTs {', '.join(f'{b:.0f}' for b in ants_builds)} s" if ants_builds else "") + "."
        ]
    lines = [
        "| method | atlas build wall s | + registering subjects s | label consistency mean | min |",
        "|---|---|---|---|---|",
        *(f"| {name} | {b:.0f} | {br:.0f} | {sum(loo) / len(loo):.3f} | {min(loo):.3f} |" for name, b, br, loo in rows),
        "",
        *ratios,
        *repeats,
        f"Shared preprocessing and the reference template (before both, in neither time): {prep_s:.0f} s wall.",
        f"{len(subjects)} subjects; workflow --cores {args.cores}; ANTs ITK threads {args.ants_threads}; "
        f"load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in load_start)}, "
        f"at end {', '.join(f'{x:.2f}' for x in load_end)}.",
        "Per subject (" + " / ".join(name.split(" (")[0] for name, *_ in rows) + "): "
        + ", ".join(f"{s} " + "/".join(f"{loo[i]:.3f}" for *_, loo in rows) for i, s in enumerate(subjects)) + ".",
        f"Command: `{command}`",
    ]
    text = "\n".join(lines) + "\n"
    emit_table(text, args.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
