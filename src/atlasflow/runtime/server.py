"""Warm engine: one server per local Snakemake run that keeps torch, the network weights and the
member workers of the atlas jobs alive from one job to the next.

Every atlas job (``atlas init``, one ``atlas iteration`` per iteration, ``atlas register``) otherwise starts a
Python process, imports torch (~1.5 s), forks its workers, loads the weights into each and runs a
first, slow network pass (~0.4 s), then tears it all down (~0.5 s): on 10 IXI members that is
about 3 s of a 7.5 s iteration job. With the engine, the first atlas job of a run starts a server
process; that job and the later ones hand it their command and wait for its exit code. The
server runs the command exactly as the job would have (same code, one torch thread per worker),
so the outputs are byte-identical either way.

Scope and safety:

- Only the jobs of one local Snakemake run use it: the workflow names its own process in
  ``ATLASFLOW_ENGINE`` (``host:pid``); on another host (a cluster node) or without the variable,
  commands run in the job's own process as before.
- The server exits when that Snakemake process is gone, after ``IDLE_SECONDS`` without work, or
  after a request it could not run cleanly. Its socket sits in a folder only its user can open.
- If the job is killed while the server works for it (Ctrl-C, a cancelled run), the server stops
  that command: outputs are written only at the end, atomically, so nothing partial is left.
- Any trouble reaching the server (it failed to start, died, the key changed) and the job just
  runs the command itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

ENV = "ATLASFLOW_ENGINE"
# Commands that register many members and so gain from warm workers.
WARM_COMMANDS = {("atlas", "init"), ("atlas", "iteration"), ("atlas", "register")}
IDLE_SECONDS = 60.0
START_TIMEOUT = 120.0
_GLOBAL_OPTIONS = {"--threads", "--on-scan-error"}


def enable(pid: int | None = None) -> None:
    """Let the ``atlasflow`` commands started from this process (``pid``) use a warm engine."""
    os.environ[ENV] = f"{socket.gethostname()}:{pid or os.getpid()}"


def _owner() -> int | None:
    """The process whose run may use an engine here, if any (same host, still alive)."""
    value = os.environ.get(ENV, "")
    host, _, pid = value.rpartition(":")
    if not pid.isdigit() or host != socket.gethostname():
        return None
    return int(pid) if _alive(int(pid)) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def command_of(argv: Sequence[str]) -> tuple[tuple[str, str], int]:
    """``((command, step), threads)`` of an ``atlasflow`` argument list, without importing the CLI."""
    tokens, threads, i = [str(a) for a in argv], 1, 0
    while i < len(tokens) and tokens[i] in _GLOBAL_OPTIONS:
        if tokens[i] == "--threads" and i + 1 < len(tokens) and tokens[i + 1].isdigit():
            threads = int(tokens[i + 1])
        i += 2
    words = tokens[i : i + 2] + ["", ""]
    return (words[0], words[1]), max(1, threads)


def _stamp() -> str:
    """Changes whenever the installed package's code does: a server never runs stale code."""
    package = Path(__file__).resolve().parents[1]
    times = sorted((str(p), p.stat().st_mtime_ns) for p in package.rglob("*.py"))
    return hashlib.sha1(repr((sys.executable, times)).encode()).hexdigest()[:12]


def private_folder() -> Path:
    """Where the engines' sockets live: a folder of the temporary directory only this user opens."""
    folder = Path(tempfile.gettempdir()) / f"atlasflow-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def address(owner: int, workers: int) -> Path:
    """The socket of the engine for ``owner``'s run with ``workers`` workers (short: AF_UNIX paths
    are limited to ~100 bytes)."""
    key = hashlib.sha1(f"{os.environ.get(ENV)}|{_stamp()}|{workers}".encode()).hexdigest()[:16]
    return private_folder() / f"{key}.sock"


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


def start_server(
    path: Path, module: str, *args: str, poll: float = 0.05, timeout: float = START_TIMEOUT
) -> socket.socket | None:
    """Start ``python -m module path *args`` (a server listening on ``path``) unless one already
    answers there, and wait until it does; None if it does not come up. One starter per socket
    (a file lock): the other jobs wait and connect to the one it started."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(path)
        if conn is not None:
            return conn
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with open(path.with_suffix(".log"), "a") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", module, str(path), *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and server.poll() is None:
            conn = _connect(path)
            if conn is not None:
                return conn
            time.sleep(poll)
        if server.poll() is None:
            server.kill()
        return None


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _receive(conn: socket.socket) -> dict | None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


def submit(argv: Sequence[str], log: str | os.PathLike) -> int | None:
    """Run ``atlasflow argv`` (output to ``log``) in this run's warm engine, starting it if need
    be. Returns the exit code, or None when there is no engine to use (run it yourself)."""
    command, workers = command_of(argv)
    owner = _owner()
    if command not in WARM_COMMANDS or owner is None:
        return None
    try:
        path = address(owner, workers)
        conn = _connect(path) or start_server(path, "atlasflow.runtime.server", str(owner), str(workers))
        if conn is None:
            return None
        with conn:
            _send(conn, {
                "argv": [str(a) for a in argv],
                "log": str(Path(log).resolve()),
                "cwd": os.getcwd(),
                "env": {k: v for k, v in os.environ.items() if k.startswith("ATLASFLOW_")},
            })
            reply = _receive(conn)
    except OSError:
        return None
    # No reply: the server died mid-command (nothing was written); the job runs it itself.
    return None if reply is None else int(reply["code"])


def run(argv: Sequence[str], log: str | os.PathLike) -> int:
    """``atlasflow argv`` with stdout and stderr in ``log``: in the warm engine when there is one
    for this command, else in this process."""
    code = submit(argv, log)
    if code is not None:
        return code
    return _run_here(argv, log)


def _run_here(argv: Sequence[str], log: str | os.PathLike) -> int:
    from atlasflow.cli.main import main

    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            return main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's usage errors
            return exc.code if isinstance(exc.code, int) else 1
        except KeyboardInterrupt:  # a cancel that came before main's own handler was in place
            print("atlasflow: interrupted", file=sys.stderr)
            return 130


# ------------------------------------------------------------------------------------ server


class _Watch:
    """Stops the command if its job goes away (the job's end of the connection closes before a
    reply was sent): a real SIGINT, so that the main thread's wait for the workers is interrupted
    too, and the command ends as on Ctrl-C."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.lock, self.done, self.cancelled = conn, threading.Lock(), False, False
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        import signal

        with contextlib.suppress(OSError):
            while self.conn.recv(1):
                pass
        with self.lock:
            if not self.done:
                self.cancelled = True
                os.kill(os.getpid(), signal.SIGINT)

    def finish(self) -> bool:
        """Mark the command finished; False if it was cancelled."""
        with self.lock:
            self.done = True
            return not self.cancelled


def _execute(request: dict) -> tuple[int, bool]:
    """Run one request's command as its job would; (exit code, whether the server stays usable)."""
    os.chdir(request["cwd"])
    os.environ.update(request["env"])
    try:
        return _run_here(request["argv"], request["log"]), True
    except Exception:
        with open(request["log"], "a") as out:
            traceback.print_exc(file=out)
        return 1, False


def serve(path: Path, owner: int, workers: int, idle: float = IDLE_SECONDS) -> None:
    """Answer commands on ``path`` until ``owner`` is gone, ``idle`` seconds pass without one, a
    command fails unexpectedly (a worker may have died) or is cancelled (its workers may still be
    busy with it). The next job then starts a fresh server."""
    import multiprocessing
    import signal

    # imported once, before the workers fork
    import atlasflow.atlas.build as atlas
    import atlasflow.cli.main as cli
    import atlasflow.registration.api as register  # noqa: F401
    import atlasflow.registration.engine as deep
    import atlasflow.transforms  # noqa: F401

    # A run started in the background (nohup, &) passes SIGINT on as ignored; _Watch needs it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli.limit_threads(workers)
    # Loaded before the workers fork, so each starts with the shipped weights in memory.
    if deep.DEFAULT_MODEL.exists():
        deep.get_model(None, "cpu")
    pool = atlas.member_pool(workers)
    list(pool.map(atlas.worker_init, [1] * workers))  # fork and start them now, not in the first job
    atlas.use_pool(pool)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    listener.settimeout(1.0)
    last = time.monotonic()
    healthy = True
    try:
        while healthy and _alive(owner) and time.monotonic() - last < idle:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                request = _receive(conn)
                if request is None:
                    continue
                watch = _Watch(conn)
                try:
                    code, healthy = _execute(request)
                    if watch.finish():
                        with contextlib.suppress(OSError):
                            _send(conn, {"code": code})
                    else:
                        healthy = False
                except KeyboardInterrupt:  # the job went away (see _Watch) before its log was open
                    healthy = False
                    with contextlib.suppress(OSError), open(request["log"], "a") as out:
                        print("atlasflow: interrupted", file=out)
            last = time.monotonic()
    finally:
        listener.close()
        # The socket, and its lock and log files unless something was logged: no clutter per run.
        for leftover in (path, path.with_suffix(".lock"), path.with_suffix(".log")):
            with contextlib.suppress(FileNotFoundError):
                if leftover == path or leftover.stat().st_size == 0:
                    leftover.unlink()
        atlas.use_pool(None)
        pool.shutdown(wait=False, cancel_futures=True)
        for child in multiprocessing.active_children():
            child.kill()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    os._exit(0)  # the workers are gone; skip joining the pool's threads
