"""Throughput model: predicted wall time and core-hours of a full run, from measured job costs.

The workflow is a sequence of phases separated by barriers (a cohort-wide step needs every
per-scan job before it):

    plan -> template -> [per scan: preprocess + register to template (+ follow-up -> baseline)]
         -> atlas_init -> K x atlas_iteration -> atlas_final -> register_atlas_members
         -> [per scan: register_atlas (non-members), labels; per follow-up: change maps to atlas]
         -> atlas_labels, tumor_frequency -> [per subject: report_subject] -> report_cohort

    atlas_init (the members' affines), atlas_iteration (one job per iteration) and
    register_atlas_members (the members to the final atlas), each on one node:
        register every member on `workers` processes, one member at a time each (-> average)

A parallel phase lasts as long as its work spread over the cluster's cores (and, with --gpu, its
registration work spread over the GPUs), and at least as long as its longest single per-scan
chain. Cohort-wide steps run alone, one after the other; those that read every member cost
``seconds + per_unit_s * units``. atlas_init and each atlas iteration are such steps whose
per-member part (``per_unit_s``: core-seconds to register and average one member) is shared by
``workers = min(threads, cores_per_node, members)`` processes:
``seconds + per_unit_s * members / workers`` (with --gpu, the per-member part / ``gpu_speedup``),
holding ``workers`` cores all along. Every job also pays ``job_overhead_s`` (scheduler gap and
start up). Per-stage costs live in ``data/stage_costs.json`` (measured; see its ``measured_with``)
and can be recalibrated from a finished run's Snakemake benchmark files (:func:`calibrate`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from atlasflow.errors import AtlasflowError

# Stages whose work runs on a GPU with --gpu (the registration networks); all else stays on CPUs.
# atlas_init's and atlas_iteration's registrations run on the GPU too, but those stages are
# accounted apart (:func:`_atlas_job`): only their per-member part is sped up.
GPU_STAGES = ("register_template", "register_atlas", "longitudinal_register")
ATLAS_INIT = "atlas_init"
ATLAS_ITERATION = "atlas_iteration"
# The members to the final atlas, from their last iteration (after one iteration or more).
ATLAS_REGISTER = "register_atlas_members"
# Jobs whose threads are worker processes sharing the atlas members.
WORKER_STAGES = (ATLAS_INIT, ATLAS_ITERATION, ATLAS_REGISTER)


@dataclass(frozen=True)
class StageCost:
    """Cost of one job of a rule: wall seconds on ``threads`` cores, plus a per-unit part for
    cohort-wide steps (seconds per member / scan they read)."""

    seconds: float
    threads: int = 1
    per_unit_s: float = 0.0
    max_rss_mb: float = 0.0


@dataclass(frozen=True)
class CostTable:
    stages: dict[str, StageCost]
    job_overhead_s: float = 0.0
    planning_s: float = 0.0
    planning_per_scan_s: float = 0.0
    gpu_speedup: float = 1.0
    source: str = ""

    def cost(self, stage: str) -> StageCost:
        if stage not in self.stages:
            raise AtlasflowError(f"cost table ({self.source or 'given'}) has no stage {stage!r}")
        return self.stages[stage]


@dataclass(frozen=True)
class Cohort:
    """What the model needs to know of a cohort: how many jobs of each kind it makes."""

    subjects: int
    scans: int
    followups: int
    longitudinal_subjects: int
    tumour_scans: int
    atlas_members: int
    labelled_scans: int

    @classmethod
    def describe(
        cls,
        subjects: int,
        sessions_per_subject: float = 1.0,
        longitudinal_subjects: int | None = None,
        tumour_masks: bool = False,
        labels: bool = True,
        atlas_members: int | None = None,
    ) -> Cohort:
        """A cohort of ``subjects`` with ``sessions_per_subject`` scans on average.

        Follow-ups are the scans beyond the first of each subject; by default every longitudinal
        subject has one follow-up. ``tumour_masks``: the longitudinal subjects' scans carry
        tumour masks (as in the demo), which keeps those subjects out of the atlas.
        """
        if isinstance(subjects, bool) or not isinstance(subjects, int) or subjects < 1:
            raise AtlasflowError(f"--subjects must be a whole number >= 1, got {subjects!r}")
        if not math.isfinite(sessions_per_subject) or sessions_per_subject < 1:
            raise AtlasflowError(f"--sessions-per-subject must be >= 1, got {sessions_per_subject!r}")
        scans = max(subjects, round(subjects * sessions_per_subject))
        followups = scans - subjects
        if longitudinal_subjects is None:
            longitudinal_subjects = min(subjects, followups)
        if not 0 <= longitudinal_subjects <= subjects or (followups and not longitudinal_subjects):
            raise AtlasflowError(
                f"--longitudinal-subjects must be between {1 if followups else 0} and {subjects}, "
                f"got {longitudinal_subjects}"
            )
        if longitudinal_subjects > followups:
            raise AtlasflowError(
                f"{longitudinal_subjects} longitudinal subjects need at least as many follow-up scans; "
                f"{subjects} subjects x {sessions_per_subject} sessions give {followups}"
            )
        tumour_subjects = longitudinal_subjects if tumour_masks else 0
        tumour_scans = longitudinal_subjects + followups if tumour_masks else 0
        if atlas_members is None:
            clean = subjects - tumour_subjects
            atlas_members = clean if clean >= 2 else subjects
        if not 1 <= atlas_members <= subjects:
            raise AtlasflowError(f"--atlas-members must be between 1 and {subjects}, got {atlas_members}")
        return cls(
            subjects=subjects,
            scans=scans,
            followups=followups,
            longitudinal_subjects=longitudinal_subjects,
            tumour_scans=tumour_scans,
            atlas_members=atlas_members,
            labelled_scans=scans if labels else 0,
        )


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    cores_per_node: int = 1
    gpu: bool = False
    gpus_per_node: int = 1

    def __post_init__(self) -> None:
        for name in ("nodes", "cores_per_node", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise AtlasflowError(f"{flag} must be a whole number >= 1, got {value!r}")

    @property
    def cores(self) -> int:
        return self.nodes * self.cores_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node if self.gpu else 0


@dataclass
class Phase:
    name: str
    seconds: float
    jobs: int
    serial: bool = False  # a cohort-wide step running alone
    cores: int = 1  # cores a serial step holds for its whole time
    gpu_seconds: float = 0.0  # of which on a GPU (with --gpu)


@dataclass
class Estimate:
    wall_s: float
    core_hours: float
    gpu_hours: float
    jobs: int
    phases: list[Phase] = field(default_factory=list)


# ----------------------------------------------------------------------------------- the model


def _jobs(cohort: Cohort, members_batched: bool = True) -> dict[str, dict[str, int]]:
    """Jobs per parallel phase: stage -> count (as the workflow's rules create them; with
    ``members_batched`` the atlas members reach the final atlas in one job of their own)."""
    c = cohort
    return {
        "per-scan preprocessing and registration to the template": {
            "reorient": c.scans,
            "bias_correct": c.scans,
            "brain_mask": c.scans,
            "preprocess": c.scans,
            "preprocess_labels": c.labelled_scans,
            "preprocess_tumor_mask": c.tumour_scans,
            "register_template": c.scans,
            "warp_labels": c.labelled_scans,
            "longitudinal_register": c.followups,
            "longitudinal_tumor_mask": c.followups if c.tumour_scans else 0,
            "tumor_table": c.longitudinal_subjects,
        },
        "per-scan registration to the atlas": {
            "register_atlas": c.scans - (c.atlas_members if members_batched else 0),
            "warp_labels_atlas": c.labelled_scans,
            # 3 change maps per follow-up, + its tumour mask
            "change_map_to_atlas": c.followups * (4 if c.tumour_scans else 3),
        },
        "subject reports": {"report_subject": c.subjects},
    }


def _serial(name: str, table: CostTable, units: int = 0) -> Phase:
    cost = table.cost(name)
    return Phase(name, cost.seconds + cost.per_unit_s * units + table.job_overhead_s, 1, serial=True)


def _atlas_workers(cost: StageCost, cluster: Cluster, members: int) -> int:
    """Worker processes of an atlas_init or atlas_iteration job: its threads, capped at a node's
    cores and at the members (one member at a time each)."""
    return max(1, min(cost.threads, cluster.cores_per_node, members))


def _atlas_job(stage: str, label: str, table: CostTable, cluster: Cluster, cohort: Cohort) -> Phase:
    """One job registering every member on ``workers`` processes, then the average (atlas_init:
    the affines; atlas_iteration: one iteration): ``seconds + per_unit_s * members / workers``
    (the per-member part / gpu_speedup on a GPU)."""
    cost = table.cost(stage)
    members = cohort.atlas_members
    workers = _atlas_workers(cost, cluster, members)
    per_member = cost.per_unit_s * members / workers
    if cluster.gpu:
        per_member /= table.gpu_speedup
    return Phase(
        label,
        cost.seconds + per_member + table.job_overhead_s,
        1,
        serial=True,
        cores=workers,
        gpu_seconds=per_member if cluster.gpu else 0.0,
    )


def _parallel(name: str, jobs: dict[str, int], table: CostTable, cluster: Cluster, cohort: Cohort) -> Phase:
    cpu_work = gpu_work = 0.0
    chain = 0.0
    speedup = table.gpu_speedup if cluster.gpu else 1.0
    for stage, count in jobs.items():
        if not count:
            continue
        cost = table.cost(stage)
        on_gpu = cluster.gpu and stage in GPU_STAGES
        seconds = (cost.seconds / speedup if on_gpu else cost.seconds) + table.job_overhead_s
        # A job cannot use more cores than a node has.
        threads = min(cost.threads, cluster.cores_per_node)
        if on_gpu:
            gpu_work += count * seconds
        else:
            cpu_work += count * seconds * threads
        # The longest one-scan chain: every stage once, follow-up stages as many times as the
        # subject with the most follow-ups has (at least one if any).
        chain += seconds * max(1, math.ceil(count / max(cohort.scans, 1)) if count else 0)
    span = cpu_work / cluster.cores
    if cluster.gpu:
        span = max(span, gpu_work / cluster.gpus)
    return Phase(name, max(chain, span), sum(jobs.values()))


def estimate(cohort: Cohort, iterations: int, cluster: Cluster, table: CostTable) -> Estimate:
    """Predicted wall time (critical path through the phases) and core-hours of a full run."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise AtlasflowError(f"--iterations must be a whole number >= 0, got {iterations!r}")
    jobs = _jobs(cohort, members_batched=iterations >= 1)
    phase_names = list(jobs)
    phases = [
        Phase("planning (snakemake)", table.planning_s + table.planning_per_scan_s * cohort.scans, 0),
        _serial("template", table),
        _parallel(phase_names[0], jobs[phase_names[0]], table, cluster, cohort),
        _atlas_job(ATLAS_INIT, ATLAS_INIT, table, cluster, cohort),
    ]
    phases += [
        _atlas_job(ATLAS_ITERATION, f"atlas iteration {i}: {ATLAS_ITERATION}", table, cluster, cohort)
        for i in range(1, iterations + 1)
    ]
    phases.append(_serial("atlas_final", table))
    if iterations >= 1:
        phases.append(_atlas_job(ATLAS_REGISTER, ATLAS_REGISTER, table, cluster, cohort))
    phases.append(_parallel(phase_names[1], jobs[phase_names[1]], table, cluster, cohort))
    if cohort.labelled_scans:
        phases.append(_serial("atlas_labels", table, cohort.atlas_members))
    if cohort.tumour_scans:
        phases.append(_serial("tumor_frequency", table, cohort.longitudinal_subjects))
    phases += [
        _parallel(phase_names[2], jobs[phase_names[2]], table, cluster, cohort),
        _serial("report_cohort", table, cohort.subjects),
    ]

    core_s = gpu_s = 0.0
    n_jobs = 0
    speedup = table.gpu_speedup if cluster.gpu else 1.0
    counts: dict[str, int] = {}
    for phase_jobs in jobs.values():
        for stage, count in phase_jobs.items():
            counts[stage] = counts.get(stage, 0) + count
    for stage, count in counts.items():
        if not count:
            continue
        cost = table.cost(stage)
        seconds = cost.seconds + table.job_overhead_s
        if cluster.gpu and stage in GPU_STAGES:
            gpu_s += count * seconds / speedup
            core_s += count * seconds / speedup  # the GPU job still holds a core
        else:
            core_s += count * seconds * min(cost.threads, cluster.cores_per_node)
        n_jobs += count
    # Cohort-wide steps (atlas iterations included) hold their cores for their whole time.
    serial = [p for p in phases if p.serial]
    core_s += sum(p.seconds * p.cores for p in serial)
    gpu_s += sum(p.gpu_seconds for p in serial)
    n_jobs += len(serial)
    return Estimate(
        wall_s=sum(p.seconds for p in phases),
        core_hours=core_s / 3600,
        gpu_hours=gpu_s / 3600,
        jobs=n_jobs,
        phases=phases,
    )


# ----------------------------------------------------------------------------- the cost table


def _table_from_dict(data: dict, source: str) -> CostTable:
    try:
        stages = {
            name: StageCost(
                seconds=float(v["seconds"]),
                threads=int(v.get("threads", 1)),
                per_unit_s=float(v.get("per_unit_s", 0.0)),
                max_rss_mb=float(v.get("max_rss_mb", 0.0)),
            )
            for name, v in data["stages"].items()
        }
        return CostTable(
            stages=stages,
            job_overhead_s=float(data.get("job_overhead_s", 0.0)),
            planning_s=float(data.get("planning_s", 0.0)),
            planning_per_scan_s=float(data.get("planning_per_scan_s", 0.0)),
            gpu_speedup=float(data.get("gpu_speedup", {}).get("value", 1.0)),
            source=source,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AtlasflowError(f"{source}: not a valid cost table ({exc})") from None


def load_costs(path: str | Path | None = None) -> CostTable:
    """The cost table shipped with the package, or one given as a JSON file."""
    if path is None:
        text = resources.files("atlasflow").joinpath("data/stage_costs.json").read_text()
        return _table_from_dict(json.loads(text), "stage_costs.json")
    try:
        return _table_from_dict(json.loads(Path(path).read_text()), str(path))
    except (OSError, json.JSONDecodeError) as exc:
        raise AtlasflowError(f"{path}: cannot read the cost table ({exc})") from None


def read_benchmarks(folder: str | Path) -> list[dict]:
    """Every Snakemake benchmark file under ``folder``: rule (first path part), file, s, max_rss MB.

    The workflow writes ``{outdir}/benchmarks/<rule>[/...].tsv``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AtlasflowError(f"{folder}: no such benchmarks folder")
    rows = []
    for path in sorted(folder.rglob("*.tsv")):
        rule = path.relative_to(folder).parts[0].removesuffix(".tsv")
        with path.open() as fh:
            records = list(csv.DictReader(fh, delimiter="\t"))
        for record in records:  # one row per repeat (benchmark: repeat(..., n))
            try:
                seconds = float(record["s"])
                rss = float(record["max_rss"]) if record.get("max_rss") not in (None, "", "NA", "-") else 0.0
            except (KeyError, ValueError):
                raise AtlasflowError(f"{path}: not a Snakemake benchmark file") from None
            rows.append({"rule": rule, "file": str(path), "s": seconds, "max_rss_mb": rss})
    if not rows:
        raise AtlasflowError(f"{folder}: no benchmark files (*.tsv) found")
    return rows


def stage_summary(rows: Sequence[dict]) -> dict[str, dict]:
    """Per rule: number of jobs, median and max seconds, max RSS (MB)."""
    by_rule: dict[str, list[dict]] = {}
    for row in rows:
        by_rule.setdefault(row["rule"], []).append(row)
    return {
        rule: {
            "jobs": len(items),
            "median_s": statistics.median(r["s"] for r in items),
            "max_s": max(r["s"] for r in items),
            "max_rss_mb": max(r["max_rss_mb"] for r in items),
        }
        for rule, items in sorted(by_rule.items())
    }


def calibrate(table: CostTable, folder: str | Path, members: int | None = None) -> CostTable:
    """Per-stage seconds replaced by the medians of a finished run's benchmark files.

    ``members``: atlas members of the run the benchmarks come from (``--calibration-members``).
    The benchmark files no longer tell it: each atlas iteration is one atlas_iteration job (its
    median is over those jobs, one per iteration), however many members it registered.

    Stages without a per-unit part take the measured median. Cohort-wide steps keep their
    per-member slope (``per_unit_s``); their fixed part becomes the measured median minus the
    slope times ``members`` -- for atlas_init and atlas_iteration minus ``per_unit_s * members /
    workers``, their workers being the table's ``threads`` for that stage (capped at the members;
    this assumes the run gave the job all of them, i.e. ran with at least that many cores). If
    ``members`` is None, those stages keep the table's fixed part (only their max RSS is updated).
    """
    if members is not None and (isinstance(members, bool) or not isinstance(members, int) or members < 1):
        raise AtlasflowError(f"--calibration-members must be a whole number >= 1, got {members!r}")
    summary = stage_summary(read_benchmarks(folder))
    stages = dict(table.stages)
    for rule, s in summary.items():
        old = stages.get(rule, StageCost(0.0))
        if not old.per_unit_s:
            base = s["median_s"]
        elif members is None:
            base = old.seconds  # the slope's share of the median is unknown: keep the fixed part
        elif rule in WORKER_STAGES:
            base = s["median_s"] - old.per_unit_s * members / max(1, min(old.threads, members))
        else:
            base = s["median_s"] - old.per_unit_s * members
        stages[rule] = replace(old, seconds=max(base, 0.0), max_rss_mb=s["max_rss_mb"])
    return replace(table, stages=stages, source=f"{table.source} calibrated from {folder}")


# ---------------------------------------------------------------------------------------- CLI


def _hours(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``atlasflow estimate``."""
    parser.description = (
        "Predict wall time and core-hours of a full run on M nodes, from measured job costs."
    )
    parser.add_argument("--subjects", type=int, required=True)
    parser.add_argument("--iterations", type=int, default=4, help="atlas iterations (default 4)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--cores-per-node", type=int, default=1)
    parser.add_argument("--gpu", action="store_true", help="registration on GPUs (speed-up: see the cost table)")
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--sessions-per-subject", type=float, default=1.0, help="mean scans per subject (default 1)")
    parser.add_argument("--longitudinal-subjects", type=int, default=None, help="subjects with follow-ups (default: one follow-up each)")
    parser.add_argument("--tumour-masks", action="store_true", help="longitudinal subjects have tumour masks (kept out of the atlas)")
    parser.add_argument("--no-labels", action="store_true", help="the scans have no label maps")
    parser.add_argument("--atlas-members", type=int, default=None)
    parser.add_argument("--job-overhead", type=float, default=None, help="seconds each job adds (scheduler, start-up)")
    parser.add_argument("--costs", default=None, help="cost table JSON (default: the one shipped)")
    parser.add_argument("--from-benchmarks", default=None, metavar="DIR", help="calibrate from a finished run's {outdir}/benchmarks")
    parser.add_argument(
        "--calibration-members", type=int, default=None, metavar="N",
        help="atlas members of the run --from-benchmarks measured (without it, cohort-wide steps keep the table's fixed part)",
    )
    parser.add_argument("--phases", action="store_true", help="print the time of every phase")


def run_estimate(args: argparse.Namespace) -> int:
    """``atlasflow estimate``: print the predicted wall time, core-hours and jobs of a run."""
    table = load_costs(args.costs)
    if args.calibration_members is not None and not args.from_benchmarks:
        raise AtlasflowError("--calibration-members needs --from-benchmarks")
    if args.from_benchmarks:
        table = calibrate(table, args.from_benchmarks, args.calibration_members)
        if args.calibration_members is None:
            print(
                "atlasflow: note: no --calibration-members: cohort-wide steps (atlas_iteration, ...) "
                "keep the cost table's fixed part",
                file=sys.stderr,
            )
    if args.job_overhead is not None:
        if args.job_overhead < 0:
            raise AtlasflowError(f"--job-overhead must be >= 0, got {args.job_overhead}")
        table = replace(table, job_overhead_s=args.job_overhead)
    cohort = Cohort.describe(
        args.subjects,
        args.sessions_per_subject,
        args.longitudinal_subjects,
        tumour_masks=args.tumour_masks,
        labels=not args.no_labels,
        atlas_members=args.atlas_members,
    )
    cluster = Cluster(args.nodes, args.cores_per_node, args.gpu, args.gpus_per_node)
    result = estimate(cohort, args.iterations, cluster, table)
    gpu = f", GPU speed-up x{table.gpu_speedup:g} on registration" if args.gpu else ""
    print(
        f"{cohort.subjects} subjects ({cohort.scans} scans, {cohort.atlas_members} atlas members), "
        f"{args.iterations} iterations, {cluster.nodes} node(s) x {cluster.cores_per_node} cores{gpu}"
    )
    if args.phases:
        for phase in result.phases:
            print(f"  {phase.seconds:10.1f} s  {phase.name} ({phase.jobs} jobs)")
    print(f"predicted wall time: {_hours(result.wall_s)} ({result.wall_s:.0f} s)")
    print(f"core-hours: {result.core_hours:.2f}" + (f"; GPU-hours: {result.gpu_hours:.2f}" if args.gpu else ""))
    print(f"jobs: {result.jobs}; costs: {table.source}")
    return 0

