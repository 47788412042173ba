"""What a run fetches ahead of its first shards' jobs (``prefetch.ShardPrefetch``): images in
their order and each zip's masks once its directory is in, within a byte budget, nothing more
after a failure or once stopped."""

from __future__ import annotations

import asyncio
import zipfile
from pathlib import Path

from oistream import sources
from oistream.sharding.fetch import Fetcher, RetryPolicy
from oistream.sharding.prefetch import ShardPrefetch
from oistream.sharding.remotezip import read_zip_directory
from oistream.testing.hostileserver import HostileServer

RETRY = RetryPolicy(attempts=1)
IDS = [f"{i:016x}" for i in range(40)]


def _images(root: Path) -> dict[str, bytes]:
    folder = root / "images" / "train"
    folder.mkdir(parents=True)
    images = {}
    for image_id in IDS:
        images[image_id] = image_id.encode() * 64  # 1 kB each
        (folder / f"{image_id}.jpg").write_bytes(images[image_id])
    return images


def _mask_zip(root: Path, prefix: str, masks: dict[str, bytes]) -> Path:
    """The zip of ``prefix`` under ``root/meta``, written by zipfile: an independent writer."""
    folder = root / "meta" / "v5" / "train-masks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"train-masks-{prefix}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in masks.items():
            archive.writestr(name, data)
    return path


def _prefetch(server: HostileServer, budget: int, mask_paths: list[str], **kwargs) -> ShardPrefetch:
    """A ``ShardPrefetch`` of ``IDS`` over ``server``, run to the end: ``kwargs`` are
    ``workers`` (image requests at a time; 0: no images), ``zips`` (prefixes whose
    directories to read and hand over, one after the other) and ``after_directories`` (called
    between the two)."""
    workers, zips = kwargs.get("workers", 0), kwargs.get("zips", ())

    async def run() -> ShardPrefetch:
        images_root, metadata_root = f"{server.url}/images", f"{server.url}/meta"
        images_fs = await sources.open_async_filesystem(images_root)
        metadata_fs = await sources.open_async_filesystem(metadata_root)
        ahead = ShardPrefetch(
            Fetcher(concurrency=4, retry=RETRY),
            budget,
            "train",
            IDS,
            mask_paths,
            images=(images_fs, images_root),
            metadata=(metadata_fs, metadata_root),
        )
        try:
            if workers:
                await ahead.fetch_images(workers)
            directories = {}
            for prefix in zips:
                url = sources.mask_zip_url(metadata_root, "train", prefix)
                path = metadata_fs._strip_protocol(url)
                fetcher = Fetcher(retry=RETRY)
                directories[prefix] = await read_zip_directory(fetcher, metadata_fs, path)
            kwargs.get("after_directories", lambda: None)()
            for prefix, (members, size, etag) in directories.items():
                ahead.zip_located(prefix, members, size, etag)
                await ahead.wait()  # one zip after the other: each sees how the last ended
        finally:
            for fs in ahead.filesystems:
                await sources.close_async_filesystem(fs)
        return ahead

    return asyncio.run(run())


def test_images_are_fetched_in_order_up_to_the_budget_and_not_after_a_failure(tmp_path):
    images = _images(tmp_path)
    with HostileServer(tmp_path) as server:
        everything = _prefetch(server, 1 << 20, [], workers=4)
        bounded = _prefetch(server, 10 * 1024, [], workers=1)
        (tmp_path / "images" / "train" / f"{IDS[3]}.jpg").unlink()
        after_missing = _prefetch(server, 1 << 20, [], workers=1)
    assert everything.images == images and not everything.failed
    assert list(bounded.images) == IDS[:10]  # one request at a time: it stops at the budget
    assert list(after_missing.images) == IDS[:3] and after_missing.failed


def test_a_zips_masks_are_fetched_in_plan_order_up_to_the_budget(tmp_path):
    """Once a zip's directory is handed over its masks of the shard come, checked and
    inflated: in plan order, as many as the budget holds by their sizes; masks of other zips,
    of other shards, or missing from the zip are not asked for."""
    zero = {f"0{i:015x}_m0abc_{i:08x}.png": bytes([i]) * 1000 for i in range(8)}
    one = {f"1{i:015x}_m0abc_{i:08x}.png": bytes([i]) * 1000 for i in range(4)}
    _mask_zip(tmp_path, "0", {**zero, "0fffffffffffffff_m0abc_ffffffff.png": b"other shard"})
    _mask_zip(tmp_path, "1", one)
    # Plan order is not zip order: the shard lists zip 0's masks backwards, and one it lacks.
    planned = [*reversed(zero), *one, "0eeeeeeeeeeeeeee_m0abc_eeeeeeee.png"]
    with HostileServer(tmp_path) as server:
        both = _prefetch(server, 1 << 20, planned, zips=["0", "1"])
        only_zero = _prefetch(server, 1 << 20, planned, zips=["0"])
        bounded = _prefetch(server, 3500, planned, zips=["0", "1"])
    assert both.masks == {**zero, **one} and not both.failed
    assert only_zero.masks == zero
    assert set(bounded.masks) == set(list(reversed(zero))[:3])  # 3 x 1000 bytes fit in 3500


def test_a_mask_that_cannot_be_fetched_ends_the_prefetch(tmp_path):
    """A zip that is gone by the time its masks are asked for: none of its masks is kept, the
    prefetch stops (the job asks again and judges), and what was fetched before stays."""
    zero = {f"0{i:015x}_m0abc_{i:08x}.png": b"zero" * 100 for i in range(3)}
    one = {f"1{i:015x}_m0abc_{i:08x}.png": b"one" * 100 for i in range(3)}
    _mask_zip(tmp_path, "0", zero)
    gone = _mask_zip(tmp_path, "1", one)
    with HostileServer(tmp_path) as server:
        ahead = _prefetch(
            server, 1 << 20, [*zero, *one], zips=["0", "1"], after_directories=gone.unlink
        )
        _mask_zip(tmp_path, "1", one)
        server.reset_stats()
        failing = _prefetch(
            server, 1 << 20, [*one, *zero], zips=["1", "0"], after_directories=gone.unlink
        )
        zero_gets = server.stats.gets_by_path["/meta/v5/train-masks/train-masks-0.zip"]
    assert ahead.masks == zero and ahead.failed  # zip 0's came before zip 1's failed
    assert failing.masks == {} and failing.failed
    assert zero_gets == 1  # its directory's tail; none of its masks was asked for after that


def test_a_fetcher_widened_takes_more_requests_at_once(tmp_path):
    """``Fetcher.widen``: the directories' share of the concurrency, lent to the prefetch once
    they are read."""
    _images(tmp_path)

    async def most_in_flight(widen_by: int) -> int:
        fs = await sources.open_async_filesystem(f"{server.url}/images")
        fetcher = Fetcher(concurrency=1, retry=RETRY)
        fetcher.widen(widen_by)
        try:
            paths = [fs._strip_protocol(f"{server.url}/images/train/{i}.jpg") for i in IDS[:6]]
            await asyncio.gather(*(fetcher.cat(fs, p) for p in paths))
        finally:
            await sources.close_async_filesystem(fs)
        return fetcher.stats.max_in_flight

    with HostileServer(tmp_path) as server:
        assert asyncio.run(most_in_flight(0)) == 1
        assert asyncio.run(most_in_flight(2)) == 3


def test_images_stop_being_asked_for_once_stopped_and_those_in_flight_arrive(tmp_path):
    """``stop`` (the directories are in, the workers take over): no image is asked for after
    it, and the one asked for before it is kept."""
    _images(tmp_path)
    ahead: ShardPrefetch | None = None

    class StopsAtTheFifth(Fetcher):
        async def cat(self, fs, path, *args, **kwargs):
            if self.stats.requests == 4:
                ahead.stop()  # while the fifth is on its way
            return await super().cat(fs, path, *args, **kwargs)

    async def run() -> None:
        nonlocal ahead
        root = f"{server.url}/images"
        fs = await sources.open_async_filesystem(root)
        ahead = ShardPrefetch(
            StopsAtTheFifth(retry=RETRY), 1 << 20, "train", IDS, [], images=(fs, root)
        )
        try:
            await ahead.fetch_images(1)
        finally:
            await sources.close_async_filesystem(fs)

    with HostileServer(tmp_path) as server:
        asyncio.run(run())
        asked = sum(server.stats.gets_by_path.values())
    assert list(ahead.images) == IDS[:5] and not ahead.failed
    assert asked == 5
