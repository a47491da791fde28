"""Declared resources of every rule against what its jobs used (the `benchmark:` files of a run).

    python benchmarks/resources.py RUN_DIR --configfile CONFIG [--markdown]

RUN_DIR is the working directory of a finished run (holding `<outdir>/benchmarks/`); the declared
`mem_mb` and `runtime` come from a forced dry run of the same config there, so they are what
Snakemake would ask for (rule defaults, not a cluster profile's overrides). Prints per rule: jobs,
peak RSS (max over jobs), CPU seconds and wall seconds (max), the declared memory and runtime, and
declared/used memory.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RULE = re.compile(r"^\s*(?:local)?rule (\w+):\s*$")
BENCH = re.compile(r"^\s*benchmark: (\S+)$")
RESOURCES = re.compile(r"^\s*resources: (.*)$")


def declared(run_dir: Path, configfile: str) -> tuple[dict[str, dict], dict[str, str]]:
    """(rule -> {mem_mb, runtime}, benchmark file -> rule) from `snakemake -n --forceall`."""
    cmd = [
        str(Path(sys.executable).parent / "snakemake"),
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(run_dir),
        "-n",
        "--forceall",
        "--configfile",
        configfile,
    ]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rules: dict[str, dict] = {}
    owner: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if match := RULE.match(line):
            current = match.group(1)
        elif current and (match := BENCH.match(line)):
            owner[str(Path(match.group(1)))] = current
        elif current and (match := RESOURCES.match(line)):
            values = dict(item.split("=", 1) for item in match.group(1).split(", ") if "=" in item)
            rules[current] = {k: values.get(k) for k in ("mem_mb", "runtime")}
    return rules, owner


def measured(run_dir: Path, owner: dict[str, str]) -> pd.DataFrame:
    rows = defaultdict(list)
    for path, rule in owner.items():
        file = run_dir / path
        if file.exists():
            row = pd.read_csv(file, sep="\t").iloc[-1]
            rows[rule].append((float(row["max_rss"]), float(row["cpu_time"]), float(row["s"])))
    table = []
    for rule, values in rows.items():
        rss, cpu, wall = zip(*values, strict=True)
        table.append(
            {
                "rule": rule,
                "jobs": len(values),
                "max_rss_mb": max(rss),
                "max_cpu_s": max(cpu),
                "max_wall_s": max(wall),
            }
        )
    return pd.DataFrame(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--configfile", required=True)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rules, owner = declared(args.run_dir.resolve(), str(Path(args.configfile).resolve()))
    table = measured(args.run_dir.resolve(), owner)
    table["mem_mb"] = [
        int(rules[r]["mem_mb"]) if rules[r]["mem_mb"] else None for r in table["rule"]
    ]
    table["runtime_min"] = [
        int(rules[r]["runtime"]) if rules[r]["runtime"] else None for r in table["rule"]
    ]
    table["mem_ratio"] = (table["mem_mb"] / table["max_rss_mb"]).round(1)
    table = table.sort_values("rule").round(1)
    print(table.to_markdown(index=False) if args.markdown else table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
