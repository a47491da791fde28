"""The workflow on a real SLURM cluster: a private single-node cluster started for this session.

The cluster (munged + slurmctld + slurmd on localhost, Debian's packages) is brought up by
.ci/slurm-up.sh in a pytest tmp dir and always stopped by .ci/slurm-down.sh; the workflow runs on
the tiny test cohort through snakemake-executor-plugin-slurm with profiles/slurm itself, its numbers
scaled down to the test node (see `derive_test_profile`: no GPU, no account, partition "debug", 2 cores).
Where the machine cannot host the cluster (not root, no apt-get, packages not installable) the
test skips and says why. Nothing here touches os.environ: SLURM_CONF reaches child processes only.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from factories import REPO, TINY_CONFIG, workflow_rules

# The SLURM run mostly waits on the queue: under `make test` (two pytest workers) it has a worker
# of its own while the other runs the rest.
pytestmark = pytest.mark.xdist_group("slurm")

SNAKEFILE = REPO / "Snakefile"
SLURM_PROFILE = REPO / "profiles" / "slurm"
SLURM_UP = REPO / ".ci" / "slurm-up.sh"
SLURM_DOWN = REPO / ".ci" / "slurm-down.sh"
INSTALL_DEPS = REPO / "scripts" / "install-system-deps.sh"

SLURM_COMMANDS = ("munged", "munge", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol")
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd")
# Wall-clock bounds: every wait in this file ends by itself.
INSTALL_TIMEOUT = 600
UP_TIMEOUT = 120
DOWN_TIMEOUT = 120
# The workflow took 8-11 minutes on the 2-core machine, alone or beside the rest of the suite;
# the bound only catches a hang, so it leaves room for a loaded machine.
WORKFLOW_TIMEOUT = 1500


def _missing_commands() -> list[str]:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [cmd for cmd in SLURM_COMMANDS if shutil.which(cmd, path=path) is None]


def _cluster_processes(conf: Path) -> list[str]:
    """Live (non-zombie) daemon processes whose environment names this cluster's slurm.conf."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            if comm not in DAEMONS:
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if f"SLURM_CONF={conf}".encode() in environ or str(conf.parent) in cmdline:
            found.append(f"{proc.name} {comm}")
    return found


class SlurmCluster:
    """A running test cluster: its slurm.conf, and the environment that reaches it."""

    def __init__(self, state: Path):
        self.state = state
        self.conf = state / "slurm.conf"
        self.running = False

    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF and the venv's bin (jobs call the `atlasflow` command)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", ""), "/usr/sbin"])
        return env

    def up(self) -> None:
        self.running = True  # from here on, whatever happens, down() must run
        result = subprocess.run(
            ["bash", str(SLURM_UP), str(self.state)],
            capture_output=True, text=True, timeout=UP_TIMEOUT, stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            logs = "\n".join(
                f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}"
                for path in sorted((self.state / "log").glob("*"))
            )
            raise RuntimeError(f"slurm-up.sh failed:\n{result.stdout}\n{result.stderr}\n{logs}")

    def down(self) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["bash", str(SLURM_DOWN), str(self.state)],
            capture_output=True, text=True, timeout=DOWN_TIMEOUT, stdin=subprocess.DEVNULL,
        )
        self.running = False
        return result

    def scontrol_job(self, job_id: str) -> str:
        return subprocess.run(
            ["scontrol", "show", "job", job_id],
            capture_output=True, text=True, timeout=30, env=self.env(), stdin=subprocess.DEVNULL,
        ).stdout


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A single-node SLURM cluster for the session; skipped where this machine cannot run one.

    Always stopped at the end of the session; a test may stop it earlier (down() is idempotent)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the SLURM test needs Linux (Debian's slurm packages)")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm is not installed (pip install -e '.[test]')")
    if os.geteuid() != 0:
        pytest.skip("the SLURM test needs root (it starts munged, slurmctld and slurmd); run as root or in CI")
    if _missing_commands():
        if shutil.which("apt-get") is None:
            pytest.skip(f"SLURM commands missing ({', '.join(_missing_commands())}) and no apt-get to install them")
        subprocess.run(
            ["bash", str(INSTALL_DEPS), "slurm"], timeout=INSTALL_TIMEOUT, stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        if _missing_commands():
            pytest.skip(
                f"SLURM commands still missing after scripts/install-system-deps.sh slurm: "
                f"{', '.join(_missing_commands())} (no network to Debian's mirror?)"
            )
    if os.path.lexists("/etc/slurm/slurm.conf") and not os.path.islink("/etc/slurm/slurm.conf"):
        pytest.skip("/etc/slurm/slurm.conf is a real site config; the test cluster will not replace it")

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.up()
        yield cluster
    finally:
        if cluster.running:
            cluster.down()


def _rules_by_subject(job_log: Path) -> dict[str, set[str]]:
    """Which rules ran for which subject inside one SLURM job, read from the job's Snakemake log."""
    rules: dict[str, set[str]] = {}
    current = None
    for line in job_log.read_text(errors="replace").splitlines():
        if line.startswith("localrule "):
            current = line.split()[1].rstrip(":")
        elif current and line.strip().startswith("wildcards:"):
            match = re.search(r"subject=(\w+)", line)
            if match:
                rules.setdefault(match.group(1), set()).add(current)
            current = None
    return rules


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


# What the test node offers: partition "debug", no GPU, no accounting, 2 cores on CI.
TEST_MAX_MEM_MB = 1500
TEST_MAX_RUNTIME_MIN = 15
# The tiny cohort trimmed further for SLURM, where every job costs 10-15 s of overhead (the plugin
# pauses 5 s before each sbatch; Snakemake starts inside each job): two subjects (one scanned
# twice, with tumour masks), one atlas iteration, no N4 (the local end-to-end test runs it).
SLURM_CONFIG_OVERRIDES = {
    "demo": {"n_cross": 1, "n_long": 1, "n_timepoints": 2},
    "atlas": {"iterations": 1},
    "preprocess": {"n4": False},
}


def derive_test_profile(real: dict) -> dict:
    """profiles/slurm scaled down to the single-node test cluster.

    Everything that decides how jobs reach SLURM and travel together (executor, status command,
    groups, which rules get which resources) is kept; only the amounts shrink: no GPU (so the
    `config:` switch to CUDA goes too), one thread per job, memory and runtime capped, the debug
    partition, no account. Short first status check and kept job logs let the test run fast and
    read the job ids.
    """
    profile = {k: v for k, v in real.items() if k != "config"}

    def shrink(resources: dict) -> dict:
        out = {k: v for k, v in resources.items() if k not in ("slurm_partition", "slurm_account")}
        if "gpu" in out:
            out["gpu"] = 0
        if "mem_mb" in out:
            out["mem_mb"] = min(int(out["mem_mb"]), TEST_MAX_MEM_MB)
        if "runtime" in out:
            out["runtime"] = min(int(out["runtime"]), TEST_MAX_RUNTIME_MIN)
        return out

    profile["default-resources"] = {**shrink(real.get("default-resources", {})), "slurm_partition": "debug"}
    profile["set-resources"] = {rule: shrink(res) for rule, res in real.get("set-resources", {}).items()}
    profile["set-threads"] = {rule: 1 for rule in real.get("set-threads", {})}
    profile.update({
        # More jobs than cores: SLURM starts a queued job the moment a core frees up, instead of
        # waiting for the plugin's next status check (its interval grows by 10 s per check).
        "jobs": 4,
        "latency-wait": 5,
        "retries": 0,
        # The plugin checks x s after a job finished, then x+10 s later, then x+20 s...: with
        # x = 5 the 15-20 s jobs here are seen at 20 s (x = 2: 36 s; the default 40: 40 s).
        "slurm-init-seconds-before-status-checks": 5,
        "slurm-no-account": True,
        "slurm-keep-successful-logs": True,
    })
    return profile


def _real_profile() -> dict:
    return yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())


def test_slurm_profile_essentials():
    """profiles/slurm works without accounting, groups each scan's chain, gives GPUs to registration
    and training, and the derived test profile asks the test node for nothing it lacks."""
    real = _real_profile()
    assert real["executor"] == "slurm"
    assert real["slurm-status-command"] == "squeue"  # sacct fails on clusters without slurmdbd
    assert "subject" in real["group-components"]
    gpu_rules = {rule for rule, res in real["set-resources"].items() if res.get("gpu", 0) >= 1}
    assert gpu_rules and all(re.search("regist|train|atlas_init|atlas_iteration", rule) for rule in gpu_rules), gpu_rules
    derived = derive_test_profile(real)
    assert derived["executor"] == real["executor"]
    assert set(derived["group-components"]) == set(real["group-components"])
    assert set(derived["set-resources"]) == set(real["set-resources"])
    for rule, res in derived["set-resources"].items():
        assert res.get("gpu", 0) == 0 and res.get("mem_mb", 0) <= TEST_MAX_MEM_MB, rule
        assert "slurm_partition" not in res and "slurm_account" not in res, rule
    assert "config" not in derived


def test_profiles_name_real_rules_and_groups():
    """Every rule a profile configures exists in workflow/rules (Snakemake silently ignores a name it
    does not know, so a renamed rule would lose its cluster resources or its group), every group
    the profile sizes has members, and the rules themselves carry no `group:` (grouping is the
    cluster profile's business: in the rules it makes every local dry run pay the group checks)."""
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        assert not re.search(r"^\s*group:", smk.read_text(), flags=re.M), f"{smk.name}: a rule sets group:"
    rule_names = workflow_rules()
    assert rule_names
    config = _real_profile()
    named = set(config.get("set-resources", {})) | set(config.get("set-threads", {}))
    assert not named - rule_names, f"profiles/slurm names rules that do not exist: {sorted(named - rule_names)}"
    groups = config.get("groups", {})
    assert not set(groups) - rule_names, f"profiles/slurm groups rules that do not exist: {sorted(set(groups) - rule_names)}"
    unknown_groups = set(config.get("group-components", {})) - set(groups.values())
    assert not unknown_groups, f"profiles/slurm sizes groups that have no rule: {sorted(unknown_groups)}"


def _group_jobs(dry_run_log: str) -> dict[str, list[set[str]]]:
    """The subjects of every group job a dry run plans, by group: {group: [subjects of job 1, ...]}."""
    jobs: dict[str, list[set[str]]] = {}
    current = None
    for line in dry_run_log.splitlines():
        match = re.search(r"Group job (\w+) \(jobs", line)
        if match:
            current = set()
            jobs.setdefault(match.group(1), []).append(current)
        elif current is not None and not line.startswith((" ", "\t", "Shell command:")) and line.strip():
            current = None  # the group job's listing has ended
        elif current is not None:
            current.update(re.findall(r"wildcards:.*?subject=(\w+)", line))
    return jobs


def _dry_run(tmp_path: Path, profile: dict, configfile: Path) -> str:
    profile_dir = tmp_path / "profile"
    profile_dir.mkdir(exist_ok=True)
    (profile_dir / "config.yaml").write_text(yaml.safe_dump(profile))
    dry = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(SNAKEFILE), "--directory", str(tmp_path),
         "--configfile", str(configfile), "--profile", str(profile_dir)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, stdin=subprocess.DEVNULL,
    )
    text = dry.stdout + dry.stderr
    assert dry.returncode == 0, text[-3000:]
    return text


def test_slurm_profile_dry_run_groups(tmp_path):
    """With profiles/slurm, Snakemake builds the job groups for the demo config without a cycle
    (a rule joined to a group must not need a cohort-wide output of that same group): one job per
    scan or subject and group, a subject's whole per-scan chain in one; with group-components
    raised, one job carries several subjects."""
    real = derive_test_profile(_real_profile())
    jobs = _group_jobs(_dry_run(tmp_path, real, REPO / "config.yaml"))
    assert set(jobs) == set(real["group-components"]), f"group jobs planned: {sorted(jobs)}"
    for group, subjects in jobs.items():
        assert all(len(s) == 1 for s in subjects), f"{group}: a job mixes subjects {subjects}"
    # A subject's sessions are linked by its longitudinal registration: one job for all of them.
    assert len(jobs["subject"]) == len({next(iter(s)) for s in jobs["subject"]}) > 2, jobs["subject"]
    packed = dict(real, **{"group-components": {group: 2 for group in real["group-components"]}})
    jobs = _group_jobs(_dry_run(tmp_path, packed, REPO / "config.yaml"))
    assert max(len(s) for s in jobs["subject"]) == 2, f"group-components 2 did not pack: {jobs['subject']}"


@pytest.mark.slow
def test_workflow_on_slurm(slurm_cluster: SlurmCluster, tmp_path: Path):
    """The tiny cohort runs end to end as SLURM jobs, and the cluster then stops cleanly."""
    assert SNAKEFILE.exists() and TINY_CONFIG.exists(), "needs Snakefile and tests/config_tiny.yaml"
    workdir = tmp_path / "run"
    workdir.mkdir()
    profile_dir = tmp_path / "profile"
    profile_dir.mkdir()
    (profile_dir / "config.yaml").write_text(yaml.safe_dump(derive_test_profile(_real_profile()), sort_keys=False))
    overrides = tmp_path / "slurm_overrides.yaml"  # merged over tests/config_tiny.yaml
    overrides.write_text(yaml.safe_dump(SLURM_CONFIG_OVERRIDES))
    log_path = tmp_path / "snakemake.log"
    cmd = [
        "timeout", "-k", "15", str(WORKFLOW_TIMEOUT),
        sys.executable, "-m", "snakemake",
        "-s", str(SNAKEFILE), "--directory", str(workdir),
        "--configfile", str(TINY_CONFIG), str(overrides),
        "--profile", str(profile_dir),
    ]
    with open(log_path, "w") as log:
        result = subprocess.run(
            cmd, cwd=workdir, env=slurm_cluster.env(), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, timeout=WORKFLOW_TIMEOUT + 60,
        )
    log_text = log_path.read_text(errors="replace")
    slurm_logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    if result.returncode != 0:
        failed = [p for p in slurm_logs if re.search(r"^(Error|WorkflowError)", _tail(p, 20000), flags=re.M)]
        job_logs = "\n".join(f"--- {p}\n{_tail(p, 2000)}" for p in (failed or slurm_logs)[-3:])
        pytest.fail(
            f"snakemake on SLURM exited {result.returncode} "
            f"({'timed out' if result.returncode == 124 else 'failed'}):\n{log_text[-6000:]}\n{job_logs}"
        )

    # The jobs went through SLURM: ids in the log, one log file per id, and the controller
    # remembers each of them as COMPLETED.
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", log_text)
    assert job_ids, f"no SLURM job ids in the snakemake log:\n{log_text[-3000:]}"
    logged_ids = {p.stem for p in slurm_logs}
    assert set(job_ids) <= logged_ids, f"SLURM logs missing for jobs {sorted(set(job_ids) - logged_ids)}"
    for job_id in job_ids:
        assert "JobState=COMPLETED" in slurm_cluster.scontrol_job(job_id), f"SLURM job {job_id} did not complete"
    # A subject's chain (all its sessions: preprocessing, registration, longitudinal) ran inside
    # one SLURM job of its own (group-components 1, as in profiles/slurm; packing is checked by
    # the dry run above).
    subject_jobs: dict[str, set[str]] = {}
    for job_log in slurm_logs:
        group = job_log.parent.name
        if group.startswith("group_subject_") and not group.startswith("group_subject_atlas_"):
            for subject, rules in _rules_by_subject(job_log).items():
                assert {"reorient", "register_template"} <= rules, f"sub-{subject} chain split: {rules}"
                subject_jobs.setdefault(subject, set()).add(job_log.stem)
    subjects = {d.name.removeprefix("sub-") for d in (workdir / "results").glob("sub-*") if d.is_dir()}
    assert subjects and set(subject_jobs) == subjects, f"grouped subjects {sorted(subject_jobs)} vs {sorted(subjects)}"
    assert all(len(jobs) == 1 for jobs in subject_jobs.values()), f"a subject spread over jobs: {subject_jobs}"
    assert len({next(iter(jobs)) for jobs in subject_jobs.values()}) == len(subject_jobs), f"subjects share a job: {subject_jobs}"

    # The outputs exist and hold images; a dry run afterwards finds nothing left to do.
    results = workdir / "results"
    warped = sorted(results.rglob("*_space-template_desc-warped_T1w.nii.gz"))
    preproc = sorted(results.rglob("*_desc-preproc_T1w.nii.gz"))
    assert preproc and len(warped) == len(preproc), f"preproc {len(preproc)}, warped {len(warped)}"
    atlas = sorted((results / "atlas").glob("*_T1w.nii.gz"))
    assert atlas, "no atlas image in results/atlas"
    for path in warped + atlas:
        data = np.asarray(nib.load(path).dataobj)
        assert data.ndim == 3 and np.isfinite(data).all() and data.std() > 0, f"{path.name} is not a usable image"
    dry = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(SNAKEFILE), "--directory", str(workdir),
         "--configfile", str(TINY_CONFIG), str(overrides),
         "--workflow-profile", "none", "--cores", "1"],
        capture_output=True, text=True, timeout=300, env=slurm_cluster.env(), cwd=workdir,
        stdin=subprocess.DEVNULL,
    )
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, (
        f"targets left after the SLURM run:\n{(dry.stdout + dry.stderr)[-3000:]}"
    )

    # Teardown leaves nothing: no daemon or job step of this cluster, no /etc/slurm symlink.
    down = slurm_cluster.down()
    assert down.returncode == 0, f"slurm-down.sh: {down.stdout}\n{down.stderr}"
    assert _cluster_processes(slurm_cluster.conf) == []
    assert not (os.path.islink("/etc/slurm/slurm.conf")
                and os.readlink("/etc/slurm/slurm.conf") == str(slurm_cluster.conf))
    assert "SLURM_CONF" not in os.environ or os.environ["SLURM_CONF"] != str(slurm_cluster.conf)
