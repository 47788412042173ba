"""Synchronous HTTP reads with the fetcher's retry policy: HEADs, first-byte probes and whole
objects streamed in one GET, resumed where they break off.

The metadata cache reads class lists and CSVs through these, and the shard command's parent
checks and samples images with them. fsspec's HTTP filesystem retries nothing, and its ``info``
follows a failed HEAD with a GET and turns every failure (a 503 too) into FileNotFoundError;
here each attempt is one request, reported to the caller's ``RequestCounter`` so that the run's
summary counts requests as the server does, 404 is FileNotFoundError, 403 (anonymous S3's
answer for a key that does not exist) PermissionError, and a 5xx, a dropped connection or a
stall is tried again after the fetcher's jittered back-off.
"""

from __future__ import annotations

import contextlib
import io
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from fsspec.asyn import sync

from oistream.errors import OistreamError, one_line
from oistream.sharding.fetch import (
    CutShort,
    HttpRequest,
    RetryPolicy,
    classify_error,
    content_range,
    http_status_and_code,
    info_from_headers,
    is_http,
)
from oistream.sharding.options import DEFAULT_READ_TIMEOUT
from oistream.sharding.remotezip import pinned_etag

# Called before each request with whether it is sent after a failure (a retry).
RequestCounter = Callable[[bool], None]


@dataclass
class RequestTally:
    """A ``RequestCounter`` that keeps its counts: requests sent, and of those the retries."""

    requests: int = 0
    retries: int = 0

    def __call__(self, retry: bool) -> None:
        self.requests += 1
        self.retries += retry


# What a streamed HTTP body is read ahead by: a few of aiohttp's pieces.
_STREAM_BUFFER_BYTES = 1 << 20


def buffered(body: ResumableBody) -> BinaryIO:
    """aiohttp hands out whatever has arrived (often 64 kB) from read(n); the buffer turns that
    back into n bytes unless the body ends first, as callers expect."""
    return io.BufferedReader(body, _STREAM_BUFFER_BYTES)  # type: ignore[return-value]


# fsspec's HTTP filesystem retries nothing: whole-file reads and HEADs over HTTP get the
# fetcher's policy (s3fs retries on its own, and a second layer would multiply its attempts).
_RETRY = RetryPolicy()
# Failures one streamed read survives in all, resumed each time where it stopped.
_MAX_RESUMES = 4 * _RETRY.attempts


def _retry_or_raise(error: Exception, failures: int, rng: random.Random) -> None:
    """Back off before another try after a transient failure; raise anything else, and give
    up (``_gave_up``) once ``_RETRY.attempts`` tries have failed in a row."""
    if classify_error(error) != "transient":
        raise error
    if failures >= _RETRY.attempts:
        raise _gave_up(error, f"{failures} times in a row") from error
    time.sleep(_RETRY.delay(failures, rng))  # back-off, not synchronisation


def _gave_up(error: Exception, how_often: str) -> OistreamError:
    """The one line for a read that kept failing transiently (an ``OistreamError``, never a
    FileNotFoundError: that would read as "not found", and a missing V7 class list falls back
    to V5's)."""
    status, _ = http_status_and_code(error)
    reason = f"HTTP {status}" if status is not None else one_line(error)
    return OistreamError(f"{reason}, {how_often} (transient); rerun the same command")


def head(fs: Any, path: str, on_request: RequestCounter | None = None) -> dict[str, Any]:
    """``path``'s metadata (``size``, and ``ETag`` where the store has one), as ``fs.info``
    gives it; over HTTP from one HEAD per attempt (see the module's docstring)."""
    return _retried(fs, path, _http_head, on_request)


def probe(fs: Any, path: str, on_request: RequestCounter | None = None) -> dict[str, Any]:
    """``path``'s metadata as ``head`` gives it, asked over HTTP by a GET of its first byte.

    The shard jobs read images by GET, so the images check asks the same way: a server, or a
    proxy in front of it, that leaves HEADs unanswered but serves GETs serves the run too.
    ``size`` comes from the answer's ``Content-Range`` (``bytes 0-0/N``), from Content-Length
    when the server ignored the range (its body is dropped with the connection, unread), 0
    for an empty object (416), None when the answer does not say. The byte itself is read.
    """
    return _retried(fs, path, _http_first_byte, on_request)


def _retried(
    fs: Any,
    path: str,
    ask: Callable[[Any, str], dict[str, Any]],
    on_request: RequestCounter | None,
) -> dict[str, Any]:
    """``ask(fs, path)`` over HTTP, tried again after transient failures; ``fs.info(path)``
    (one call, whatever its library does inside) on any other filesystem."""
    if not is_http(fs):
        if on_request is not None:
            on_request(False)
        return fs.info(path)
    rng = random.Random()
    failures = 0
    while True:
        if on_request is not None:
            on_request(failures > 0)
        try:
            return ask(fs, path)
        except Exception as error:
            failures += 1
            _retry_or_raise(error, failures, rng)


def _read_timeout(fs: Any) -> float:
    """The inactivity time-out the filesystem was made with (``sources.with_read_timeout``)."""
    timeout = getattr(fs, "client_kwargs", {}).get("timeout")
    return getattr(timeout, "sock_read", None) or DEFAULT_READ_TIMEOUT


def _raise_for_status(response: Any, path: str) -> None:
    if response.status == 404:
        raise FileNotFoundError(path)
    if response.status == 403:
        raise PermissionError(f"403 Forbidden: {path}")
    response.raise_for_status()


def _http_head(fs: Any, path: str) -> dict[str, Any]:
    request = HttpRequest(fs, "HEAD", path, {}, _read_timeout(fs))
    try:
        response = sync(fs.loop, request.__aenter__)
        _raise_for_status(response, path)
        return info_from_headers(path, response.headers)
    finally:
        sync(fs.loop, request.__aexit__, None, None, None)


def _http_first_byte(fs: Any, path: str) -> dict[str, Any]:
    request = HttpRequest(fs, "GET", path, {"Range": "bytes=0-0"}, _read_timeout(fs))
    try:
        response = sync(fs.loop, request.__aenter__)
        if response.status == 416:  # nothing to range over: an empty object
            return {**info_from_headers(path, {}), "size": 0}
        _raise_for_status(response, path)
        info = info_from_headers(path, response.headers)
        if response.status == 206:
            answered = content_range(response.headers.get("Content-Range", ""))
            info["size"] = answered[2] if answered and answered[:2] == (0, 0) else None
            # The byte itself, so that a cut answer is retried like any other and the
            # connection is left ready for the next request.
            if len(sync(fs.loop, response.content.read, 1)) != 1:
                raise CutShort(f"{path}: the first byte's answer ended without it")
        return info
    finally:
        sync(fs.loop, request.__aexit__, None, None, None)


class _ResumeRefused(Exception):
    """The server answered a resumed read with other bytes than those asked for."""


class ResumableBody(io.RawIOBase):
    """One streamed GET of an HTTP object, resumed where it broke off, as a raw stream.

    A transient failure (a 5xx answer, a reset connection, a body cut short, a stall past the
    read time-out) reopens the stream at the first byte not read yet, with ``Range`` and, when
    the object's ETag is known (from a HEAD, or from the first answer), ``If-Match``, after the
    fetcher's jittered back-off: a 0.8 GB CSV is not read again from its start because a
    connection dropped. ``_RETRY.attempts`` failures in a row without a byte between them end
    the read, and so does the ``_MAX_RESUMES``-th failure in all (a server that drips a few
    bytes per connection would otherwise hold the run for ever). A resumed request answered
    with anything but those bytes (the whole object, another range) fails it:
    ``_ResumeRefused``. Requests go through the filesystem's session, redirects only to the
    same host (``fetch.HttpRequest``). 404 is ``FileNotFoundError``; 403, which anonymous S3
    answers for a key that does not exist, ``PermissionError``.
    """

    def __init__(
        self,
        fs: Any,
        path: str,
        size: int | None = None,
        etag: str | None = None,
        on_request: RequestCounter | None = None,
    ) -> None:
        self._fs, self._path, self._size = fs, path, size
        self._etag = pinned_etag(etag)
        self._on_request = on_request
        self._read_timeout = _read_timeout(fs)
        self._position = 0
        self._request: HttpRequest | None = None
        self._response: Any = None
        self._failures = 0  # in a row, without a byte between them
        self._resumes = 0  # failures in all
        self._rng = random.Random()

    def readable(self) -> bool:
        return True

    def start(self) -> tuple[int | None, str | None]:
        """Send the GET (retried like any read) and return the object's (size, ETag) from its
        answer's headers, as a HEAD would have given them."""
        self._call(lambda: None)
        return self._size, self._etag

    def _open(self) -> None:
        headers = {}
        if self._position:
            headers["Range"] = f"bytes={self._position}-"
        if self._etag:
            headers["If-Match"] = self._etag
        if self._on_request is not None:
            self._on_request(self._resumes > 0)  # each open but the first follows a failure
        request = HttpRequest(self._fs, "GET", self._path, headers, self._read_timeout)
        response = sync(self._fs.loop, request.__aenter__)
        self._request, self._response = request, response
        _raise_for_status(response, self._path)
        if self._position:
            content_range = response.headers.get("Content-Range", "")
            if response.status != 206 or not content_range.startswith(f"bytes {self._position}-"):
                raise _ResumeRefused(
                    f"{self._path}: asked for bytes {self._position}- to resume, got "
                    f"{response.status} {content_range or '(no Content-Range)'}"
                )
        elif self._size is None:
            length = response.headers.get("Content-Length")
            self._size = int(length) if length is not None else None
        if self._etag is None:
            self._etag = pinned_etag(response.headers.get("ETag"))

    def _call(self, step: Callable[[], bytes | None]) -> bytes | None:
        """``step()`` on an open stream, reopened after each transient failure."""
        while True:
            try:
                if self._response is None:
                    self._open()
                return step()
            except Exception as error:
                self._close_stream()
                if isinstance(error, _ResumeRefused):
                    raise
                self._failures += 1
                self._resumes += 1
                if self._resumes >= _MAX_RESUMES and classify_error(error) == "transient":
                    raise _gave_up(error, f"{self._resumes} times in one read") from error
                _retry_or_raise(error, self._failures, self._rng)

    def _read_some(self, count: int) -> bytes:
        data = sync(self._fs.loop, self._response.content.read, count)
        if not data and self._size is not None and self._position < self._size:
            raise CutShort(f"body ended at byte {self._position} of {self._size}")
        return data

    def readinto(self, buffer: Any) -> int:
        data = self._call(lambda: self._read_some(len(buffer))) or b""
        if data:
            self._failures = 0
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def _close_stream(self) -> None:
        request, self._request, self._response = self._request, None, None
        if request is not None:
            with contextlib.suppress(Exception):
                sync(self._fs.loop, request.__aexit__, None, None, None)

    def close(self) -> None:
        self._close_stream()
        super().close()
