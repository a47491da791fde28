"""The job's side of the warm command server (:mod:`atlasflow.runtime.forkserver`): hand an
``atlasflow`` command line to the run's server, or say that the job must run it itself.

``python -m atlasflow`` (what the rules' ``atlasflow`` shell function runs) calls :func:`handoff`
before it imports anything heavy. In a local run with ``warm_commands`` on, the workflow names its
own process in ``ATLASFLOW_COMMANDS`` (``host:pid``); the job then connects to the server of that
run (starting it if it is not up), passes its argument list, working folder, environment and its
own stdin/stdout/stderr (``SCM_RIGHTS``: the child writes to the job's log as the job would), and
exits with the child's exit code. If the job is killed, its connection closes and the server kills
the child. Anything else (no variable, another host, the run gone, no server, the server dying
mid-command) returns None: the job runs the command in its own process, as without the server.

Only the standard library is imported here: this runs at the start of every job.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

from atlasflow.runtime.server import (
    WARM_COMMANDS,
    _alive,
    _connect,
    _stamp,
    command_of,
    private_folder,
    start_server,
)

ENV = "ATLASFLOW_COMMANDS"
START_TIMEOUT = 60.0
# The environment that shapes what the server imported and how its libraries' thread pools are
# sized: jobs that differ here get a server of their own, so a child computes as the job would.
KEY_ENV = (
    "PYTHONPATH",
    "PYTHONHASHSEED",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
    "CUDA_VISIBLE_DEVICES",
)
HEADER = struct.Struct("!I")


def enable(pid: int | None = None) -> None:
    """Let the ``atlasflow`` commands started from this process (``pid``) use a warm server."""
    os.environ[ENV] = f"{socket.gethostname()}:{pid or os.getpid()}"


def owner(env: str = ENV) -> int | None:
    """The process whose run may use a server here, if any (same host, still alive)."""
    host, _, pid = os.environ.get(env, "").rpartition(":")
    if not pid.isdigit() or host != socket.gethostname():
        return None
    return int(pid) if _alive(int(pid)) else None


def address() -> Path:
    """The socket of the server for this run, this code (and interpreter) and this environment
    (short: AF_UNIX paths are limited to ~100 bytes), in a folder only this user can open."""
    key = repr((os.environ.get(ENV), _stamp(), [os.environ.get(k) for k in KEY_ENV])).encode()
    return private_folder() / f"c{hashlib.sha1(key).hexdigest()[:16]}.sock"


def send_request(conn: socket.socket, request: dict, fds: Sequence[int]) -> None:
    """One request: its length, then its JSON; the file descriptors ride on the first bytes."""
    data = json.dumps(request).encode()
    message = HEADER.pack(len(data)) + data
    sent = socket.send_fds(conn, [message[:4096]], list(fds))
    conn.sendall(message[sent:])


def handoff(argv: Sequence[str], env: str = ENV) -> int | None:
    """Run ``atlasflow argv`` in this run's warm server; its exit code, or None when the job must
    run the command itself."""
    run = owner(env)
    if run is None or command_of(argv)[0] in WARM_COMMANDS:
        return None  # the atlas steps have their own engine (atlasflow.runtime.server)
    try:
        path = address()
        conn = _connect(path) or start_server(
            path, "atlasflow.runtime.forkserver", str(run), poll=0.02, timeout=START_TIMEOUT
        )
        if conn is None:
            return None
        with conn:
            request = {
                "argv": [str(a) for a in argv],
                "argv0": sys.argv[0],
                "cwd": os.getcwd(),
                "env": dict(os.environ),
            }
            send_request(conn, request, [0, 1, 2])
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    return None  # the server died: the child died with it; run it here
                reply += chunk
    except OSError:
        return None
    code = json.loads(reply).get("code")
    return None if code is None else int(code)
