"""A run's first shards fetched ahead of their jobs while the zips' directories are read.

For the one shard this process builds itself: its images at once (they need nothing of the
directories), and each zip's masks as soon as that zip's directory is in. Without the masks
the job could only start once every directory was read, and all its mask requests followed:
on the 1% benchmark (940 images, 16 zips, 100 ms latency) 0.8 s of a 3.5 s run went to masks
asked for after the last directory, the first directory having been in 0.35 s before the last.
Asking for a zip's masks together also lets neighbours across images share a request
(``remotezip.coalesce``), where the job asks image by image.

For the shards worker processes start with: their images only, interleaved, and only until the
last directory is in (``stop``); their tasks carry them to the workers. On the 20% benchmark
(18,800 images in 19 shards, two workers) the directories took 0.8 s in which no image was
asked for.

Everything fetched ahead is held until a job takes it, so it stays within a byte budget.
Anything that fails ends the prefetch (a throttling or unreachable server would otherwise cost
its retries twice); the job fetches what is left and judges each failure as it would have.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from oistream import sources
from oistream.sharding.fetch import Fetcher, FetchError, FetchStats
from oistream.sharding.options import DEFAULT_MAX_MEMBER_BYTES
from oistream.sharding.remotezip import ZipMember, fetch_members


class ShardPrefetch:
    """Shards' images and masks fetched ahead through one ``fetcher``, about
    ``budget_bytes`` held at most: ``images`` (image ID -> JPEG bytes) and ``masks`` (mask path
    -> PNG bytes, inflated and CRC-checked by ``fetch_members``).

    ``image_ids`` and ``mask_paths`` are fetched in their order; images are read through
    ``images`` (filesystem, root), masks from the zips under ``metadata``'s (none without it).
    Runs on one event loop; not thread-safe.
    """

    def __init__(
        self,
        fetcher: Fetcher,
        budget_bytes: int,
        split: str,
        image_ids: Sequence[str],
        mask_paths: Sequence[str],
        *,
        images: tuple[Any, str],
        metadata: tuple[Any, str] | None = None,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ) -> None:
        self.fetcher = fetcher
        self.budget_bytes = budget_bytes
        self.split = split
        self.image_ids = image_ids
        self.max_member_bytes = max_member_bytes
        self._images_fs, self._images_root = images
        self._metadata = metadata
        self._masks_by_zip: dict[str, list[str]] = defaultdict(list)
        for path in mask_paths:
            self._masks_by_zip[sources.mask_zip_prefix(path)].append(path)
        self.images: dict[str, bytes] = {}
        self.masks: dict[str, bytes] = {}
        self.failed = False
        self._stopped = False
        self._held = 0
        self._mask_fetches: list[asyncio.Task[None]] = []

    @property
    def stats(self) -> FetchStats:
        return self.fetcher.stats

    @property
    def filesystems(self) -> list[Any]:
        """The filesystems it reads through, for the caller to close."""
        return [self._images_fs] + ([self._metadata[0]] if self._metadata else [])

    async def fetch_images(self, workers: int) -> None:
        """The images in their order, ``workers`` requests at a time, until the budget is
        held, one fails or ``stop`` is called."""
        fs, root = self._images_fs, self._images_root
        waiting = iter(self.image_ids)

        async def fetch_in_turn() -> None:
            # Each worker checks before its next request: at most `workers` bodies arrive
            # beyond the budget, and none is asked for after a failure.
            for image_id in waiting:
                if self.failed or self._stopped or self._held >= self.budget_bytes:
                    return
                path = fs._strip_protocol(sources.image_url(root, self.split, image_id))
                try:
                    data = await self.fetcher.cat(fs, path)
                except (FetchError, OSError):
                    self.failed = True
                    return
                self.images[image_id] = data
                self._held += len(data)

        await asyncio.gather(*(fetch_in_turn() for _ in range(max(1, workers))))

    def zip_located(
        self, prefix: str, members: Mapping[str, ZipMember], size: int, etag: str | None
    ) -> None:
        """Start fetching the shard's masks in the zip ``prefix`` whose directory, read under
        ``size`` and ``etag``, gave ``members``: in plan order, as many as the budget holds by
        their declared sizes (reserved now, so the zips share it). ``wait`` awaits them."""
        if self._metadata is None:
            return
        taken = []
        for path in self._masks_by_zip.get(prefix, ()):
            member = members.get(path)
            if member is None:
                continue  # missing from its zip: the job says so
            if self.failed or self._held + member.file_size > self.budget_bytes:
                break
            self._held += member.file_size
            taken.append(member)
        if taken:
            fs, root = self._metadata
            zip_path = fs._strip_protocol(sources.mask_zip_url(root, self.split, prefix))
            self._mask_fetches.append(
                asyncio.ensure_future(self._fetch_masks(fs, zip_path, taken, size, etag))
            )

    async def _fetch_masks(
        self, fs: Any, zip_path: str, members: list[ZipMember], size: int, etag: str | None
    ) -> None:
        if self.failed:
            return
        results = await fetch_members(
            self.fetcher,
            fs,
            zip_path,
            members,
            object_size=size,
            etag=etag,
            max_member_bytes=self.max_member_bytes,
        )
        for name, value in results.items():
            if isinstance(value, bytes):
                self.masks[name] = value
            else:  # left for the job, which asks again and judges it
                self.failed = True

    def stop(self) -> None:
        """Ask for no more images: those in flight still arrive."""
        self._stopped = True

    async def wait(self) -> None:
        """Until every mask fetch started has finished."""
        await asyncio.gather(*self._mask_fetches)
