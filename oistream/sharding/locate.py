"""Find where each planned mask sits in its remote zip, reading each zip's directory once.

This runs on the planning side, so workers (local processes or Dask tasks) get exact byte
offsets and only ever fetch members: no worker reads a central directory again.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from oistream import sources
from oistream.sharding.fetch import Fetcher, FetchError, MissingObject, RetryPolicy
from oistream.sharding.remotezip import (
    ByteBudget,
    CentralDirectoryCache,
    CorruptZip,
    ZipMember,
    read_zip_directory,
)

if TYPE_CHECKING:  # not at run time: plan imports numpy, which a run imports on a thread
    from oistream.sharding.plan import Plan

# Directory bytes fetched at once. Central directories of train zips are ~17 MB each: 8 at a
# time hide the round trips and keep the peak small. A budget of bytes, not a count of zips:
# every zip's tail goes at once, and small directories (the fake bucket's 1.7 MB) all
# come together. Counting 8 zips had read the fake's 16 in two waves of three round trips,
# 0.72 s of the 1% benchmark's run.
DIRECTORY_BYTES_AT_ONCE = 8 * 17 * 2**20


# (zip prefix, members found, size, ETag) of a zip whose directory was just read.
ZipCallback = Callable[[str, Mapping[str, ZipMember], int, "str | None"], None]


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
    retries: int = 0
    bytes_requested: int = 0


async def locate_members(
    plan: Plan,
    metadata_root: str,
    options: dict[str, Any],
    concurrency: int = 64,
    cache_dir: str | None = None,
    retry: RetryPolicy | None = None,
    *,
    cache: CentralDirectoryCache | None = None,
    on_directory: Callable[[int], None] | None = None,
    on_zip: ZipCallback | None = None,
) -> MemberLocations:
    """Each planned mask's member in its zip, read on the running event loop (beside other
    work on it: a small run's images).

    ``cache`` (or a folder, ``cache_dir``) keeps each directory on disk, keyed by the zip's
    size and ETag: a rerun then costs one HEAD per zip instead of its whole directory.
    ``on_directory(total)`` is called as each zip's directory is done (a progress bar);
    ``on_zip(prefix, members, size, etag)`` as each is read, with the members found (so the
    caller can start fetching them on the same loop, through a filesystem of its own: this
    one is closed when the last directory is read)."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for mask_path in plan.mask_paths():
        wanted[sources.mask_zip_prefix(mask_path)].add(mask_path)
    if cache is None and cache_dir:
        cache = CentralDirectoryCache(cache_dir)
    return await _locate(
        plan.split,
        wanted,
        metadata_root,
        options,
        concurrency,
        cache,
        retry or RetryPolicy(),
        on_directory,
        on_zip,
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
    on_zip: ZipCallback | None = None,
) -> MemberLocations:
    fs = await sources.open_async_filesystem(metadata_root, options)
    fetcher = Fetcher(concurrency=concurrency, retry=retry)
    result = MemberLocations()
    budget = ByteBudget(DIRECTORY_BYTES_AT_ONCE)

    async def read_one(prefix: str, names: set[str]) -> None:
        url = sources.mask_zip_url(metadata_root, split, prefix)
        path = fs._strip_protocol(url)
        try:
            try:
                directory, size, etag = await read_zip_directory(
                    fetcher, fs, path, wanted=names, cache=cache, budget=budget
                )
            except CorruptZip:
                # An HTML error page or a cut transfer may be the network's doing: a zip is
                # called unreadable only when a second, uncached read agrees.
                directory, size, etag = await read_zip_directory(
                    fetcher, fs, path, wanted=names, budget=budget
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
        if on_zip is not None:
            on_zip(prefix, directory, size, etag)

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
    result.retries = fetcher.stats.retries
    result.bytes_requested = fetcher.stats.bytes
    return result
