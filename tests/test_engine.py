"""The warm engine: same bytes as running the command in the job, lifetime tied to the run, a
cancelled job leaves nothing behind, and every way of not reaching it falls back to the job."""

import signal
import socket
import subprocess
import sys
import time

import pytest
from factories import shifted_members

from atlasflow.runtime import server as engine


@pytest.fixture
def members(tmp_path):
    """A previous template and three members shifted along x (identity affines): the inputs of
    one ``atlas iteration``."""
    _, images, masks, affines = shifted_members(tmp_path, (2.0, 4.0, -1.0))
    return tmp_path, images, masks, affines


def iteration_argv(folder, images, masks, affines, out, refine=20, threads=2):
    return [
        "--threads", str(threads), "atlas", "iteration", "--iteration", "1",
        "--previous", str(folder / "prev.nii.gz"), "--mask", str(folder / "mask.nii.gz"),
        "--images", *images, "--masks", *masks, "--affines", *affines,
        "--backend", "deep", "--refine", str(refine), "--affine-steps", "0",
        "--output", str(out / "t.nii.gz"), "--out-metrics", str(out / "m.json"), "--out-members", str(out / "members.tsv"),
    ]


@pytest.fixture
def owner(monkeypatch):
    """A stand-in for the Snakemake process of a run, named in the environment as the workflow does."""
    process = subprocess.Popen(["sleep", "300"])
    monkeypatch.setenv(engine.ENV, f"{socket.gethostname()}:{process.pid}")
    yield process
    process.kill()
    process.wait()


def wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_command_of_reads_the_command_and_threads():
    assert engine.command_of(["--threads", "4", "atlas", "iteration", "--x"]) == (("atlas", "iteration"), 4)
    assert engine.command_of(["--on-scan-error", "skip", "atlas", "init"]) == (("atlas", "init"), 1)
    assert engine.command_of(["register", "--fixed", "f"])[0] == ("register", "--fixed")


def test_without_an_engine_for_this_run_the_job_runs_the_command(tmp_path, monkeypatch, members):
    folder, images, masks, affines = members
    argv = iteration_argv(folder, images, masks, affines, tmp_path / "out")
    monkeypatch.delenv(engine.ENV, raising=False)
    assert engine.submit(argv, tmp_path / "log") is None
    monkeypatch.setenv(engine.ENV, f"another-host:{subprocess.os.getpid()}")
    assert engine.submit(argv, tmp_path / "log") is None
    dead = subprocess.Popen(["true"])
    dead.wait()
    monkeypatch.setenv(engine.ENV, f"{socket.gethostname()}:{dead.pid}")
    assert engine.submit(argv, tmp_path / "log") is None
    monkeypatch.setenv(engine.ENV, f"{socket.gethostname()}:{subprocess.os.getpid()}")
    assert engine.submit(["atlas", "gather", "--metrics", "x", "--output", "y"], tmp_path / "log") is None
    # run() then runs it here: a usage error is an exit code and a line in the log, not a traceback.
    assert engine.run(["atlas", "iteration", "--no-such-flag"], tmp_path / "log") == 2
    assert "unrecognized arguments: --no-such-flag" in (tmp_path / "log").read_text()


def test_engine_gives_the_jobs_bytes_and_ends_with_its_run(tmp_path, members, owner):
    folder, images, masks, affines = members
    here = tmp_path / "here"
    assert engine._run_here(iteration_argv(folder, images, masks, affines, here), tmp_path / "here.log") == 0
    path = engine.address(owner.pid, 2)
    for name in ("warm1", "warm2"):  # the first call starts the server, the second finds it
        out = tmp_path / name
        assert engine.submit(iteration_argv(folder, images, masks, affines, out), tmp_path / f"{name}.log") == 0
        assert path.exists()
        assert (out / "t.nii.gz").read_bytes() == (here / "t.nii.gz").read_bytes()
        assert (out / "m.json").read_text() == (here / "m.json").read_text()
    # A user error comes back as the command's exit code and message, and the server stays.
    bad = iteration_argv(folder, [images[0], str(tmp_path / "missing.nii.gz")], masks[:2], affines[:2], tmp_path / "bad")
    assert engine.submit(bad, tmp_path / "bad.log") == 1
    assert "missing.nii.gz" in (tmp_path / "bad.log").read_text()
    assert not (tmp_path / "bad" / "t.nii.gz").exists()
    assert path.exists()
    owner.kill()
    owner.wait()  # reaped, as Snakemake's parent shell would
    assert wait_for(lambda: not path.exists(), 10), "the engine outlived its run"
    assert not path.with_suffix(".lock").exists() and not path.with_suffix(".log").exists()


def test_a_job_that_goes_away_cancels_its_command(tmp_path, members, owner):
    folder, images, masks, affines = members
    warm = tmp_path / "first"
    # Started as from a run in the background (nohup ... &): SIGINT arrives ignored.
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert engine.submit(iteration_argv(folder, images, masks, affines, warm, refine=0, threads=1), tmp_path / "a.log") == 0
    finally:
        signal.signal(signal.SIGINT, handler)
    # A long command (many refinement steps), its job killed once the server has started it.
    slow = tmp_path / "slow"
    argv = iteration_argv(folder, images, masks, affines, slow, refine=3000, threads=1)
    job = subprocess.Popen([sys.executable, "-c", f"from atlasflow.runtime.server import submit; submit({argv!r}, {str(tmp_path / 'slow.log')!r})"])
    assert wait_for(lambda: (tmp_path / "slow.log").exists())
    job.kill()
    job.wait()
    # The server stops it and steps down (its workers were busy with it); the next job starts a
    # fresh one. The cancelled command never writes its outputs.
    path = engine.address(owner.pid, 1)
    assert wait_for(lambda: not path.exists(), 20)
    again = tmp_path / "again"
    assert engine.submit(iteration_argv(folder, images, masks, affines, again, refine=0, threads=1), tmp_path / "b.log") == 0
    assert (again / "t.nii.gz").read_bytes() == (warm / "t.nii.gz").read_bytes()
    assert not (slow / "t.nii.gz").exists()
    assert "interrupted" in (tmp_path / "slow.log").read_text()


def test_a_cancel_before_the_command_handles_it_still_says_interrupted(tmp_path, monkeypatch):
    # The job's SIGINT can land while the command is still parsing its arguments, before the
    # command's own handler is in place: the log must say so all the same.
    from atlasflow.cli import main as cli
    def cancelled(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", cancelled)
    assert engine._run_here(["atlas", "iteration"], tmp_path / "log") == 130
    assert "atlasflow: interrupted" in (tmp_path / "log").read_text()
