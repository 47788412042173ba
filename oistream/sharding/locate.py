"""Find where each planned mask sits in its remote zip, reading each zip's directory once.

This runs on the planning side, so workers (local processes or Dask tasks) get exact byte
offsets and only ever fetch members: no worker reads a central directory again.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from oistream import sources
from oistream.sharding.fetch import Fetcher, FetchError, MissingObject
from oistream.sharding.plan import Plan
from oistream.sharding.remotezip import CentralDirectoryCache, ZipMember, read_central_directory

# Central directories of train zips are ~17 MB each: enough at a time to hide the round trips
# (three requests each), few enough to keep the peak small.
DIRECTORIES_AT_ONCE = 8


@dataclass
class MemberLocations:
    members: dict[str, ZipMember] = field(default_factory=dict)
    zip_errors: dict[str, str] = field(default_factory=dict)  # prefix -> reason
    requests: int = 0
    bytes_requested: int = 0


def locate_members(
    plan: Plan,
    metadata_root: str,
    options: dict[str, Any],
    concurrency: int = 64,
    cache_dir: str | None = None,
) -> MemberLocations:
    """``cache_dir`` keeps each directory on disk, keyed by the zip's size and ETag: a rerun
    then costs one HEAD per zip instead of its whole directory."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for mask_path in plan.mask_paths():
        # MaskPath starts with the ImageID, whose first hex digit names the zip.
        wanted[mask_path[0]].add(mask_path)
    cache = CentralDirectoryCache(cache_dir) if cache_dir else None
    return asyncio.run(_locate(plan.split, wanted, metadata_root, options, concurrency, cache))


async def _locate(
    split: str,
    wanted: dict[str, set[str]],
    metadata_root: str,
    options: dict[str, Any],
    concurrency: int,
    cache: CentralDirectoryCache | None,
) -> MemberLocations:
    fs = await sources.open_async_filesystem(metadata_root, options)
    fetcher = Fetcher(concurrency=concurrency)
    result = MemberLocations()
    gate = asyncio.Semaphore(DIRECTORIES_AT_ONCE)

    async def read_one(prefix: str, names: set[str]) -> None:
        url = sources.mask_zip_url(metadata_root, split, prefix)
        async with gate:
            try:
                directory = await read_central_directory(
                    fetcher, fs, fs._strip_protocol(url), wanted=names, cache=cache
                )
            except MissingObject:
                result.zip_errors[prefix] = f"mask zip {url} is missing"
                return
            except FetchError:
                raise
            except Exception as error:  # a malformed zip: its masks fail, the others go on
                result.zip_errors[prefix] = f"mask zip {url} is unreadable: {error}"
                return
            result.members.update(directory)

    try:
        await asyncio.gather(*(read_one(p, n) for p, n in sorted(wanted.items())))
    finally:
        await sources.close_async_filesystem(fs)
    result.requests = fetcher.stats.requests
    result.bytes_requested = fetcher.stats.bytes
    return result
