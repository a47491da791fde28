"""Warm command server: one process per local Snakemake run that has imported the package and its
libraries once, and forks a child for every per-scan ``atlasflow`` command the run's jobs hand it.

A per-scan job (warp a label map, carry a contrast into template space) often computes for a
fraction of a second, after a Python start-up and ``import torch`` of 2-3 s of CPU. With
``warm_commands`` (local runs), the job's ``atlasflow`` is a small client
(:mod:`atlasflow.runtime.client`) that hands its command line here; the server forks, and the
child runs :func:`atlasflow.cli.main.main` exactly as the job would: in the job's folder, with
the job's environment, command line and stdin/stdout/stderr (passed over the socket), so the
outputs are byte-identical and the log is the same file. Concurrent jobs get concurrent
children: ``-c 2`` still runs two commands side by side.

What makes the fork safe: the server imports modules but computes nothing, so no OpenMP or torch
intra-op thread pool exists before a fork (threads do not survive one); it is single-threaded,
and every child sizes its own pools (``--threads``, or the environment, which is part of the
server's key: see :data:`atlasflow.runtime.client.KEY_ENV`). Heavy libraries that keep native
state from import on (antspyx/ITK) are left to the children that need them.

Lifetime: the server exits when the run's Snakemake process is gone or after ``IDLE_SECONDS``
without a command. A child is killed when its job's connection closes (the job was killed or
cancelled) and when the server dies (``PR_SET_PDEATHSIG``); the job then runs the command itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from atlasflow.runtime.client import HEADER
from atlasflow.runtime.server import _alive

IDLE_SECONDS = 60.0
# Imported before any fork: the modules of the per-scan commands and the libraries they share.
PRELOAD = (
    "numpy",
    "scipy.ndimage",
    "nibabel",
    "torch",
    "pandas",
    # antspyx (1.3-1.5 s an import) is left to the `registration.backend: ants` jobs that use it:
    # since N4 is atlasflow's own (preprocess.n4) no per-scan command of the default workflow does
    "atlasflow.cli.main",
    "atlasflow.cli.commands",
    "atlasflow.cli.steps",
    "atlasflow.contrasts.commands",
    "atlasflow.preprocess.steps",
    "atlasflow.registration.api",
    "atlasflow.reports.report",
    "atlasflow.runtime.provenance",
)


def preload() -> None:
    """Import what the commands share (a module that is missing or fails is left to the child)."""
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """One request and the file descriptors that came with it (see ``client.send_request``)."""
    data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
    if len(data) < HEADER.size:
        raise ConnectionError("no request")
    (size,) = HEADER.unpack_from(data)
    data = data[HEADER.size :]
    while len(data) < size:
        chunk = conn.recv(max(65536, size - len(data)))
        if not chunk:
            raise ConnectionError("request cut short")
        data += chunk
    return json.loads(data), fds


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the server does (no orphan keeps writing)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(137)


def run_child(request: dict, fds: list[int]) -> int:
    """In the forked child: become the job's process and run its command; the exit code."""
    os.setpgid(0, 0)  # its own group: killing it kills what it starts
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["argv0"], *request["argv"]]
    from atlasflow.cli.main import main

    try:
        code = main(request["argv"])
    except SystemExit as exc:  # argparse: usage errors (2), --help (0)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print("atlasflow: interrupted", file=sys.stderr)
        code = 130
    except BaseException:  # as Python reports an uncaught exception
        traceback.print_exc()
        code = 1
    return int(code or 0)


class Server:
    """The accept loop and the children in flight (one selector, no threads: fork-safe)."""

    def __init__(self, path: Path, owner: int, idle: float = IDLE_SECONDS) -> None:
        self.path, self.owner, self.idle = path, owner, idle
        self.selector = selectors.DefaultSelector()
        self.jobs: dict[int, tuple[socket.socket, int | None]] = {}  # pid -> (conn, pidfd)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.selector.register(self.listener, selectors.EVENT_READ, ("accept", 0))

    def serve(self) -> None:
        last = time.monotonic()
        try:
            while _alive(self.owner) and (self.jobs or time.monotonic() - last < self.idle):
                polled = any(pidfd is None for _, pidfd in self.jobs.values())
                for key, _ in self.selector.select(timeout=0.02 if polled else 1.0):
                    kind, pid = key.data
                    if kind == "accept":
                        self._accept()
                    elif kind == "gone":  # the job closed its end before the child finished
                        self._unregister(key.fileobj)
                        for kill, target in ((os.killpg, pid), (os.kill, pid)):
                            with contextlib.suppress(ProcessLookupError):
                                kill(target, signal.SIGTERM)
                self._reap()
                if self.jobs:
                    last = time.monotonic()
        finally:
            self.close()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            conn.settimeout(10.0)
            request, fds = receive_request(conn)
        except (OSError, ValueError):
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the loop
            code = 70
            try:
                self.selector.close()
                self.listener.close()
                for other, pidfd in self.jobs.values():
                    other.close()
                    if pidfd is not None:
                        os.close(pidfd)
                conn.close()
                code = run_child(request, fds)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # (the child does it too: whichever runs first)
        for fd in fds:
            os.close(fd)
        conn.setblocking(False)
        self.selector.register(conn, selectors.EVENT_READ, ("gone", pid))
        pidfd = None
        with contextlib.suppress(AttributeError, OSError):
            pidfd = os.pidfd_open(pid)
            self.selector.register(pidfd, selectors.EVENT_READ, ("exit", pid))
        self.jobs[pid] = (conn, pidfd)

    def _unregister(self, fileobj: object) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fileobj)

    def _reap(self) -> None:
        """Answer the jobs whose child has exited: its exit code (128 + signal if killed)."""
        for pid in list(self.jobs):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            code = os.waitstatus_to_exitcode(status)
            conn, pidfd = self.jobs.pop(pid)
            self._unregister(conn)
            if pidfd is not None:
                self._unregister(pidfd)
                os.close(pidfd)
            with contextlib.suppress(OSError):
                conn.setblocking(True)
                conn.sendall(
                    json.dumps({"code": code if code >= 0 else 128 - code}).encode() + b"\n"
                )
            conn.close()

    def close(self) -> None:
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        for leftover in (self.path.with_suffix(".lock"), self.path.with_suffix(".log")):
            with contextlib.suppress(FileNotFoundError):
                if leftover.stat().st_size == 0:
                    leftover.unlink()
        for pid, (conn, _) in self.jobs.items():  # the run is gone: so are its jobs
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            conn.close()
        self.selector.close()


def serve(path: Path, owner: int, idle: float = IDLE_SECONDS) -> None:
    """Answer commands on ``path`` until ``owner`` is gone or ``idle`` seconds pass without one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the jobs, not their server
    preload()
    Server(path, owner, idle).serve()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
