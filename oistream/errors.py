"""The one exception type that the command line turns into a single line on stderr."""


class OistreamError(Exception):
    """A user-facing failure: bad input, an unreachable source, an unknown class.

    The CLI prints ``str(error)`` alone and exits non-zero; anything else is a bug and keeps its
    traceback.
    """
