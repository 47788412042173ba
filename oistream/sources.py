"""Where Open Images lives, and how to open any of its locations through fsspec.

This is the only module that knows the real public locations (DESIGN section 2). Everything
else takes two roots — ``images`` and ``metadata`` — and asks here for the URL of a file.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec

SPLITS = ("train", "validation", "test")
MASK_PREFIXES = "0123456789abcdef"

DEFAULT_IMAGES = "s3://open-images-dataset"
DEFAULT_METADATA = "https://storage.googleapis.com/openimages"
# Environment variables that replace the two defaults, so a mirror is named once per shell.
IMAGES_VARIABLE = "OISTREAM_IMAGES"
METADATA_VARIABLE = "OISTREAM_METADATA"

# botocore's pool defaults to 10 connections; the fetcher keeps hundreds of requests in flight.
DEFAULT_POOL_CONNECTIONS = 512

_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


def default_images() -> str:
    """The images root: ``$OISTREAM_IMAGES`` if set, else the public bucket."""
    return os.environ.get(IMAGES_VARIABLE) or DEFAULT_IMAGES


def default_metadata() -> str:
    """The metadata root: ``$OISTREAM_METADATA`` if set, else Google's public copy."""
    return os.environ.get(METADATA_VARIABLE) or DEFAULT_METADATA


def image_url(images_root: str, split: str, image_id: str) -> str:
    return f"{images_root.rstrip('/')}/{split}/{image_id}.jpg"


def mask_zip_prefix(mask_path: str) -> str:
    """Which zip holds the mask: a MaskPath starts with its ImageID, whose first hex digit
    names the zip (``mask_zip_url``'s ``prefix``)."""
    return mask_path[:1]


def mask_zip_url(metadata_root: str, split: str, prefix: str) -> str:
    return f"{metadata_root.rstrip('/')}/v5/{split}-masks/{split}-masks-{prefix}.zip"


def segmentation_csv_url(metadata_root: str, split: str) -> str:
    return f"{metadata_root.rstrip('/')}/v5/{split}-annotations-object-segmentation.csv"


def segmentable_classes_url(metadata_root: str) -> str:
    return f"{metadata_root.rstrip('/')}/v5/classes-segmentation.txt"


def class_descriptions_url(metadata_root: str) -> str:
    return f"{metadata_root.rstrip('/')}/v7/oidv7-class-descriptions-boxable.csv"


def v5_class_descriptions_url(metadata_root: str) -> str:
    """V5's class list: the same content as V7's but without a header line."""
    return f"{metadata_root.rstrip('/')}/v5/class-descriptions-boxable.csv"


def endpoint_from_environment() -> str | None:
    return os.environ.get("FSSPEC_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


def _have_aws_credentials() -> bool:
    if any(os.environ.get(name) for name in _CREDENTIAL_VARIABLES):
        return True
    credentials_file = os.environ.get(
        "AWS_SHARED_CREDENTIALS_FILE", os.path.expanduser("~/.aws/credentials")
    )
    return os.path.exists(credentials_file)


def storage_options(url: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """fsspec options for ``url``: anonymous S3 unless credentials exist, endpoint from flag or env.

    The result is plain data (picklable), so it can travel to worker processes and Dask tasks,
    which must open their own filesystems: s3fs is not fork-safe.
    """
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    if protocol in ("s3", "s3a"):
        options: dict[str, Any] = {
            "anon": not _have_aws_credentials(),
            "config_kwargs": {"max_pool_connections": DEFAULT_POOL_CONNECTIONS},
        }
        endpoint = endpoint_url or endpoint_from_environment()
        if endpoint:
            options["endpoint_url"] = endpoint
        return options
    return {}


def filesystem(
    url: str, options: dict[str, Any] | None = None, *, asynchronous: bool = False, **extra: Any
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Open the filesystem behind ``url`` and return it with the path inside it.

    ``asynchronous=True`` gives an async-capable instance (s3fs, http) for use inside a running
    event loop; local paths get the ordinary local filesystem either way.
    """
    options = dict(storage_options(url) if options is None else options)
    options.update(extra)
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    cls = fsspec.get_filesystem_class(protocol)
    if asynchronous and getattr(cls, "async_impl", False):
        options["asynchronous"] = True
        # A fresh instance per loop: cached instances are bound to the loop that made them.
        options["skip_instance_cache"] = True
    fs = cls(**options)
    return fs, fs._strip_protocol(url)


def with_read_timeout(url: str, options: dict[str, Any], seconds: float) -> dict[str, Any]:
    """``options`` with an inactivity time-out on every connection and read of ``url``: a server
    that stops sending mid-body fails the read after ``seconds`` (one line; a rerun resumes)
    instead of after aiohttp's 5 minutes per request or botocore's 60 s per read, retried.

    For the parent's own reads: whole files (class lists, CSVs) and HEADs. Options that travel
    to the shard workers stay without it: their fetcher times out on its own, and client options
    there would turn the lean HTTP client off.
    """
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    if protocol in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)
        return {
            **options,
            "client_kwargs": {**options.get("client_kwargs", {}), "timeout": timeout},
        }
    if protocol in ("s3", "s3a"):
        config = {**options.get("config_kwargs", {}), "connect_timeout": seconds}
        return {**options, "config_kwargs": {**config, "read_timeout": seconds}}
    return options


async def http_client(**kwargs: Any) -> Any:
    """An aiohttp session without aiohttp's default cap of 100 connections per session."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, **kwargs)


def reading_location(url: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Where to read ``url`` from in bulk: anonymous S3 objects as plain HTTP(S) GETs.

    An unsigned S3 GET is an ordinary HTTP request. fsspec's HTTP filesystem (aiohttp) spends
    about a fifth of the CPU per request that s3fs/aiobotocore does (0.13 ms against 0.70 ms
    here), and with hundreds of requests in flight that CPU is the bottleneck. Signed access
    (credentials present) stays on s3fs. A read time-out in ``options`` (``with_read_timeout``)
    is kept.
    """
    protocol, path = fsspec.core.split_protocol(url)
    if protocol not in ("s3", "s3a") or not options.get("anon"):
        return url, options
    bucket, _, key = path.partition("/")
    endpoint = options.get("endpoint_url")
    # Path style on a custom endpoint (moto, MinIO, nginx); virtual-host style on AWS itself.
    base = f"{endpoint.rstrip('/')}/{bucket}" if endpoint else f"https://{bucket}.s3.amazonaws.com"
    http_url = join(base, key) if key else base
    read_options: dict[str, Any] = {"get_client": http_client}
    seconds = options.get("config_kwargs", {}).get("read_timeout")
    if seconds is not None:
        read_options = with_read_timeout(http_url, read_options, seconds)
    return http_url, read_options


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(fs: Any) -> bool:
    """Whether ``fs`` is the local disk (fsspec's ``file`` protocol)."""
    protocol = fs.protocol
    return "file" in ((protocol,) if isinstance(protocol, str) else tuple(protocol))


def write_whole(fs: Any, path: str, data: bytes) -> None:
    """Make ``path`` appear whole or not at all: on the local disk under the temporary name
    ``{path}.{pid}.tmp`` (parent folders made), then renamed; on object storage one PUT, which
    is atomic already."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    else:
        fs.pipe_file(path, data)


async def open_async_filesystem(url: str, options: dict[str, Any] | None = None) -> Any:
    """An async filesystem bound to the running event loop, its client session already open."""
    fs, _ = filesystem(url, options, asynchronous=True)
    if not getattr(fs, "async_impl", False):
        # Local disks and other blocking filesystems: their calls run in threads.
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        return AsyncFileSystemWrapper(fs, asynchronous=True)
    if hasattr(fs, "set_session"):
        from oistream.sharding.fetch import sole_retry_layer

        # Our fetcher retries with backoff; botocore's own retries underneath would multiply.
        sole_retry_layer(fs)
        await fs.set_session()
    return fs


async def close_async_filesystem(fs: Any) -> None:
    """Close the client inside its loop; left to garbage collection it warns after the loop."""
    s3_client = getattr(fs, "_s3", None)
    if s3_client is not None:
        await s3_client.__aexit__(None, None, None)
    http_session = getattr(fs, "_session", None)
    if http_session is not None:
        await http_session.close()
    from oistream.sharding.httpclient import close_pool

    close_pool(fs)  # the fetcher's own keep-alive connections, when it made any
