"""The throughput model (atlasflow.runtime.estimate): scaling, barriers, calibration, argument errors."""

from __future__ import annotations

import json

import pytest
from factories import workflow_rules

from atlasflow.cli import main as cli
from atlasflow.errors import AtlasflowError
from atlasflow.runtime import estimate as estimate_module
from atlasflow.runtime.estimate import (
    Cluster,
    Cohort,
    CostTable,
    StageCost,
    calibrate,
    estimate,
    load_costs,
    read_benchmarks,
    stage_summary,
)

STAGES = [
    "template", "reorient", "bias_correct", "brain_mask", "preprocess", "preprocess_labels",
    "preprocess_tumor_mask", "register_template", "warp_labels", "longitudinal_register",
    "longitudinal_tumor_mask", "tumor_table", "atlas_init", "atlas_iteration",
    "atlas_final", "register_atlas_members", "register_atlas", "warp_labels_atlas", "change_map_to_atlas", "atlas_labels", "tumor_frequency", "report_subject", "report_cohort",
]


def table(**overrides) -> CostTable:
    """Every stage 1 s on one thread, registration 10 s; cohort-wide steps 0.1 s per member; an
    atlas iteration 2 s + 10 core-seconds per member on up to 8 workers."""
    stages = {name: StageCost(1.0) for name in STAGES}
    for name in ("register_template", "register_atlas", "longitudinal_register"):
        stages[name] = StageCost(10.0)
    for name in ("atlas_init", "atlas_labels"):
        stages[name] = StageCost(2.0, per_unit_s=0.1)
    stages["atlas_iteration"] = StageCost(2.0, threads=8, per_unit_s=10.0)
    stages["register_atlas_members"] = StageCost(2.0, threads=8, per_unit_s=10.0)
    return CostTable(stages=stages, **overrides)


def atlas_phase(result, i=1):
    (phase,) = [p for p in result.phases if p.name == f"atlas iteration {i}: atlas_iteration"]
    return phase


def wall(subjects, iterations=2, nodes=1, cores=1, costs=None, **cohort):
    return estimate(Cohort.describe(subjects, **cohort), iterations, Cluster(nodes, cores), costs or table()).wall_s


def test_single_core_is_the_sum_of_every_job():
    cohort = Cohort.describe(3)
    result = estimate(cohort, 1, Cluster(1, 1), table())
    # 3 scans: 7 one-second stages + register (10) before the atlas, warp_labels_atlas (1)
    # after, a report each; serial steps, the atlas iteration and then the registrations to the
    # final atlas each registering the 3 members one after the other on the single core.
    per_scan = 6 * 1 + 10 + 1 + 1
    serial = 1 + (2 + 0.3) + (2 + 3 * 10) + 1 + (2 + 3 * 10) + (2 + 0.3) + 1
    assert result.wall_s == pytest.approx(3 * per_scan + serial)
    assert result.core_hours * 3600 == pytest.approx(result.wall_s)


def test_wall_time_grows_monotonically_with_subjects():
    times = [wall(n, nodes=4, cores=8, sessions_per_subject=1.1) for n in (1, 2, 5, 10, 50, 100, 500, 1000, 2000)]
    assert all(a <= b for a, b in zip(times, times[1:], strict=False)), times


def test_large_cohorts_scale_linearly_in_subjects_and_inversely_in_nodes():
    one, two = wall(1000, nodes=10, cores=16), wall(2000, nodes=10, cores=16)
    # every phase is linear in the cohort (cohort-wide steps read each member once)
    assert two / one == pytest.approx(2.0, rel=0.05)

    def parallel_part(nodes):
        phases = estimate(Cohort.describe(2000), 4, Cluster(nodes, 16), table()).phases
        return sum(p.seconds for p in phases if not p.serial and p.jobs)

    # the per-scan phases spread over the nodes; the cohort-wide steps do not
    assert parallel_part(5) / parallel_part(10) == pytest.approx(2.0, rel=0.01)
    core_hours = [estimate(Cohort.describe(n), 4, Cluster(10, 16), table()).core_hours for n in (500, 1000)]
    assert core_hours[1] / core_hours[0] == pytest.approx(2.0, rel=0.02)


def test_each_atlas_iteration_is_a_barrier_even_on_an_unbounded_cluster():
    # One job on one node: however big the cluster, an iteration registers its 50 members on at
    # most 8 workers, then averages.
    big = {"nodes": 100, "cores": 64}
    step = wall(50, iterations=3, **big) - wall(50, iterations=2, **big)
    assert step == pytest.approx(2.0 + 10.0 * 50 / 8)
    # ...and the serial averaging grows with the members, however many nodes there are.
    assert wall(500, iterations=4, **big) > wall(50, iterations=4, **big)


def test_atlas_iteration_speeds_up_with_a_node_s_cores_up_to_its_threads_and_members():
    def phase_s(cores, subjects=40, nodes=1):
        return atlas_phase(estimate(Cohort.describe(subjects), 2, Cluster(nodes, cores), table())).seconds

    times = [phase_s(c) for c in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(times, times[1:], strict=False)), times
    assert times == pytest.approx([2.0 + 10.0 * 40 / c for c in (1, 2, 4, 8)])
    # the job's 8 threads cap it: more cores per node, or more nodes, do not help
    assert phase_s(16) == phase_s(64) == phase_s(8, nodes=50) == times[-1]
    # nor do workers beyond the members (5 members: 5 workers at most)
    assert phase_s(8, subjects=5) == phase_s(5, subjects=5) == pytest.approx(2.0 + 10.0)
    assert phase_s(4, subjects=5) == pytest.approx(2.0 + 10.0 * 5 / 4)


def test_atlas_iteration_core_hours_gpu_hours_and_jobs():
    cohort, cluster = Cohort.describe(40), Cluster(2, 8, gpu=True)
    costs = table(gpu_speedup=10.0, job_overhead_s=0.5)
    one, two = (estimate(cohort, k, cluster, costs) for k in (1, 2))
    # one job per iteration; the per-member part (10 s x 40 / 8 workers) runs 10x faster on the GPU
    seconds = 2.0 + 10.0 * 40 / 8 / 10.0 + 0.5
    assert atlas_phase(two, 2).seconds == pytest.approx(seconds) and atlas_phase(two, 2).jobs == 1
    assert two.jobs - one.jobs == 1
    assert two.wall_s - one.wall_s == pytest.approx(seconds)
    # the job holds its 8 workers' cores all along; the GPU only for the registrations
    assert (two.core_hours - one.core_hours) * 3600 == pytest.approx(seconds * 8)
    assert (two.gpu_hours - one.gpu_hours) * 3600 == pytest.approx(10.0 * 40 / 8 / 10.0)
    cpu = estimate(cohort, 1, Cluster(2, 8), costs)
    assert atlas_phase(cpu).seconds == pytest.approx(2.0 + 10.0 * 40 / 8 + 0.5) and cpu.gpu_hours == 0


def test_job_overhead_and_gpu_speedup():
    base = wall(20, nodes=1, cores=1)
    slower = wall(20, nodes=1, cores=1, costs=table(job_overhead_s=2.0))
    jobs = estimate(Cohort.describe(20), 2, Cluster(1, 1), table()).jobs
    assert slower - base == pytest.approx(2.0 * jobs)
    cpu = estimate(Cohort.describe(200), 4, Cluster(2, 8), table(gpu_speedup=10.0))
    gpu = estimate(Cohort.describe(200), 4, Cluster(2, 8, gpu=True), table(gpu_speedup=10.0))
    assert gpu.wall_s < cpu.wall_s and gpu.gpu_hours > 0 and cpu.gpu_hours == 0


def test_longitudinal_and_tumour_cohort_counts():
    demo = Cohort.describe(5, sessions_per_subject=1.4, longitudinal_subjects=1, tumour_masks=True)
    assert (demo.scans, demo.followups, demo.tumour_scans, demo.atlas_members) == (7, 2, 3, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"subjects": 0}, "--subjects"),
        ({"subjects": 10, "sessions_per_subject": 0.5}, "--sessions-per-subject"),
        ({"subjects": 10, "longitudinal_subjects": 3}, "follow-up"),
        ({"subjects": 10, "atlas_members": 11}, "--atlas-members"),
    ],
)
def test_bad_cohort_arguments_raise_a_clear_error(kwargs, message):
    with pytest.raises(AtlasflowError, match=message):
        Cohort.describe(**kwargs)


def test_bad_cluster_and_iterations_raise_a_clear_error():
    with pytest.raises(AtlasflowError, match="--nodes"):
        Cluster(0, 4)
    with pytest.raises(AtlasflowError, match="--iterations"):
        estimate(Cohort.describe(5), -1, Cluster(1, 1), table())
    with pytest.raises(AtlasflowError, match="no stage 'atlas_iteration'"):
        costs = table()
        del costs.stages["atlas_iteration"]
        estimate(Cohort.describe(5), 1, Cluster(1, 1), costs)


def test_cli_prints_prediction_and_one_line_errors(capsys):
    assert cli.main(["estimate", "--subjects", "100", "--iterations", "2", "--nodes", "2", "--cores-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "predicted wall time" in out and "core-hours" in out
    assert cli.main(["estimate", "--subjects", "100", "--nodes", "0"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "atlasflow: error: --nodes must be a whole number >= 1, got 0"


def test_shipped_cost_table_covers_every_stage_of_the_model():
    costs = load_costs()
    assert set(STAGES) <= set(costs.stages)
    assert set(costs.stages) <= workflow_rules()  # no stage of a rule that is gone
    assert all(s.seconds > 0 for s in costs.stages.values())
    assert costs.gpu_speedup >= 1
    for stage in estimate_module.WORKER_STAGES:
        assert costs.stages[stage].threads > 1 and costs.stages[stage].per_unit_s > 0


def test_cost_table_ignores_notes_on_stages(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"stages": {"x": {"seconds": 3, "threads": 2, "note": "a remark"}}}))
    assert load_costs(path).stages["x"] == StageCost(3.0, threads=2)


def _bench(path, seconds, rss):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
        f"{seconds}\t0:00:01\t{rss}\t1\t1\t1\t0\t0\t0\t1\n"
    )


def _calibration_run(tmp_path):
    bench = tmp_path / "benchmarks"
    for i, s in enumerate((4.0, 6.0, 20.0)):
        _bench(bench / "register_template" / f"sub-{i}_ses-1.tsv", s, 300 + i)
    for it, s in ((1, 30.0), (2, 40.0)):
        _bench(bench / "atlas_iteration" / f"iter-{it}.tsv", s, 3000 + it)
    _bench(bench / "atlas_init.tsv", 5.0, 500)
    _bench(bench / "template.tsv", 3.0, 200)
    return bench


def test_benchmark_files_summarised_and_used_to_calibrate(tmp_path):
    bench = _calibration_run(tmp_path)
    summary = stage_summary(read_benchmarks(bench))
    assert summary["register_template"] == {"jobs": 3, "median_s": 6.0, "max_s": 20.0, "max_rss_mb": 302.0}
    assert summary["atlas_iteration"]["jobs"] == 2 and summary["template"]["jobs"] == 1
    calibrated = calibrate(table(), bench, members=16)
    assert calibrated.stages["register_template"].seconds == 6.0
    # 16 members on 8 workers: fixed part = median 35 - 10 x 16 / 8; slope and threads kept
    assert calibrated.stages["atlas_iteration"] == StageCost(15.0, threads=8, per_unit_s=10.0, max_rss_mb=3002.0)
    assert calibrated.stages["atlas_init"].seconds == pytest.approx(5.0 - 0.1 * 16)
    assert calibrated.stages["reorient"].seconds == 1.0  # not in the run: kept
    # 4 members kept only 4 of the 8 workers busy: fixed part = 35 - 10 x 4 / 4
    assert calibrate(table(), bench, members=4).stages["atlas_iteration"].seconds == pytest.approx(25.0)


def test_calibration_without_members_keeps_the_fixed_part_of_cohort_wide_steps(tmp_path):
    bench = _calibration_run(tmp_path)
    calibrated = calibrate(table(), bench)
    assert calibrated.stages["atlas_iteration"] == StageCost(2.0, threads=8, per_unit_s=10.0, max_rss_mb=3002.0)
    assert calibrated.stages["atlas_init"].seconds == 2.0
    assert calibrated.stages["register_template"].seconds == 6.0  # no per-member part: measured
    with pytest.raises(AtlasflowError, match="--calibration-members"):
        calibrate(table(), bench, members=0)


def test_cli_passes_calibration_members(tmp_path, capsys):
    bench = _calibration_run(tmp_path)
    costs = tmp_path / "costs.json"
    stages = {name: {"seconds": c.seconds, "threads": c.threads, "per_unit_s": c.per_unit_s} for name, c in table().stages.items()}
    costs.write_text(json.dumps({"stages": stages}))
    argv = ["--subjects", "40", "--iterations", "1", "--cores-per-node", "8", "--costs", str(costs), "--phases"]
    assert cli.main(["estimate", *argv, "--from-benchmarks", str(bench), "--calibration-members", "16"]) == 0
    # calibrated fixed part 15 s + 10 s x 40 members / 8 workers
    assert f"{15.0 + 10.0 * 40 / 8:10.1f} s  atlas iteration 1: atlas_iteration (1 jobs)" in capsys.readouterr().out
    assert cli.main(["estimate", *argv, "--from-benchmarks", str(bench)]) == 0
    captured = capsys.readouterr()
    assert f"{2.0 + 10.0 * 40 / 8:10.1f} s  atlas iteration 1: atlas_iteration" in captured.out
    assert "--calibration-members" in captured.err
    assert cli.main(["estimate", *argv, "--calibration-members", "16"]) == 1
    assert capsys.readouterr().err == "atlasflow: error: --calibration-members needs --from-benchmarks\n"


def test_missing_or_foreign_benchmark_folder_is_a_clear_error(tmp_path):
    with pytest.raises(AtlasflowError, match="no such benchmarks folder"):
        read_benchmarks(tmp_path / "nope")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(AtlasflowError, match="not a Snakemake benchmark file"):
        read_benchmarks(tmp_path / "b")
    bad = tmp_path / "costs.json"
    bad.write_text(json.dumps({"stages": {"x": {}}}))
    with pytest.raises(AtlasflowError, match="not a valid cost table"):
        load_costs(bad)
