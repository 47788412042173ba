"""How the ``oistream`` command leaves: its exit statuses, and fast once its work is done and its
files are closed."""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_USAGE", "leave_now"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def leave_now(code: int) -> NoReturn:
    """Exit with ``code`` after the ``atexit`` handlers and a flush of stdout and stderr, but
    without the interpreter's teardown of every module (``oistream.cli.run`` says why)."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            code = code or 1
    os._exit(code)
