"""The fetcher's own checks on S3 and HTTP: a pinned ETag, and answers checked as they arrive."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
import s3fs
from test_fetch import BLOB_SIZE, CREDENTIALS, QUICK, close_fs, open_fs

from oistream.sharding.fetch import Fetcher, FetchError, ObjectChanged


@pytest.fixture(scope="module")
def blob(moto_endpoint: str) -> tuple[str, bytes]:
    """``(bucket/key, bytes)`` of an object anyone may read."""
    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True, **CREDENTIALS)
    bucket = f"pinned-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket, acl="public-read")
    data = os.urandom(BLOB_SIZE)
    fs.pipe(f"{bucket}/blob", data)
    return f"{bucket}/blob", data


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_a_pinned_etag_reads_while_it_holds_and_fails_as_changed_after(
    kind: str, moto_endpoint: str, blob: tuple[str, bytes]
) -> None:
    key, data = blob

    async def main() -> tuple[bytes, BaseException, Fetcher]:
        fs, path = open_fs(kind, moto_endpoint, key)
        fetcher = Fetcher(concurrency=4, retry=QUICK)
        try:
            etag = (await fetcher.info(fs, path))["ETag"]
            part = await fetcher.cat(fs, path, 1000, 2000, if_match=etag)
            with pytest.raises(FetchError) as changed:
                await fetcher.cat(fs, path, 1000, 2000, if_match='"0123456789abcdef"')
            return part, changed.value, fetcher
        finally:
            await close_fs(fs)

    part, changed, fetcher = asyncio.run(main())
    assert part == data[1000:2000]
    assert isinstance(changed, ObjectChanged) and changed.attempts == 1
    assert fetcher.stats.retries == 0


def test_an_s3_range_past_the_end_is_still_checked(
    moto_endpoint: str, blob: tuple[str, bytes]
) -> None:
    key, data = blob

    async def main() -> bytes:
        fs, path = open_fs("s3", moto_endpoint, key)
        try:
            return await Fetcher(retry=QUICK).cat(fs, path, BLOB_SIZE - 10, BLOB_SIZE + 50)
        finally:
            await close_fs(fs)

    assert asyncio.run(main()) == data[-10:]
