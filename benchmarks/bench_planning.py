"""Planning cost vs cohort size: manifest validation and `snakemake -n` at 10, 100, 1000 subjects.

    python benchmarks/bench_planning.py [--sizes 10 100 1000] [--work /tmp/atlasflow-bench-planning]

A tiny demo cohort (4 mm) is generated once; every synthetic cohort links to its files (one
symlink per manifest cell, so every row is a distinct file, as in a real cohort). One subject in
ten has two sessions (with acquisition dates and a tumour mask), the others one. For each size it
times, each in a fresh process (wall seconds, peak RSS of the process tree):

- `atlasflow validate --headers-only` (headers and grids only),
- `atlasflow validate` (headers and one pass over every file's voxels),
- `snakemake -n` of the whole workflow on that manifest, as the workflow plans it (`check_voxels`
  false: headers only; and true: the voxel pass too, what the workflow does by default).

Prints a Markdown table (and writes it to --output).
"""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _measure import load_average, measure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def source_cohort(work: Path) -> dict[str, dict[str, str]]:
    """Generate the tiny demo cohort once; return one cross-sectional and one longitudinal scan."""
    source = work / "source"
    manifest = source / "manifest.csv"
    if not manifest.exists():
        subprocess.run(
            [BIN / "atlasflow", "demo-data", str(source), "--spacing", "4", "--n-cross", "1",
             "--n-long", "1", "--n-timepoints", "2"],
            check=True,
        )
    rows = list(csv.DictReader(manifest.open()))
    cross = next(r for r in rows if not r["tumor_mask"])
    long = [r for r in rows if r["tumor_mask"]]
    files = {"cross": cross, "long1": long[0], "long2": long[1]}
    return {k: {c: str((source / v[c]).resolve()) for c in ("t1w", "labels", "tumor_mask") if v[c]} for k, v in files.items()}


def write_cohort(work: Path, n_subjects: int, files: dict[str, dict[str, str]]) -> Path:
    """Manifest of ``n_subjects`` subjects whose files are symlinks to the source scans."""
    folder = work / f"n{n_subjects}"
    manifest = folder / "manifest.csv"
    if manifest.exists():
        return manifest
    rows = []
    for i in range(1, n_subjects + 1):
        subject = f"s{i:05d}"
        sessions = [("1", "long1", "2020-01-01"), ("2", "long2", "2021-01-01")] if i % 10 == 0 else [("1", "cross", "")]
        for session, key, date in sessions:
            row = {"subject": subject, "session": session, "t1w": "", "labels": "", "tumor_mask": "", "acq_date": date}
            anat = folder / f"sub-{subject}" / f"ses-{session}" / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            for column, target in files[key].items():
                suffix = {"t1w": "T1w", "labels": "dseg", "tumor_mask": "label-tumor_mask"}[column]
                link = anat / f"sub-{subject}_ses-{session}_{suffix}.nii.gz"
                if not link.is_symlink():
                    link.symlink_to(target)
                row[column] = str(link.relative_to(folder))
            rows.append(row)
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def dry_run_jobs(stdout: Path) -> int | None:
    match = re.search(r"^total\s+(\d+)", stdout.read_text(), re.M)
    return int(match.group(1)) if match else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/atlasflow-bench-planning"))
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/planning.md")
    parser.add_argument("--skip-full", action="store_true", help="skip the voxel-reading variants")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    files = source_cohort(args.work)

    lines = [
        "| subjects | scans | jobs planned | validate --headers-only s / MB | validate (voxels) s / MB "
        "| snakemake -n (headers) s / MB | snakemake -n (voxels) s / MB |",
        "|---|---|---|---|---|---|---|",
    ]
    print(lines[0], flush=True)
    print(lines[1], flush=True)
    for n in args.sizes:
        manifest = write_cohort(args.work, n, files)
        scans = sum(1 for _ in manifest.open()) - 1
        cells = []
        variants = [["--headers-only"]] + ([] if args.skip_full else [[]])
        for flags in variants:
            run = measure([str(BIN / "atlasflow"), "validate", *flags, str(manifest)])
            if run.returncode:
                raise SystemExit(f"validate failed: {run.stderr.strip()}")
            cells.append(f"{run.seconds:.1f} / {run.peak_rss_mb:.0f}")
        if args.skip_full:
            cells.append("-")
        jobs = None
        for voxels in ["False"] + ([] if args.skip_full else ["True"]):
            out = args.work / f"n{n}" / f"dryrun-{voxels}.txt"
            command = [
                str(BIN / "snakemake"), "-n", "--cores", "1", "--config", f"cohort={manifest}",
                f"outdir={args.work / f'n{n}' / 'results'}", f"check_voxels={voxels}",
            ]
            run = measure(command, cwd=REPO, env={"PATH": f"{BIN}:/usr/bin:/bin"}, stdout=out)
            if run.returncode:
                raise SystemExit(f"snakemake -n failed at {n} subjects: {run.stderr.strip()[-2000:]}")
            jobs = dry_run_jobs(out)
            cells.append(f"{run.seconds:.1f} / {run.peak_rss_mb:.0f}")
        if args.skip_full:
            cells.append("-")
        line = f"| {n} | {scans} | {jobs} | " + " | ".join(cells) + " |"
        lines.append(line)
        print(line, flush=True)
    note = f"\n{load_average()} at the end of the run.\n"
    print(note)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        "Planning cost (`python benchmarks/bench_planning.py`): wall seconds / peak RSS MB\n\n" + "\n".join(lines) + "\n" + note
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
