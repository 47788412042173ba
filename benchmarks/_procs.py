"""Child processes of the benchmarks that die with them, and ports to find them on.

Everything listens on 127.0.0.1 only. ``raise_on_sigterm`` turns SIGTERM into
KeyboardInterrupt so ``with`` blocks stop their servers on it too; servers started here also get
SIGTERM when the benchmark is killed outright (Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the benchmark dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, alive: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server meant for port {port} exited")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def run_command(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``command`` to completion in its own process group, output captured.

    If we are interrupted (Ctrl-C, SIGTERM via ``raise_on_sigterm``) the whole group is killed:
    the command's worker processes too, which would otherwise be left waiting for work.
    """
    process = subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate()
    except BaseException:
        kill_group(process.pid)
        process.wait()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (one started with ``start_new_session``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def raise_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so ``with`` blocks stop their servers on it too."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
