"""The user-facing exception type and the one formatter that turns any error into one line."""

from __future__ import annotations

# Long enough for a URL and a reason, short enough to stay one terminal line or two.
MAX_LINE = 300


class OistreamError(Exception):
    """A user-facing failure: bad input, an unreachable source, an unknown class.

    The CLI prints ``str(error)`` alone and exits non-zero; anything else is a bug and keeps its
    traceback (with ``OISTREAM_DEBUG=1``).
    """


def one_line(error: BaseException, *, with_type: bool = True) -> str:
    """``error`` as one line: its message's first line, whitespace collapsed, capped.

    The exception's type name goes first (``TimeoutError: ...``) unless ``with_type`` is False
    or the error is an ``OistreamError``, whose message is already written for the user; an
    error with no message is its type name alone.
    """
    lines = str(error).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else ""
    if len(text) > MAX_LINE:
        text = text[: MAX_LINE - 1] + "…"
    if isinstance(error, OistreamError) or not with_type:
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def storage_reason(error: BaseException) -> str:
    """Why the storage layer failed, for a one-line message: "not found"; a time-out (a server
    that stopped sending, or never answered, for ``--read-timeout``) said to be transient,
    since fsspec's FSTimeoutError carries no message; else ``one_line(error)``."""
    if isinstance(error, FileNotFoundError):
        return "not found"
    if isinstance(error, TimeoutError):
        return "timed out (the server stopped sending); rerun the same command"
    return one_line(error)
