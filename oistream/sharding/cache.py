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
* ``zip-directories/{sha256(url)}.url``: empty; says a directory of that zip is kept, so the
  next run validates it with a HEAD instead of reading the zip's tail at once.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from oistream import sources
from oistream.sharding.fetch import is_http
from oistream.sharding.httpread import RequestCounter, ResumableBody, buffered, head
from oistream.sharding.remotezip import CentralDirectoryCache

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
    # Requests sent for them, as the server counts them: every HEAD and GET, the ones that
    # failed and the ranged GETs that resumed a broken body included (through s3fs or a local
    # filesystem: one per HEAD or opened file, whatever the library does inside).
    requests: int = 0
    retries: int = 0  # of those, the ones sent after a failure
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


def _open_sized(
    fs: Any, path: str, info: dict[str, Any], on_request: RequestCounter | None = None
) -> BinaryIO:
    """``path`` opened for one read from start to end, told the size our HEAD (``info``) gave.

    Over HTTP(S) it is one streamed GET, resumed where it breaks off (``ResumableBody``):
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
        body = ResumableBody(fs, path, int(size) if size else None, etag, on_request)
        return buffered(body)
    if on_request is not None:
        on_request(False)
    if size is None:
        return fs.open(path, "rb")
    return fs.open(path, "rb", size=int(size))


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
        # The class lists are read side by side (``classes.load_classes``): counts under a lock.
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
            body = ResumableBody(fs, path, on_request=self._count_request)
            size, etag = body.start()
            counter = self._counter("fetched_bytes", progress, size)
            if self.directory is None or size is None or etag is None:
                return _CountingReader(buffered(body), counter)
            self._count("misses", 1)
            return self._copying(buffered(body), self._entry(key, size, etag), size, counter)
        if self.directory is None:
            self._count_request(False)
            remote = fs.open(path, "rb")
            total = getattr(remote, "size", None)
            return _CountingReader(remote, self._counter("fetched_bytes", progress, total))
        info = head(fs, path, self._count_request)
        size, etag = version_of(info)
        if etag is None:  # nothing to validate against: never cache it
            remote = _open_sized(fs, path, info, self._count_request)
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
        remote = _open_sized(fs, path, info, self._count_request)
        return self._copying(remote, entry, size, self._counter("fetched_bytes", progress, size))

    @staticmethod
    def _copying(
        remote: BinaryIO, entry: str, size: int, counter: Callable[[int], None]
    ) -> BinaryIO:
        try:
            return _CopyingReader(remote, entry, size, counter)
        except OSError:  # a cache folder we cannot write to costs speed, never the run
            return _CountingReader(remote, counter)

    def _count_request(self, retry: bool) -> None:
        with self._stats_lock:
            self.stats.requests += 1
            self.stats.retries += retry

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
