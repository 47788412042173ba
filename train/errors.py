"""The trainer's user-facing failures: the entry point prints each as one line and exits 1."""

from __future__ import annotations

from oistream import OistreamError
from oistream import one_line as _oistream_one_line


class TrainError(Exception):
    """Bad input the user can fix (missing shards, mismatched checkpoint, offline weights).

    ``python -m train`` prints ``str(error)`` alone on stderr and exits 1; any other failure is
    described in one line by ``one_line`` (``--debug`` shows its traceback).
    """


def one_line(error: BaseException) -> str:
    """A failure as one line: ours as they are, the libraries' with what the user can do."""
    if isinstance(error, TrainError | OistreamError):
        return _oistream_one_line(error, with_type=False)
    text = _oistream_one_line(error, with_type=False)
    name = type(error).__name__
    if "OutOfMemoryError" in name or "out of memory" in text.lower():
        return (
            "out of memory on the device: lower --batch-size, --max-size/--min-size, "
            "--rpn-samples or --roi-samples, or use --amp bf16"
        )
    module = type(error).__module__ or ""
    storage = module.startswith(("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec"))
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"storage refused access ({name}): {text[:300]} (check credentials and the bucket)"
    if storage or isinstance(error, ConnectionError | TimeoutError):
        return f"storage unreachable or failing ({name}): {text[:300]} (check --endpoint-url)"
    if isinstance(error, OSError):
        return f"{name}: {text[:300]}"
    return f"{name}: {text[:300]} (a bug? rerun with --debug for the traceback)"
