"""The warm command server: a job's command runs in a forked child with the job's folder,
environment and log, and its exit code; jobs run side by side; a killed job stops its child; every
way of not reaching the server falls back to the job's own process."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from atlasflow.runtime import client

SRC = Path(client.__file__).resolve().parents[2]

# A server whose children run a stand-in for atlasflow.cli.main.main (no preload: fast to start):
# "echo" writes to stdout and stderr and returns 3, "sleep S" sleeps, "kill-server" kills it.
FAKE_SERVER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    import atlasflow.cli.main as cli
    from atlasflow.runtime import client, forkserver

    def main(argv):
        if argv[0] == "echo":
            print("out", os.getpid(), os.getcwd(), os.environ.get("JOB_VAR"), sys.argv[1:])
            print("err", file=sys.stderr)
            return 3
        if argv[0] == "sleep":
            Path(argv[2]).write_text(str(os.getpid()))
            time.sleep(float(argv[1]))
            return 0
        os.kill(os.getppid(), signal.SIGKILL)  # any other command: the server dies
        time.sleep(5)
        return 0

    cli.main = main
    path = client.address()
    forkserver.Server(path, int(sys.argv[1]), idle=30).serve()
    """
)


@pytest.fixture
def owner():
    """A stand-in for the Snakemake process of a run."""
    process = subprocess.Popen(["sleep", "300"])
    yield process
    process.kill()
    process.wait()


@pytest.fixture
def env(owner, tmp_path):
    """The environment of the run's jobs, naming the run's process as the workflow does."""
    env = dict(os.environ, PYTHONPATH=str(SRC), TMPDIR=str(tmp_path))
    env[client.ENV] = f"{socket.gethostname()}:{owner.pid}"
    return env


@pytest.fixture
def fake_server(env, tmp_path):
    """The stand-in server, up and listening at the address the jobs compute."""
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    run = env[client.ENV].rpartition(":")[2]
    process = subprocess.Popen([sys.executable, str(script), run], env=env)
    folder = tmp_path / f"atlasflow-{os.getuid()}"
    deadline = time.monotonic() + 20
    while not list(folder.glob("c*.sock")) and time.monotonic() < deadline:
        time.sleep(0.02)
    yield process
    process.kill()
    process.wait()


def job(args, env, cwd, log):
    """``atlasflow args > log 2>&1`` as a rule runs it."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "atlasflow", *args], env=env, cwd=cwd, stdout=out, stderr=out
        )


def test_command_runs_in_the_server_with_the_jobs_folder_env_and_log(fake_server, env, tmp_path):
    env = dict(env, JOB_VAR="from-the-job")
    process = job(["echo", "a b"], env, tmp_path, tmp_path / "job.log")
    assert process.wait(timeout=20) == 3
    out, err = (tmp_path / "job.log").read_text().splitlines()
    word, pid, cwd, var, argv = out.split(" ", 4)
    assert (word, cwd, var, argv) == ("out", str(tmp_path), "from-the-job", "['echo', 'a b']")
    assert int(pid) != process.pid  # it ran in a child of the server
    assert err == "err"


def test_jobs_run_side_by_side(fake_server, env, tmp_path):
    start = time.monotonic()
    jobs = [
        job(["sleep", "1.5", str(tmp_path / f"{i}.pid")], env, tmp_path, tmp_path / f"{i}.log")
        for i in range(2)
    ]
    assert [p.wait(timeout=20) for p in jobs] == [0, 0]
    assert time.monotonic() - start < 2.7  # one after the other would take 3 s


def test_a_killed_job_stops_its_child(fake_server, env, tmp_path):
    pidfile = tmp_path / "child.pid"
    process = job(["sleep", "60", str(pidfile)], env, tmp_path, tmp_path / "job.log")
    deadline = time.monotonic() + 20
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child = int(pidfile.read_text())
    process.send_signal(signal.SIGTERM)  # as Snakemake cancels a job
    process.wait(timeout=5)
    deadline = time.monotonic() + 5
    while _running(child):
        assert time.monotonic() < deadline, "the child outlived its job"
        time.sleep(0.05)
    assert fake_server.poll() is None  # the server itself carries on


def _running(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_server_that_dies_mid_command_leaves_it_to_the_job(fake_server, env, tmp_path):
    # "validate --help" kills the stand-in server; the job then runs the real command itself.
    process = job(["validate", "--help"], env, tmp_path, tmp_path / "job.log")
    assert process.wait(timeout=20) == 0
    assert "usage: atlasflow validate" in (tmp_path / "job.log").read_text()
    assert fake_server.wait(timeout=5) == -signal.SIGKILL


def test_no_run_no_server(monkeypatch, tmp_path):
    monkeypatch.delenv(client.ENV, raising=False)
    assert client.handoff(["preprocess", "reorient"]) is None
    dead = subprocess.Popen(["true"])
    dead.wait()
    monkeypatch.setenv(client.ENV, f"{socket.gethostname()}:{dead.pid}")  # the run is over
    assert client.handoff(["preprocess", "reorient"]) is None
    monkeypatch.setenv(client.ENV, f"elsewhere:{os.getpid()}")  # a cluster node
    assert client.handoff(["preprocess", "reorient"]) is None


def test_the_real_server_gives_the_jobs_bytes_and_ends_with_the_run(owner, env, tmp_path):
    """First job starts the server (imports once), the next finds it; both logs match a job run
    without it; the server and its socket go when the run does."""
    logs = []
    for name in ("cold", "warm"):
        process = job(["nonsense"], env, tmp_path, tmp_path / f"{name}.log")
        assert process.wait(timeout=60) == 2  # argparse's usage error, as in the job
        logs.append((tmp_path / f"{name}.log").read_bytes())
    plain = dict(env)
    del plain[client.ENV]
    assert job(["nonsense"], plain, tmp_path, tmp_path / "plain.log").wait(timeout=60) == 2
    assert logs == [(tmp_path / "plain.log").read_bytes()] * 2
    folder = tmp_path / f"atlasflow-{os.getuid()}"
    assert list(folder.glob("c*.sock"))
    owner.kill()  # the run ends
    owner.wait()
    deadline = time.monotonic() + 5
    while list(folder.glob("c*.sock")):
        assert time.monotonic() < deadline, "the server outlived its run"
        time.sleep(0.05)
