"""The metadata cache: class lists, segmentation CSVs and mask-zip directories kept on disk.

Other tools keep Open Images' metadata on disk too; what this cache adds is that nothing in it
is trusted blindly. Before an entry is used, one HEAD asks the source for the object's size and
ETag (a local file's mtime stands in for the ETag), and the entry is used only when both match
what it was stored under; otherwise the object is fetched again and the entry replaced. Entries
are written to a temporary name and renamed into place, so a killed run or a concurrent one
never leaves or sees half an entry. A second run on the same split therefore costs one HEAD per
file and moves no metadata body bytes. Over HTTP (anonymous S3 included) a file of which no
copy is kept is not HEADed first: its GET's answer gives the size and ETag the copy is kept
under, and the GET is one stream, resumed by ranged GETs where it breaks off.

Why not fsspec's ``simplecache``/``filecache``: ``simplecache`` never revalidates, and
``filecache(check_files=True)`` compares ``fs.ukey(path)``, which fsspec's HTTP filesystem (the
real metadata root is ``https://storage.googleapis.com``) derives from the URL alone ("assume
HTTP files are static"), so a changed object would be served stale. Both also cache whole files,
and the mask zips must never be fetched whole: only their central directories are kept, parsed,
by ``remotezip.CentralDirectoryCache``, under ``zip-directories/`` here.

Layout under the cache folder (default ``$XDG_CACHE_HOME/oistream``, else ``~/.cache/oistream``):

* ``files/{sha256(url)[:32]}-{sha256(url, size, etag)[:32]}``: a whole small file or CSV,
  byte for byte; older versions of the same URL are removed when a new one is stored;
* ``zip-directories/{sha256(url, size, etag)}.cd``: a zip's central directory, its own bytes
  behind a JSON header line.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from fsspec.asyn import sync

from oistream import sources
from oistream.errors import OistreamError, one_line
from oistream.sharding.fetch import (
    HttpRequest,
    RetryPolicy,
    classify_error,
    http_status_and_code,
    is_http,
)
from oistream.sharding.options import DEFAULT_READ_TIMEOUT
from oistream.sharding.remotezip import CentralDirectoryCache, pinned_etag

FILES_FOLDER = "files"
DIRECTORIES_FOLDER = "zip-directories"


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/oistream``, or ``~/.cache/oistream`` when the variable is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "oistream")


@dataclass
class CacheStats:
    """Metadata bytes of one run: fetched from the source, or read from the cache instead."""

    fetched_bytes: int = 0  # bodies of class lists and CSVs that came over the network
    cached_bytes: int = 0  # bodies read from the cache instead (directories: their entries)
    heads: int = 0  # validation requests (one per cached object)
    gets: int = 0  # bodies opened at the source (a resumed body's further GETs not counted)
    hits: int = 0
    misses: int = 0


def version_of(info: dict[str, Any]) -> tuple[int, str | None]:
    """(size, ETag or local mtime) from an fsspec ``info`` answer; None when it has neither."""
    size = int(info.get("size") or 0)
    for key in ("ETag", "etag", "ETAG"):
        if info.get(key):
            return size, str(info[key])
    if info.get("mtime") is not None:
        return size, f"mtime:{info['mtime']}"
    return size, None


def _open_sized(fs: Any, path: str, info: dict[str, Any]) -> BinaryIO:
    """``path`` opened for one read from start to end, told the size our HEAD (``info``) gave.

    Over HTTP(S) it is one streamed GET, resumed where it breaks off (``_ResumableBody``):
    fsspec's random-access HTTP file reads by ranges of its block size one after another, and
    on the shard benchmark's 64.7 MB CSV, 100 ms away, that was 9 sequential GETs moving
    101.4 MB (its read-ahead fetched blocks twice) in 1.2 s, against one GET of 64.7 MB in
    0.43 s streamed. Elsewhere (s3fs, local files) the file fsspec gives, told the size: it
    would otherwise ask for it again (class lists: 6 requests instead of 4, 0.64 s instead of
    0.44 at 100 ms).
    """
    size = info.get("size")
    if is_http(fs):
        _, etag = version_of(info)
        return _buffered(_ResumableBody(fs, path, int(size) if size else None, etag))
    if size is None:
        return fs.open(path, "rb")
    return fs.open(path, "rb", size=int(size))


# What a streamed HTTP body is read ahead by: a few of aiohttp's pieces.
_STREAM_BUFFER_BYTES = 1 << 20


def _buffered(body: _ResumableBody) -> BinaryIO:
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
    """The one line for a read that kept failing transiently. Not the FileNotFoundError that
    fsspec makes of a HEAD answered 503: that would read as "not found", and a missing V7
    class list falls back to V5's."""
    status, _ = http_status_and_code(error)
    reason = f"HTTP {status}" if status is not None else one_line(error)
    return OistreamError(f"{reason}, {how_often} (transient); rerun the same command")


def _head(fs: Any, path: str) -> dict[str, Any]:
    """``fs.info(path)``, tried again after transient failures when ``fs`` is HTTP."""
    if not is_http(fs):
        return fs.info(path)
    rng = random.Random()
    failures = 0
    while True:
        try:
            return fs.info(path)
        except Exception as error:
            failures += 1
            _retry_or_raise(error, failures, rng)


class _ResumeRefused(Exception):
    """The server answered a resumed read with other bytes than those asked for."""


class _CutShort(ConnectionError):
    """The body ended before its announced size (transient: read on from there)."""


class _ResumableBody(io.RawIOBase):
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
        self, fs: Any, path: str, size: int | None = None, etag: str | None = None
    ) -> None:
        self._fs, self._path, self._size = fs, path, size
        self._etag = pinned_etag(etag)
        timeout = getattr(fs, "client_kwargs", {}).get("timeout")
        self._read_timeout = getattr(timeout, "sock_read", None) or DEFAULT_READ_TIMEOUT
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
        request = HttpRequest(self._fs, "GET", self._path, headers, self._read_timeout)
        response = sync(self._fs.loop, request.__aenter__)
        self._request, self._response = request, response
        if response.status == 404:
            raise FileNotFoundError(self._path)
        if response.status == 403:
            raise PermissionError(f"403 Forbidden: {self._path}")
        response.raise_for_status()
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
            raise _CutShort(f"body ended at byte {self._position} of {self._size}")
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


def cache_key(url: str, options: dict[str, Any] | None) -> str:
    """The URL as the cache knows it: an S3 key on another endpoint is another object."""
    endpoint = (options or {}).get("endpoint_url")
    return f"{url} @ {endpoint}" if endpoint else url


class MetadataCache:
    """The cache folder of one run; ``directory=None`` turns caching off but keeps the counts.

    ``open`` and ``cat`` count every body byte they hand out in ``stats``, so the summary can
    say how much metadata a run moved and how much it took from the cache.
    """

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self.directory = None if directory is None else os.fspath(directory)
        self.stats = CacheStats()
        # The class lists are read side by side (``catalog.load_classes``): counts under a lock.
        self._stats_lock = threading.Lock()
        # The small files ``cat`` handed out in this run: the hierarchy and class descriptions
        # are asked for by several steps (and per split), and are never read twice, not even
        # a HEAD, with the cache folder off too.
        self._read: dict[str, bytes] = {}
        self.zip_directories = (
            _CountingDirectoryCache(os.path.join(self.directory, DIRECTORIES_FOLDER), self.stats)
            if self.directory is not None
            else None
        )

    # -- whole files ---------------------------------------------------------------------------

    def cat(self, url: str, options: dict[str, Any] | None) -> bytes:
        """The whole object at ``url`` (a class list), from the cache when still valid; read
        once per run."""
        key = cache_key(url, options)
        if key not in self._read:
            with self.open(url, options) as file:
                self._read[key] = file.read()
        return self._read[key]

    def open(
        self,
        url: str,
        options: dict[str, Any] | None,
        progress: Callable[[int, int], None] | None = None,
    ) -> BinaryIO:
        """A binary file over ``url``'s bytes: the cached copy if its size and ETag still match
        one HEAD, else the source, copied into the cache as it is read. Over HTTP, a URL of
        which nothing is cached is read without a HEAD: the GET's answer names the copy.

        ``progress(nbytes, total)`` is called as bytes are read (total 0 when unknown). Errors
        of the storage layer propagate as the filesystem raised them (FileNotFoundError, ...).
        Anonymous S3 objects are read as plain HTTP (``sources.reading_location``): one streamed
        GET, where s3fs read the 64.7 MB benchmark CSV in two ranges after two HEADs (0.77 s
        against 0.44 s, 100 ms away). The cache knows them by ``url``.
        """
        fs, path = sources.filesystem(*sources.reading_location(url, options or {}))
        key = cache_key(url, options)
        if is_http(fs) and (self.directory is None or not _kept_copies(self._entry(key, 0, ""))):
            # Nothing to validate against: no HEAD. The GET's own headers give the size and
            # ETag that name the copy (one round trip less, before the class lists' and the
            # CSV's first byte).
            body = _ResumableBody(fs, path)
            size, etag = body.start()
            self._count("gets", 1)
            counter = self._counter("fetched_bytes", progress, size)
            if self.directory is None or size is None or etag is None:
                return _CountingReader(_buffered(body), counter)
            self._count("misses", 1)
            return self._copying(_buffered(body), self._entry(key, size, etag), size, counter)
        if self.directory is None:
            remote = fs.open(path, "rb")
            self._count("gets", 1)
            total = getattr(remote, "size", None)
            return _CountingReader(remote, self._counter("fetched_bytes", progress, total))
        info = _head(fs, path)
        self._count("heads", 1)
        size, etag = version_of(info)
        if etag is None:  # nothing to validate against: never cache it
            remote = _open_sized(fs, path, info)
            self._count("gets", 1)
            return _CountingReader(remote, self._counter("fetched_bytes", progress, size))
        entry = self._entry(key, size, etag)
        try:
            local = open(entry, "rb")  # noqa: SIM115 (handed to the caller)
        except OSError:
            local = None
        if local is not None:
            if os.fstat(local.fileno()).st_size == size:
                self._count("hits", 1)
                return _CountingReader(local, self._counter("cached_bytes", progress, size))
            local.close()  # not what it was stored as: fetch again
        self._count("misses", 1)
        remote = _open_sized(fs, path, info)
        self._count("gets", 1)
        return self._copying(remote, entry, size, self._counter("fetched_bytes", progress, size))

    @staticmethod
    def _copying(
        remote: BinaryIO, entry: str, size: int, counter: Callable[[int], None]
    ) -> BinaryIO:
        try:
            return _CopyingReader(remote, entry, size, counter)
        except OSError:  # a cache folder we cannot write to costs speed, never the run
            return _CountingReader(remote, counter)

    def _count(self, field: str, amount: int) -> None:
        with self._stats_lock:
            setattr(self.stats, field, getattr(self.stats, field) + amount)

    def _entry(self, key: str, size: int, etag: str) -> str:
        folder = os.path.join(self.directory or "", FILES_FOLDER)
        url_part = hashlib.sha256(key.encode()).hexdigest()[:32]
        version = hashlib.sha256(f"{key}\0{size}\0{etag}".encode()).hexdigest()[:32]
        return os.path.join(folder, f"{url_part}-{version}")

    def _counter(
        self, field: str, progress: Callable[[int, int], None] | None, total: int | None
    ) -> Callable[[int], None]:
        def count(nbytes: int) -> None:
            self._count(field, nbytes)
            if progress is not None:
                progress(nbytes, int(total or 0))

        return count


class _CountingReader(io.RawIOBase):
    """A read-only binary file that reports how many bytes pass through it."""

    def __init__(self, raw: Any, on_read: Callable[[int], None]) -> None:
        self._raw = raw
        self._on_read = on_read

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data:
            self._on_read(len(data))
        return data

    def readline(self, size: int | None = -1) -> bytes:
        # fsspec's buffered files take no size argument
        data = self._raw.readline() if size in (None, -1) else self._raw.readline(size)
        if data:
            self._on_read(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._raw.close()
        super().close()


class _CopyingReader(_CountingReader):
    """Reads the source and writes what it reads to a temporary file beside ``entry``; the
    file is renamed to ``entry`` only when the whole object, of the size the HEAD announced,
    has been read. Anything else (an error, a partial read, a size mismatch) leaves no entry."""

    def __init__(self, raw: Any, entry: str, size: int, on_read: Callable[[int], None]) -> None:
        super().__init__(raw, on_read)
        self._entry = entry
        self._size = size
        self._written = 0
        folder = os.path.dirname(entry)
        os.makedirs(folder, exist_ok=True)
        handle, self._temporary = tempfile.mkstemp(dir=folder, suffix=".partial")
        self._copy: BinaryIO | None = os.fdopen(handle, "wb")

    def _keep(self, data: bytes) -> None:
        if self._copy is not None and data:
            self._copy.write(data)
            self._written += len(data)

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self._keep(data)
        # Publish at the last byte (a whole-file read() never asks again) or at end of file.
        if self._written >= self._size or (not data and size != 0):
            self._finish()
        return data

    def readline(self, size: int | None = -1) -> bytes:
        data = super().readline(size)
        self._keep(data)
        if self._written >= self._size:
            self._finish()
        return data

    def _finish(self) -> None:
        """At end of file: publish the copy if it is whole."""
        if self._copy is None:
            return
        copy, self._copy = self._copy, None
        copy.close()
        if self._written != self._size or self._raw.read(1):  # short, or longer than announced
            _remove(self._temporary)
            return
        os.replace(self._temporary, self._entry)
        # Older versions of the same URL are dead weight (a train CSV is ~0.7 GB).
        for old in _kept_copies(self._entry):
            if old != self._entry:
                _remove(old)

    def close(self) -> None:
        if self._copy is not None:  # closed before the end: nothing is published
            self._copy.close()
            self._copy = None
            _remove(self._temporary)
        super().close()


class _CountingDirectoryCache(CentralDirectoryCache):
    """The zip-directory cache, counting the directory bytes it serves as bytes taken from the
    cache (what reading the directory from the zip would have cost)."""

    def __init__(self, directory: str, stats: CacheStats) -> None:
        super().__init__(directory)
        self._stats = stats

    def get(self, url: str, size: int, etag: str) -> tuple[bytes, int, int] | None:
        # The HEAD before this lookup is the fetcher's, and counted among its requests.
        found = super().get(url, size, etag)
        if found is None:
            self._stats.misses += 1
        else:
            self._stats.hits += 1
            self._stats.cached_bytes += len(found[0])
        return found

    def put(self, url: str, size: int, etag: str, *args: Any) -> None:
        # A cache folder we cannot write to must not turn into "unreadable zip" failures.
        with contextlib.suppress(OSError):
            super().put(url, size, etag, *args)


def _kept_copies(entry: str) -> list[str]:
    """The complete copies kept beside ``entry`` (a name ``MetadataCache._entry`` made) for its
    URL, whatever their size and ETag."""
    url_part = os.path.basename(entry).split("-")[0]
    return [
        path
        for path in glob.glob(os.path.join(os.path.dirname(entry), f"{url_part}-*"))
        if not path.endswith(".partial")
    ]


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


__all__ = ["CacheStats", "MetadataCache", "cache_key", "default_cache_dir", "version_of"]
