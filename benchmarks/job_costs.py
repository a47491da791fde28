"""Per-rule cost of a finished run, from its Snakemake benchmark files.

    python benchmarks/job_costs.py RESULTS/benchmarks [--json stage_costs.json]

Every rule writes `{outdir}/benchmarks/<rule>[/...].tsv` (see workflow/rules/*.smk). Prints, per
rule: number of jobs, median and max wall seconds, max RSS (MB), as a Markdown table. --json also
writes the medians as a cost table (the `stages` of src/atlasflow/data/stage_costs.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from atlasflow.errors import AtlasflowError
from atlasflow.runtime.estimate import read_benchmarks, stage_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", type=Path)
    parser.add_argument("--json", type=Path, help="write a cost table (shipped table, seconds replaced)")
    args = parser.parse_args(argv)
    try:
        summary = stage_summary(read_benchmarks(args.benchmarks))
    except AtlasflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("| rule | jobs | median s | max s | max RSS MB |")
    print("|---|---|---|---|---|")
    for rule, s in summary.items():
        print(f"| {rule} | {s['jobs']} | {s['median_s']:.1f} | {s['max_s']:.1f} | {s['max_rss_mb']:.0f} |")
    total = sum(s["jobs"] for s in summary.values())
    print(f"\n{total} jobs")
    if args.json:
        # threads 1: measure with `snakemake --cores 1` (a job never gets more cores than that)
        data = {
            "stages": {
                rule: {"seconds": round(s["median_s"], 2), "threads": 1, "max_rss_mb": round(s["max_rss_mb"])}
                for rule, s in summary.items()
            }
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
