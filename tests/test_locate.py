"""Where the planned masks sit: the zip directories read beside the CSV (DirectoryPrefetch),
then found in the cache by locate_members, and a prefetch's failures handed on, not repeated."""

from __future__ import annotations

import shutil
from pathlib import Path

from oistream import sources
from oistream.sharding import catalog
from oistream.sharding.fetch import MissingObject, RetryPolicy
from oistream.sharding.locate import ZIP_PREFIXES, DirectoryPrefetch, locate_members
from oistream.sharding.plan import make_plan
from oistream.sharding.remotezip import CentralDirectoryCache, CorruptZip

QUICK = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.01)


def _plan(metadata: Path):
    root = str(metadata)
    classes = catalog.resolve_classes(["Person", "Car"], catalog.load_classes(root))
    url = sources.segmentation_csv_url(root, "train")
    table = catalog.read_segmentations(url, [c.mid for c in classes])
    return make_plan(table, classes, "train")


def test_prefetched_directories_are_found_in_the_cache_with_the_same_members(
    fake_bucket: Path, tmp_path: Path
) -> None:
    metadata = fake_bucket / "openimages"
    cache = CentralDirectoryCache(tmp_path / "cache")
    prefetch = DirectoryPrefetch("train", str(metadata), {}, cache, QUICK).start()
    prefetch.wait()
    assert prefetch.failures == {}
    assert len(prefetch.keys) == len(ZIP_PREFIXES)
    assert all(cache.has(*key) for key in prefetch.keys)
    assert prefetch.bytes_requested > 0

    plan = _plan(metadata)
    cold = locate_members(plan, str(metadata), {}, retry=QUICK)
    warm = locate_members(plan, str(metadata), {}, retry=QUICK, cache=cache)
    assert warm.members == cold.members and len(warm.members) == len(plan.mask_paths())
    assert warm.zip_objects == cold.zip_objects
    assert warm.bytes_requested == 0  # one HEAD per zip, no directory read again
    # A second prefetch finds every directory stored: it reads none.
    again = DirectoryPrefetch("train", str(metadata), {}, cache, QUICK).start()
    again.wait()
    assert again.keys == set() and again.bytes_requested == 0


def test_a_prefetchs_failures_are_reported_by_the_locate_without_asking_again(
    fake_bucket: Path, tmp_path: Path
) -> None:
    metadata = tmp_path / "openimages"
    shutil.copytree(fake_bucket / "openimages", metadata)
    zips = metadata / "v5" / "train-masks"
    (zips / "train-masks-3.zip").unlink()
    (zips / "train-masks-5.zip").write_bytes(b"<html>not a zip</html>" * 100)
    cache = CentralDirectoryCache(tmp_path / "cache")
    prefetch = DirectoryPrefetch("train", str(metadata), {}, cache, QUICK).start()
    prefetch.wait()
    assert isinstance(prefetch.failures["3"], MissingObject)
    assert isinstance(prefetch.failures["5"], CorruptZip)
    assert len(prefetch.keys) == len(ZIP_PREFIXES) - 2

    plan = _plan(metadata)
    alone = locate_members(plan, str(metadata), {}, retry=QUICK, cache=cache)
    handed = locate_members(
        plan, str(metadata), {}, retry=QUICK, cache=cache, known_failures=prefetch.failures
    )
    assert handed.zip_errors == alone.zip_errors
    assert "is missing" in handed.zip_errors["3"]
    assert "is unreadable" in handed.zip_errors["5"]
    assert handed.members == alone.members
    # The missing zip is not asked again (its HEAD), the broken one gets only the confirming
    # read (no cached read first): fewer requests than reading them afresh.
    assert handed.requests < alone.requests


def test_cancelling_a_prefetch_stops_it(fake_bucket: Path, tmp_path: Path) -> None:
    cache = CentralDirectoryCache(tmp_path / "cache")
    prefetch = DirectoryPrefetch("train", str(fake_bucket / "openimages"), {}, cache).start()
    prefetch.cancel()  # returns once its thread has ended, however far it got
    assert not prefetch._thread.is_alive()
