"""Find where each planned mask sits in its remote zip, reading each zip's directory once.

This runs on the planning side, so workers (local processes or Dask tasks) get exact byte
offsets and only ever fetch members: no worker reads a central directory again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from oistream import sources
from oistream.sharding.fetch import Fetcher, FetchError, MissingObject, RetryPolicy
from oistream.sharding.plan import Plan
from oistream.sharding.remotezip import (
    CentralDirectoryCache,
    CorruptZip,
    ZipMember,
    _cache_url,
    _version_tag,
    fetch_central_directory,
    read_central_directory,
)

# Central directories of train zips are ~17 MB each: enough at a time to hide the round trips
# (three requests each), few enough to keep the peak small.
DIRECTORIES_AT_ONCE = 8


@dataclass
class MemberLocations:
    members: dict[str, ZipMember] = field(default_factory=dict)
    # prefix -> reason, for zips that are missing or not zips (confirmed by a second read):
    # permanent, their images' failures go into complete shards.
    zip_errors: dict[str, str] = field(default_factory=dict)
    # prefix -> reason, for zips that could not be read this time (network, throttling, a
    # cache that cannot be written): their shards are left for a rerun.
    zip_transient: dict[str, str] = field(default_factory=dict)
    # prefix -> (size, ETag or None) the directory was read under: member reads check and pin it.
    zip_objects: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    requests: int = 0
    bytes_requested: int = 0


def locate_members(
    plan: Plan,
    metadata_root: str,
    options: dict[str, Any],
    concurrency: int = 64,
    cache_dir: str | None = None,
    retry: RetryPolicy | None = None,
    *,
    cache: CentralDirectoryCache | None = None,
    on_directory: Callable[[int], None] | None = None,
    known_failures: Mapping[str, BaseException] | None = None,
) -> MemberLocations:
    """``cache`` (or a folder, ``cache_dir``) keeps each directory on disk, keyed by the zip's
    size and ETag: a rerun then costs one HEAD per zip instead of its whole directory.
    ``on_directory(total)`` is called as each zip's directory is done (a progress bar).
    ``known_failures`` (zip prefix -> error) are a ``DirectoryPrefetch``'s: a zip it could not
    fetch is not asked again, one it found not to be a zip gets only the confirming read."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for mask_path in plan.mask_paths():
        # MaskPath starts with the ImageID, whose first hex digit names the zip.
        wanted[mask_path[0]].add(mask_path)
    if cache is None and cache_dir:
        cache = CentralDirectoryCache(cache_dir)
    return asyncio.run(
        _locate(
            plan.split,
            wanted,
            metadata_root,
            options,
            concurrency,
            cache,
            retry or RetryPolicy(),
            on_directory,
            known_failures,
        )
    )


async def _locate(
    split: str,
    wanted: dict[str, set[str]],
    metadata_root: str,
    options: dict[str, Any],
    concurrency: int,
    cache: CentralDirectoryCache | None,
    retry: RetryPolicy,
    on_directory: Callable[[int], None] | None = None,
    known_failures: Mapping[str, BaseException] | None = None,
) -> MemberLocations:
    fs = await sources.open_async_filesystem(metadata_root, options)
    fetcher = Fetcher(concurrency=concurrency, retry=retry)
    result = MemberLocations()
    gate = asyncio.Semaphore(DIRECTORIES_AT_ONCE)

    async def read_one(prefix: str, names: set[str]) -> None:
        url = sources.mask_zip_url(metadata_root, split, prefix)
        path = fs._strip_protocol(url)
        async with gate:
            try:
                known = (known_failures or {}).get(prefix)
                if isinstance(known, FetchError):
                    raise known  # how the prefetch's read ended, after all its attempts
                info = await fetcher.info(fs, path)
                if info.get("size") is None:
                    raise FetchError(f"HEAD {url}: the server reports no size", url=url)
                size, etag = int(info["size"]), _version_tag(info)
                try:
                    if isinstance(known, CorruptZip):
                        raise known  # the prefetch's read was the first one
                    directory = await read_central_directory(
                        fetcher, fs, path, size, wanted=names, cache=cache, etag=etag
                    )
                except CorruptZip:
                    # An HTML error page or a cut transfer may be the network's doing: a zip is
                    # called unreadable only when a second, uncached read agrees.
                    directory = await read_central_directory(
                        fetcher, fs, path, size, wanted=names, etag=etag
                    )
            except MissingObject:
                result.zip_errors[prefix] = f"mask zip {url} is missing"
                return
            except CorruptZip as error:  # not a zip: its masks fail, the others go on
                result.zip_errors[prefix] = f"mask zip {url} is unreadable: {error}"
                return
            except FetchError as error:
                result.zip_transient[prefix] = f"mask zip {url} could not be read: {error}"
                return
            except OSError as error:  # the zip index cache: environment, not data
                result.zip_transient[prefix] = f"zip index cache: {type(error).__name__}: {error}"
                return
            result.members.update(directory)
            result.zip_objects[prefix] = (size, etag)

    async def read_and_count(prefix: str, names: set[str]) -> None:
        try:
            await read_one(prefix, names)
        finally:
            if on_directory is not None:
                on_directory(len(wanted))

    try:
        await asyncio.gather(*(read_and_count(p, n) for p, n in sorted(wanted.items())))
    finally:
        await sources.close_async_filesystem(fs)
    result.requests = fetcher.stats.requests
    result.bytes_requested = fetcher.stats.bytes
    return result


# The mask zips of a split are named by the first hex digit of their images' IDs.
ZIP_PREFIXES = "0123456789abcdef"


class DirectoryPrefetch:
    """Reads every zip directory of a split into the zip index cache on a thread of its own,
    while the CSV is read and the plan made: ``locate_members`` then finds them there.

    The directories do not depend on the plan, only which of them it needs does, and a plan of
    a few hundred images or more needs all sixteen. Read after the plan, they followed the CSV:
    2 round trips and the directories' transfer (26.9 MB on the benchmark's fake train split,
    ~270 MB on the real one) after it, instead of beside it. The bytes are stored as read, not
    parsed here: ``locate_members`` parses each once, and a damaged entry is dropped and read
    again there. ``failures`` (prefix -> error) go to ``locate_members``, which reports them
    without asking a failing server again. ``keys`` are the cache entries this prefetch stored
    (so that finding them later is not counted as taking them from the cache); ``requests``
    and ``bytes_requested`` what it cost.
    """

    def __init__(
        self,
        split: str,
        metadata_root: str,
        options: dict[str, Any],
        cache: CentralDirectoryCache,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.keys: set[tuple[str, int, str]] = set()
        self.failures: dict[str, BaseException] = {}  # prefix -> how its read ended
        self.requests = self.bytes_requested = 0
        self._arguments = (split, metadata_root, options, cache, retry or RetryPolicy())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zip-directories", daemon=True)

    def start(self) -> DirectoryPrefetch:
        self._thread.start()
        self._started.wait()
        return self

    def wait(self) -> None:
        """Until every directory is read (or given up on)."""
        self._thread.join()

    def cancel(self) -> None:
        """Stop reading (the run failed before it needed them) and wait for the thread."""
        if self._loop is not None and self._task is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile: nothing to stop
                self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            self._loop = loop
            self._task = loop.create_task(self._read_all())
            self._started.set()
            loop.run_until_complete(self._task)
        except BaseException:  # cancelled, or what locate_members meets and reports
            pass
        finally:
            self._started.set()
            loop.close()

    async def _read_all(self) -> None:
        split, metadata_root, options, cache, retry = self._arguments
        fs = await sources.open_async_filesystem(metadata_root, options)
        fetcher = Fetcher(concurrency=64, retry=retry)
        gate = asyncio.Semaphore(DIRECTORIES_AT_ONCE)

        async def read_one(prefix: str) -> None:
            try:
                await fetch_one(prefix)
            except (FetchError, CorruptZip) as error:
                self.failures[prefix] = error

        async def fetch_one(prefix: str) -> None:
            path = fs._strip_protocol(sources.mask_zip_url(metadata_root, split, prefix))
            async with gate:
                info = await fetcher.info(fs, path)
                size, etag = info.get("size"), _version_tag(info)
                if size is None or etag is None:
                    return  # nothing to key a cache entry by
                key = (_cache_url(fs, path), int(size), etag)
                if cache.has(*key):
                    return
                record = await fetch_central_directory(fetcher, fs, path, int(size), etag)
                cache.put(*key, *record)
                self.keys.add(key)

        try:
            # How a zip's read failed is handed to locate_members (``failures``), which reports it;
            # anything else (the cache folder) it meets again by itself.
            await asyncio.gather(*(read_one(p) for p in ZIP_PREFIXES), return_exceptions=True)
        finally:
            self.requests = fetcher.stats.requests
            self.bytes_requested = fetcher.stats.bytes
            await sources.close_async_filesystem(fs)
