"""Concurrent, retrying byte fetches over fsspec filesystems, from one event loop.

The shard job keeps hundreds of range requests in flight against object storage. Throttling
(503 SlowDown, 429), other 5xx answers, dropped connections and short bodies are routine at that
rate, so every request goes through one retry loop with exponential backoff and full jitter, and
every failure is classified once, here: *missing* (404 / NoSuchKey: never retried, raised as
``MissingObject``), *transient* (retried) or *fatal* (raised as ``FetchError`` at once).

The ``Fetcher`` is the only retry layer: s3fs and botocore retry on their own (up to 5 x 5
attempts with sleeps of seconds), which would hide faults from our counters and turn a dead
endpoint into minutes of waiting, so the fetcher switches those inner retries off on every
s3fs filesystem it is given (``sole_retry_layer``).
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

import aiohttp
from fsspec.exceptions import FSTimeoutError
from yarl import URL

from oistream.errors import one_line
from oistream.sharding import httpclient
from oistream.sharding.options import (
    DEFAULT_ATTEMPT_TIMEOUT,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_OBJECT_BYTES,
    DEFAULT_READ_TIMEOUT,
)

T = TypeVar("T")

Verdict = Literal["missing", "transient", "fatal"]

# Status codes and S3 error codes worth another attempt: throttling, server trouble, timeouts.
_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "OperationAborted",
    }
)
_MISSING_STATUSES = frozenset({404, 410})
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "NotFound", "404"})
# errno values s3fs uses for throttling/5xx (EBUSY, EREMOTEIO) and the usual socket troubles.
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EBUSY,
        getattr(errno, "EREMOTEIO", errno.EIO),
        errno.EIO,
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
    }
)
# Transport-level failures: the request may well succeed on a fresh connection.
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
    TimeoutError,
    ConnectionError,
    FSTimeoutError,
    http.client.IncompleteRead,
)
_BOTOCORE_TRANSIENT = (
    "botocore.exceptions.HTTPClientError",
    "botocore.exceptions.ConnectionError",
    "botocore.exceptions.IncompleteReadError",
    "botocore.parsers.ResponseParserError",
)
# Subclasses of the transient types above that no retry can fix.
_FATAL_TYPES: tuple[type[BaseException], ...] = (aiohttp.ClientSSLError, aiohttp.InvalidURL)
_BOTOCORE_FATAL = ("botocore.exceptions.SSLError",)
# An S3 error answer (its code and status say what it means), and any other botocore failure.
_BOTOCORE_ANSWER = ("botocore.exceptions.ClientError",)
_BOTOCORE_ANY = ("botocore.exceptions.BotoCoreError",)


def _loaded_types(names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    """The classes named ``module.Class`` whose module is already imported.

    A botocore error can only exist once botocore is loaded, and the shard command's plain-HTTP
    path (anonymous S3 read as HTTPS, images by the lean client) never loads it: importing it
    here (with urllib3 and dateutil) made the shard command's imports 1.09 s instead of 0.94 s
    (means of five, 2-core Xeon), all before its first request. Errors are rare, so the lookup
    per error costs nothing that shows.
    """
    found = []
    for name in names:
        module_name, _, class_name = name.rpartition(".")
        module = sys.modules.get(module_name)
        if module is not None:
            found.append(getattr(module, class_name))
    return tuple(found)


if hasattr(asyncio, "timeout"):  # Python 3.11+

    async def within(awaitable: Awaitable[T], seconds: float) -> T:
        """``await awaitable``, cut off after ``seconds`` (``TimeoutError``).

        ``asyncio.wait_for`` would wrap each awaitable in a task of its own: with two or three
        of these per request, at hundreds of requests a second, that was a visible share of
        the shard job's CPU. A timeout scope only schedules a timer.
        """
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - Python 3.10
    within = asyncio.wait_for


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one request is tried.

    Attempt ``k`` (k >= 1) waits ``uniform(0, min(max_delay, base_delay * 2**(k-1)))`` first
    ("full jitter"), so throttled clients spread out instead of retrying in lockstep. Each
    attempt is cut off after ``timeout`` seconds in all (the per-attempt deadline), and an HTTP
    attempt as soon as no byte has arrived for ``read_timeout`` seconds (the inactivity
    time-out): a stalled server costs ``attempts x read_timeout`` at most, not minutes each.
    """

    attempts: int = 8
    base_delay: float = 0.05
    max_delay: float = 5.0
    timeout: float = DEFAULT_ATTEMPT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


class FetchError(Exception):
    """A request that failed for good: after all attempts, or at once for a fatal answer.

    ``url`` is the path asked for, ``status``/``code`` the HTTP status and S3 error code when the
    server gave one (``None`` otherwise), ``attempts`` how many requests were made.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str = "",
        status: int | None = None,
        code: str | None = None,
        attempts: int = 0,
    ):
        super().__init__(message)
        self.url = url
        self.status = status
        self.code = code
        self.attempts = attempts


class MissingObject(FetchError):
    """The object (or a zip member) does not exist: 404, NoSuchKey, FileNotFoundError."""


class ObjectChanged(FetchError):
    """The object no longer has the ETag it was pinned to (412): transient for the run.

    What was planned from its old directory may not hold any more; a rerun reads it afresh.
    """


class ObjectTooLarge(FetchError):
    """A whole-object GET whose body would exceed the fetcher's ``max_object_bytes``."""


# Redirects an object read follows, each only to the same scheme, host and port.
MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)")


def content_range(value: str) -> tuple[int, int, int | None] | None:
    """``(first, last, total)`` of a ``Content-Range`` value (total None for ``*``); None for
    anything else."""
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        return None
    return int(match[1]), int(match[2]), None if match[3] == "*" else int(match[3])


_BODY_CHUNK = 256 * 1024


@dataclass
class FetchStats:
    """Counters of one ``Fetcher``; updated from its event loop only.

    ``requests`` counts attempts (HTTP requests made), ``retries`` the attempts after a first,
    ``bytes`` the bytes handed back to callers, ``failures`` the calls that ended in an error
    (``missing`` of them ``MissingObject``), ``throttled`` the 503/429/SlowDown answers seen.
    ``mean_in_flight`` is the time-weighted mean number of requests in flight between the first
    request's start and the last one's end.
    """

    requests: int = 0
    retries: int = 0
    bytes: int = 0
    failures: int = 0
    missing: int = 0
    throttled: int = 0
    max_in_flight: int = 0
    in_flight: int = 0
    in_flight_seconds: float = 0.0  # integral of the in-flight count over wall time
    first_start: float | None = None
    last_end: float | None = None
    _last_change: float = field(default=0.0, repr=False)

    @property
    def busy_seconds(self) -> float:
        if self.first_start is None or self.last_end is None:
            return 0.0
        return self.last_end - self.first_start

    @property
    def mean_in_flight(self) -> float:
        busy = self.busy_seconds
        return self.in_flight_seconds / busy if busy > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        out["mean_in_flight"] = self.mean_in_flight
        out["busy_seconds"] = self.busy_seconds
        return out

    def _request_started(self) -> None:
        now = time.perf_counter()
        if self.first_start is None:
            self.first_start = now
            self._last_change = now
        self.in_flight_seconds += self.in_flight * (now - self._last_change)
        self._last_change = now
        self.in_flight += 1
        self.requests += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _request_ended(self) -> None:
        now = time.perf_counter()
        self.in_flight_seconds += self.in_flight * (now - self._last_change)
        self._last_change = now
        self.in_flight -= 1
        self.last_end = now


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it: explicit causes, and implicit context unless suppressed."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None


def http_status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    """The HTTP status and S3 error code behind ``exc``, looking through wrapped causes.

    s3fs turns botocore's ``ClientError`` into ``OSError``/``FileNotFoundError`` with the original
    as ``__cause__``; fsspec's HTTP filesystem raises aiohttp's ``ClientResponseError``.
    """
    for error in _exception_chain(exc):
        if isinstance(error, _loaded_types(_BOTOCORE_ANSWER)):
            response = error.response or {}
            code = response.get("Error", {}).get("Code") or None
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status is None and code and httpclient.is_decimal(code):
                status = int(code)
            return status, code
        if isinstance(error, aiohttp.ClientResponseError):
            return error.status, None
    return None, None


def classify_error(exc: BaseException) -> Verdict | None:
    """``missing``, ``transient`` or ``fatal`` for errors of storage access; ``None`` otherwise.

    The HTTP status or S3 code decides when there is one anywhere in the chain of causes.
    Otherwise the first cause that is a known transport failure decides, looking past
    ``FileNotFoundError``: fsspec's HTTP filesystem reports *any* failed HEAD+GET in ``_info``
    as ``FileNotFoundError`` (a reset connection included), so it only means "missing" when
    nothing more specific caused it. ``None`` means the exception is not an I/O failure at all
    (a bug, a bad argument): the fetcher lets it propagate instead of dressing it up.
    """
    status, code = http_status_and_code(exc)
    if code in _MISSING_CODES or status in _MISSING_STATUSES:
        return "missing"
    if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUSES:
        return "transient"
    if status is not None:
        return "fatal"  # 400, 403, 416...: the same request will get the same answer
    for error in _exception_chain(exc):
        if isinstance(error, FileNotFoundError):
            continue
        verdict = _classify_one(error)
        if verdict is not None:
            return verdict
    if isinstance(exc, FileNotFoundError):
        return "missing"
    return None


def _classify_one(error: BaseException) -> Verdict | None:
    if isinstance(error, _FATAL_TYPES + _loaded_types(_BOTOCORE_FATAL)):
        return "fatal"
    if isinstance(error, _TRANSIENT_TYPES + _loaded_types(_BOTOCORE_TRANSIENT)):
        return "transient"
    if isinstance(error, OSError):
        return "transient" if error.errno in _TRANSIENT_ERRNOS else "fatal"
    if isinstance(error, (aiohttp.ClientError, *_loaded_types(_BOTOCORE_ANY))):
        return "fatal"
    return None


def _describe(exc: BaseException) -> str:
    status, code = http_status_and_code(exc)
    prefix = " ".join(str(part) for part in (status, code) if part is not None)
    return f"{prefix}: {one_line(exc, with_type=False)}" if prefix else one_line(exc)


def _is_throttle(exc: BaseException) -> bool:
    status, code = http_status_and_code(exc)
    return status in (429, 503) or code in ("SlowDown", "Throttling", "ThrottlingException")


def _is_s3(fs: Any) -> bool:
    return getattr(fs, "protocol", None) in (("s3", "s3a"), "s3", "s3a")


def is_http(fs: Any) -> bool:
    """fsspec's HTTP filesystem (anonymous S3 reads go through it, see sources.reading_location)."""
    protocol = getattr(fs, "protocol", None)
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol or ())
    return bool({"http", "https"} & set(protocols)) and hasattr(fs, "set_session")


def sole_retry_layer(fs: Any) -> None:
    """Switch off s3fs's and botocore's own retries on ``fs`` so the Fetcher's are the only ones.

    botocore reads its retry configuration when s3fs first opens its client, so this works on
    a filesystem that has not made a request yet (as ``sources.filesystem`` returns it);
    s3fs's own retry count is honoured at any time. Other filesystems are left alone.
    """
    if not _is_s3(fs):
        return
    fs.retries = 1
    if getattr(fs, "_s3", None) is None:
        config = dict(getattr(fs, "config_kwargs", {}) or {})
        if config.get("retries") != {"total_max_attempts": 1, "mode": "standard"}:
            config["retries"] = {"total_max_attempts": 1, "mode": "standard"}
            fs.config_kwargs = config


def info_from_headers(path: str, headers: Any) -> dict[str, Any]:
    """``fs.info``'s answer from a HEAD's headers: ``size`` (None unless Content-Length is a
    plain decimal number) and ``ETag`` when there is one."""
    length = headers.get("Content-Length")
    info: dict[str, Any] = {
        "name": path,
        "size": int(length) if length and httpclient.is_decimal(length) else None,
        "type": "file",
    }
    if headers.get("ETag"):
        info["ETag"] = headers["ETag"]
    return info


class Fetcher:
    """Async, bounded-concurrency byte fetcher for one event loop.

    At most ``concurrency`` requests are in flight at a time (a semaphore, released while a
    request waits to retry). Callers bound memory by how much they ask for at once: the
    fetcher itself buffers nothing beyond the responses it is returning.
    """

    def __init__(
        self,
        concurrency: int = DEFAULT_CONCURRENCY,
        retry: RetryPolicy = RetryPolicy(),
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if retry.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        self.concurrency = concurrency
        self.retry = retry
        self.max_object_bytes = max_object_bytes
        self.stats = FetchStats()
        self._slots = asyncio.Semaphore(concurrency)
        self._rng = random.Random()

    def widen(self, extra: int) -> None:
        """Allow ``extra`` more requests in flight from now on: the share of the concurrency
        that another fetcher on the same loop no longer needs."""
        if extra < 0:
            raise ValueError("a fetcher only widens")
        self.concurrency += extra
        for _ in range(extra):
            self._slots.release()

    async def cat(
        self,
        fs: Any,
        path: str,
        start: int | None = None,
        end: int | None = None,
        *,
        if_match: str | None = None,
    ) -> bytes:
        """Bytes ``[start, end)`` of ``path`` (the whole object when both are ``None``).

        A body shorter than the range asked for is retried, unless the object really ends
        there (checked with one metadata request); a body longer than the range means the
        server ignored ``Range`` and is an error, since it just sent the whole object.

        Over HTTP the response is checked as it arrives: a ranged request needs status 206
        and a ``Content-Range`` equal to the request, else it fails at once (not retried)
        having read no body; at most the requested length is ever read. ``if_match`` pins
        the object's ETag (``ObjectChanged`` when it moved on); redirects are followed only
        to the same host. A whole-object body over ``max_object_bytes`` is ``ObjectTooLarge``.
        """
        if start is not None and end is not None and start >= 0 and end <= start:
            return b""
        expected = None
        if start is not None and start >= 0 and end is not None and end >= 0:
            expected = end - start

        sole_retry_layer(fs)

        # s3fs asks for the size (a HEAD) before a whole-object GET, to split big objects into
        # parallel parts; one GET per image is what we want.
        options = {"max_concurrency": 1} if start is None and end is None and _is_s3(fs) else {}

        async def attempt() -> bytes:
            plain = (start is None or start >= 0) and (end is None or end >= 0)
            if is_http(fs) and plain:
                data = await self._http_get(fs, path, start, end, if_match)
            elif _is_s3(fs) and plain and start is not None and end is not None:
                data = await self._s3_get(fs, path, start, end, if_match)
            elif getattr(fs, "async_impl", False):
                data = await fs._cat_file(path, start=start, end=end, **options)
            else:  # local paths: the ordinary filesystem, off the event loop
                data = await asyncio.to_thread(fs.cat_file, path, start=start, end=end)
            if expected is not None and len(data) != expected:
                return await self._check_length(fs, path, start or 0, expected, data)
            return data

        data = await self._run("GET", path, attempt)
        self.stats.bytes += len(data)
        return data

    async def info(self, fs: Any, path: str) -> dict[str, Any]:
        """Metadata of ``path``: ``size``, and ``ETag`` where the store has one."""

        sole_retry_layer(fs)

        async def attempt() -> dict[str, Any]:
            if is_http(fs):
                return await self._http_head(fs, path)
            if getattr(fs, "async_impl", False):
                return await fs._info(path)
            return await asyncio.to_thread(fs.info, path)

        return await self._run("HEAD", path, attempt)

    async def tail(self, fs: Any, path: str, nbytes: int) -> Tail | None:
        """The last ``nbytes`` of the HTTP object ``path`` (all of it when it is shorter), with
        its size and ETag, from one GET with a suffix range (``Range: bytes=-N``), which S3,
        GCS, nginx and moto all answer. Where a HEAD and then a ranged GET take two round
        trips, this takes one.

        The answer is checked as ``cat``'s are: a 206 covering exactly the object's last
        ``min(nbytes, size)`` bytes, anything else refused at once (a 200 is the range
        ignored). None when the server refuses the suffix range (416, which is also what an
        empty object gets): the caller asks for the size and reads the tail by an ordinary
        range.
        """
        if not is_http(fs) or nbytes < 1:
            raise ValueError("Fetcher.tail reads HTTP objects, at least one byte")
        sole_retry_layer(fs)
        tail = await self._run("GET", path, lambda: self._http_tail(fs, path, nbytes))
        if tail is not None:
            self.stats.bytes += len(tail.data)
        return tail

    async def _http_tail(self, fs: Any, path: str, nbytes: int) -> Tail | None:
        async with self._http_open(fs, "GET", path, {"Range": f"bytes=-{nbytes}"}) as response:
            if response.status == 416:
                return None
            response.raise_for_status()
            # The object's size is in the answer; then it is checked as any range of it is.
            answered = response.headers.get("Content-Range", "")
            whole = content_range(answered)
            if whole is None or whole[2] is None:
                raise _RangeIgnored(
                    f"status {response.status}, Content-Range {answered!r}, to a request for "
                    f"the last {nbytes} bytes"
                )
            size = whole[2]
            expected = self._check_range_answer(response, max(0, size - nbytes), size)
            data = await _read_body(response, expected, self.retry.read_timeout, True, path)
            if len(data) != expected:
                raise CutShort(f"a tail of {len(data)} bytes where {expected} were announced")
            return Tail(data, size, response.headers.get("ETag") or None)

    async def size(self, fs: Any, path: str) -> int:
        info = await self.info(fs, path)
        if info.get("size") is None:
            raise FetchError(f"HEAD {path}: the server reports no size", url=path)
        return int(info["size"])

    async def _http_head(self, fs: Any, path: str) -> dict[str, Any]:
        async with self._http_open(fs, "HEAD", path, {}) as response:
            response.raise_for_status()
            return info_from_headers(path, response.headers)

    async def _http_get(
        self, fs: Any, path: str, start: int | None, end: int | None, if_match: str | None
    ) -> bytes:
        ranged = start is not None and end is not None
        headers = {}
        if start is not None or end is not None:
            first = start or 0
            headers["Range"] = f"bytes={first}-{'' if end is None else end - 1}"
        if if_match:
            headers["If-Match"] = if_match
        async with self._http_open(fs, "GET", path, headers) as response:
            if response.status == 412:
                raise ObjectChanged(
                    f"GET {path}: the object changed since it was read (ETag {if_match})",
                    url=path,
                    status=412,
                )
            response.raise_for_status()
            if ranged:
                limit = self._check_range_answer(response, start or 0, end or 0)
            else:
                if response.status != 200:
                    raise _RangeIgnored(f"status {response.status} to a GET without Range")
                limit = self.max_object_bytes
                length = response.headers.get("Content-Length")
                if length is not None and httpclient.is_decimal(length) and int(length) > limit:
                    raise ObjectTooLarge(
                        f"GET {path}: {length} bytes, over the cap of {limit}", url=path
                    )
            return await _read_body(response, limit, self.retry.read_timeout, ranged, path)

    async def _s3_get(
        self, fs: Any, path: str, start: int, end: int, if_match: str | None
    ) -> bytes:
        """A ranged GetObject through s3fs's client, checked and read as ``_http_get`` does."""
        bucket, key, version = fs.split_path(path)
        request: dict[str, Any] = {
            "Bucket": bucket,
            "Key": key,
            "Range": f"bytes={start}-{end - 1}",
        }
        if version:
            request["VersionId"] = version
        if if_match:
            request["IfMatch"] = if_match
        try:
            response = await fs._call_s3("get_object", **request)
        except Exception as error:
            if http_status_and_code(error)[0] == 412:
                raise ObjectChanged(
                    f"GET {path}: the object changed since it was read (ETag {if_match})",
                    url=path,
                    status=412,
                ) from None
            raise
        body = response["Body"]
        try:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            headers = {"Content-Range": response.get("ContentRange", "")}
            if response.get("ContentLength") is not None:
                headers["Content-Length"] = str(response["ContentLength"])
            limit = self._check_range_answer(_Answer(status, headers), start, end)
            chunks = bytearray()
            while len(chunks) < limit:
                chunk = await within(
                    body.read(min(_BODY_CHUNK, limit - len(chunks))), self.retry.read_timeout
                )
                if not chunk:
                    break
                chunks += chunk
            return bytes(chunks)
        finally:
            body.close()

    def _check_range_answer(self, response: Any, start: int, end: int) -> int:
        """How many bytes to read: the range asked for, as the server confirmed it."""
        asked = f"bytes {start}-{end - 1}"
        if response.status != 206:
            raise _RangeIgnored(
                f"status {response.status} to a request for {asked}: the server ignored Range"
            )
        answered = response.headers.get("Content-Range", "")
        parsed = content_range(answered)
        if parsed is None:
            raise _RangeIgnored(f"Content-Range {answered!r} for a request for {asked}")
        first, last, total = parsed
        # A range may end early only where the object does (the last bytes of a zip).
        ends_early = last < end - 1 and total is not None and last == total - 1
        if first != start or (last != end - 1 and not ends_early) or last < first:
            raise _RangeIgnored(f"Content-Range {answered!r} for a request for {asked}")
        expected = last - first + 1
        length = response.headers.get("Content-Length")
        if length is not None and (not httpclient.is_decimal(length) or int(length) != expected):
            raise _RangeIgnored(f"Content-Length {length} with Content-Range {answered!r}")
        return expected

    def _http_open(self, fs: Any, method: str, path: str, headers: dict[str, str]) -> Any:
        if httpclient.usable_for(fs):
            return _LeanRequest(fs, method, path, headers, self.retry.read_timeout)
        return HttpRequest(fs, method, path, headers, self.retry.read_timeout)

    async def _check_length(
        self, fs: Any, path: str, start: int, expected: int, data: bytes
    ) -> bytes:
        if len(data) > expected:
            raise _RangeIgnored(
                f"asked for {expected} bytes from offset {start}, got {len(data)}: "
                "the server ignored the Range header"
            )
        self.stats.requests += 1  # one more request inside this attempt
        if is_http(fs):
            info = await self._http_head(fs, path)
        elif getattr(fs, "async_impl", False):
            info = await fs._info(path)
        else:
            info = await asyncio.to_thread(fs.info, path)
        if info.get("size") is not None and start + len(data) == int(info["size"]):
            return data  # the range ran past the end of the object: nothing is missing
        raise _ShortRead(
            f"short read: asked for {expected} bytes from offset {start}, got {len(data)}"
        )

    async def _run(self, method: str, path: str, attempt: Callable[[], Awaitable[T]]) -> T:
        policy = self.retry
        last_error: BaseException | None = None
        last_reason = ""
        for number in range(1, policy.attempts + 1):
            if number > 1:
                self.stats.retries += 1
                # Wait outside the semaphore: a backing-off request must not hold a slot.
                await asyncio.sleep(policy.delay(number - 1, self._rng))
            async with self._slots:
                self.stats._request_started()
                try:
                    return await within(attempt(), policy.timeout)
                except _ShortRead as exc:
                    last_error, last_reason = exc, str(exc)
                    continue
                except _RangeIgnored as exc:
                    self._count_failure(missing=False)
                    raise FetchError(f"{method} {path}: {exc}", url=path, attempts=number) from exc
                except FetchError as exc:  # decided in the attempt: changed, too large, redirect
                    self._count_failure(missing=isinstance(exc, MissingObject))
                    exc.attempts = number
                    raise
                except Exception as exc:
                    verdict = classify_error(exc)
                    if verdict is None:  # not an I/O failure: a bug, let it show as itself
                        self._count_failure(missing=False)
                        raise
                    if verdict == "transient":
                        if _is_throttle(exc):
                            self.stats.throttled += 1
                        last_error, last_reason = exc, _describe(exc)
                        continue
                    self._count_failure(missing=verdict == "missing")
                    status, code = http_status_and_code(exc)
                    kind = MissingObject if verdict == "missing" else FetchError
                    what = (
                        f"not found ({_describe(exc)})" if verdict == "missing" else _describe(exc)
                    )
                    raise kind(
                        f"{method} {path}: {what}",
                        url=path,
                        status=status,
                        code=code,
                        attempts=number,
                    ) from exc
                finally:
                    self.stats._request_ended()
        self._count_failure(missing=False)
        status, code = http_status_and_code(last_error) if last_error else (None, None)
        raise FetchError(
            f"{method} {path}: gave up after {policy.attempts} attempts, last: {last_reason}",
            url=path,
            status=status,
            code=code,
            attempts=policy.attempts,
        ) from last_error

    def _count_failure(self, *, missing: bool) -> None:
        self.stats.failures += 1
        if missing:
            self.stats.missing += 1


@dataclass(frozen=True)
class Tail:
    """An object's last bytes, and what the answer said of the whole object."""

    data: bytes
    size: int
    etag: str | None


class CutShort(ConnectionError):
    """A body that ended before the length its answer announced: transient, asked again."""


class _ShortRead(Exception):
    """A body shorter than the range asked for, with the object longer than that: retried."""


class _RangeIgnored(Exception):
    """A body longer than the range asked for, or an answer that is not the range asked for."""


@dataclass
class _Answer:
    """The status and headers of an S3 answer, seen as an HTTP response is."""

    status: int | None
    headers: dict[str, str]


class HttpRequest:
    """One HTTP request through an fsspec HTTP filesystem's session, following redirects only
    to the same scheme, host and port; yields the response.

    aiohttp's ``sock_read`` time-out is the inactivity time-out: no byte for that long fails
    the attempt, which the fetcher retries.
    """

    def __init__(
        self, fs: Any, method: str, path: str, headers: dict[str, str], read_timeout: float
    ) -> None:
        self.fs, self.method, self.path = fs, method, path
        self.headers, self.read_timeout = headers, read_timeout
        self.response: Any = None

    async def __aenter__(self) -> Any:
        session = await self.fs.set_session()
        options = dict(self.fs.kwargs)
        headers = {**(options.pop("headers", None) or {}), **self.headers}
        options.pop("allow_redirects", None)
        options["timeout"] = aiohttp.ClientTimeout(
            total=None, sock_connect=self.read_timeout, sock_read=self.read_timeout
        )
        url = URL(str(self.fs.encode_url(self.path)))

        def send(target: URL) -> Awaitable[Any]:
            return session.request(
                self.method, target, headers=headers, allow_redirects=False, **options
            )

        return await self._follow_redirects(url, send)

    async def _follow_redirects(self, url: URL, send: Callable[[URL], Awaitable[Any]]) -> Any:
        """``send(url)``'s response, following at most MAX_REDIRECTS redirects on its host."""
        origin = (url.scheme, url.host, url.port)
        for _ in range(MAX_REDIRECTS + 1):
            response = await send(url)
            if response.status not in _REDIRECT_STATUSES:
                self.response = response
                return response
            location = response.headers.get("Location", "")
            response.release()
            target = url.join(URL(location))
            if (target.scheme, target.host, target.port) != origin:
                raise FetchError(
                    f"{self.method} {self.path}: redirect to another host ({target.host}) refused",
                    url=self.path,
                    status=response.status,
                )
            url = target
        raise FetchError(f"{self.method} {self.path}: too many redirects", url=self.path)

    async def __aexit__(self, *exc_info: object) -> None:
        if self.response is not None:
            # An unread rest (a server sending more than asked) is dropped with its connection.
            self.response.release()


class _LeanRequest(HttpRequest):
    """``HttpRequest`` through ``httpclient``'s connection pool instead of aiohttp's session:
    the same headers, redirect rule and inactivity time-out, a fraction of the CPU."""

    async def __aenter__(self) -> Any:
        pool = httpclient.pool_of(self.fs)
        headers = {**(self.fs.kwargs.get("headers") or {}), **self.headers}
        encoded = self.fs.encode_url(self.path)  # a yarl URL already: no second parse
        url = encoded if isinstance(encoded, URL) else URL(str(encoded))
        return await self._follow_redirects(
            url, lambda target: pool.request(self.method, target, headers, self.read_timeout)
        )


async def _read_body(
    response: Any, limit: int, read_timeout: float, ranged: bool, path: str
) -> bytes:
    """At most ``limit`` bytes of the body; for a range exactly ``limit``, else a short read."""
    if isinstance(response, httpclient.LeanResponse):
        # One read up to the limit (one byte past it for a whole object, to tell a body over
        # the cap); the connection's own inactivity timer bounds the wait.
        data = await response.read(limit if ranged else limit + 1)
        if len(data) > limit:
            raise ObjectTooLarge(f"GET {path}: more than the cap of {limit} bytes", url=path)
        return data
    body = bytearray()
    while len(body) < limit:
        chunk = await within(
            response.content.read(min(_BODY_CHUNK, limit - len(body))), read_timeout
        )
        if not chunk:
            break
        body += chunk
    if not ranged and len(body) >= limit and not response.content.at_eof():
        more = await within(response.content.read(1), read_timeout)
        if more:
            raise ObjectTooLarge(f"GET {path}: more than the cap of {limit} bytes", url=path)
    return bytes(body)
