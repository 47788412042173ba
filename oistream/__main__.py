"""``python -m oistream`` and the ``oistream`` command: ``cli.run``, once its modules are loaded.

Loading them takes 0.1-0.3 s (fsspec, argparse, the command's own modules); a Ctrl-C in that
time would otherwise end in the interpreter's traceback. Nothing has been done yet, so it gets
the one line and the exit status of any other interrupted command.
"""

from __future__ import annotations

import sys

from oistream.exiting import EXIT_INTERRUPTED


def main() -> None:
    """Import the command line, then run it; interrupted while importing: one line, and
    ``EXIT_INTERRUPTED``."""
    try:
        from oistream.cli import run
    except KeyboardInterrupt:
        print("oistream: interrupted while starting; nothing was done", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    run()


if __name__ == "__main__":
    main()
