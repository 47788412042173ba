"""The trainer's user-facing failure: the entry point prints it as one line and exits 1."""


class TrainError(Exception):
    """Bad input the user can fix (missing shards, mismatched checkpoint, offline weights).

    ``python -m train`` prints ``str(error)`` alone on stderr and exits 1; anything else is a bug
    and keeps its traceback.
    """
