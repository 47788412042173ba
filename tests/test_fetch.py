"""The fetcher: right bytes through every kind of fault, bounded attempts, honest counters."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import uuid
from typing import Any

import aiohttp
import botocore.exceptions
import botocore.parsers
import fsspec
import pytest
import s3fs
from s3fs.errors import translate_boto_error

from oistream.sharding.fetch import (
    Fetcher,
    FetchError,
    MissingObject,
    RetryPolicy,
    classify_error,
    sole_retry_layer,
)
from oistream.testing.faultproxy import FaultProxy

logging.getLogger("werkzeug").setLevel(logging.ERROR)

CREDENTIALS = {"key": "testing", "secret": "testing"}
QUICK = RetryPolicy(attempts=5, base_delay=0.001, max_delay=0.01, timeout=20)
BLOB_SIZE = 200_000


@pytest.fixture(scope="module")
def blob(moto_endpoint: str) -> tuple[str, bytes]:
    """``(bucket/key, bytes)`` of an object anyone may read."""
    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True, **CREDENTIALS)
    bucket = f"fetch-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket, acl="public-read")
    data = os.urandom(BLOB_SIZE)
    fs.pipe(f"{bucket}/blob", data)
    return f"{bucket}/blob", data


def open_fs(kind: str, endpoint: str, key: str) -> tuple[Any, str]:
    """An async filesystem of ``kind`` on ``endpoint`` and the path of ``key`` in it.

    Call inside the running loop: async filesystems bind to the loop that creates them.
    """
    if kind == "s3":
        fs = s3fs.S3FileSystem(
            endpoint_url=endpoint, asynchronous=True, skip_instance_cache=True, **CREDENTIALS
        )
        return fs, key
    fs = fsspec.filesystem("http", asynchronous=True, skip_instance_cache=True)
    return fs, f"{endpoint}/{key}"


async def close_fs(fs: Any) -> None:
    if getattr(fs, "_s3", None) is not None:
        await fs._s3.__aexit__(None, None, None)
    if getattr(fs, "_session", None) is not None:
        await fs._session.close()


RANGES = [(start, start + 5_000 + start % 777) for start in range(0, 150_000, 5_000)]


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_reads_ranges_whole_objects_and_sizes(
    kind: str, moto_endpoint: str, blob: tuple[str, bytes]
) -> None:
    key, data = blob
    with FaultProxy(moto_endpoint, keep_log=True) as proxy:

        async def main() -> tuple[list[bytes], bytes, int, bytes, bytes, Fetcher]:
            fs, path = open_fs(kind, proxy.endpoint_url, key)
            fetcher = Fetcher(concurrency=8)
            try:
                parts = await asyncio.gather(*(fetcher.cat(fs, path, a, b) for a, b in RANGES))
                whole = await fetcher.cat(fs, path)
                size = await fetcher.size(fs, path)
                # A range reaching past the end of the object is not a short read.
                tail = await fetcher.cat(fs, path, BLOB_SIZE - 10, BLOB_SIZE + 50)
                empty = await fetcher.cat(fs, path, 100, 100)
                return parts, whole, size, tail, empty, fetcher
            finally:
                await close_fs(fs)

        parts, whole, size, tail, empty, fetcher = asyncio.run(main())
        log = proxy.stats.log
    assert parts == [data[a:b] for a, b in RANGES]
    assert whole == data and size == BLOB_SIZE and tail == data[-10:] and empty == b""
    whole_gets = [entry for entry in log if entry[0] == "GET" and entry[2] is None]
    assert len(whole_gets) == 1  # one GET for the whole object, no HEAD in front of it
    stats = fetcher.stats
    assert stats.retries == 0 and stats.failures == 0
    assert stats.bytes == sum(b - a for a, b in RANGES) + BLOB_SIZE + 10
    assert 1 <= stats.max_in_flight <= 8 and 0 < stats.mean_in_flight <= 8
    assert stats.in_flight == 0


@pytest.mark.parametrize("kind", ["s3", "http"])
@pytest.mark.parametrize(
    "faults",
    [
        {"fail_rate": 0.5},
        {"reset_rate": 0.5},
        {"truncate_rate": 0.5},
        {"fail_rate": 0.2, "reset_rate": 0.2, "truncate_rate": 0.2},
    ],
    ids=["503", "reset", "truncate", "mixed"],
)
def test_every_fault_is_retried_until_the_bytes_are_right(
    kind: str, faults: dict[str, float], moto_endpoint: str, blob: tuple[str, bytes]
) -> None:
    key, data = blob
    with FaultProxy(moto_endpoint, seed=3, max_faults_per_request=3, **faults) as proxy:

        async def main() -> tuple[list[bytes], Fetcher]:
            fs, path = open_fs(kind, proxy.endpoint_url, key)
            fetcher = Fetcher(concurrency=16, retry=QUICK)
            try:
                parts = await asyncio.gather(*(fetcher.cat(fs, path, a, b) for a, b in RANGES))
                return parts, fetcher
            finally:
                await close_fs(fs)

        parts, fetcher = asyncio.run(main())
        injected = proxy.stats.faults
    assert parts == [data[a:b] for a, b in RANGES]
    assert sum(injected.values()) > 0
    # Every injected fault cost exactly one retry: none was absorbed by s3fs or botocore.
    assert fetcher.stats.retries == sum(injected.values())
    assert fetcher.stats.throttled == injected.get("fail", 0)
    assert fetcher.stats.requests == len(RANGES) + fetcher.stats.retries
    assert fetcher.stats.failures == 0


@pytest.mark.parametrize("kind", ["s3", "http"])
@pytest.mark.parametrize("fault", ["fail_rate", "reset_rate", "truncate_rate"])
def test_a_permanently_failing_upstream_ends_in_fetch_error_after_bounded_attempts(
    kind: str, fault: str, moto_endpoint: str, blob: tuple[str, bytes]
) -> None:
    key, _ = blob
    policy = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01)
    with FaultProxy(moto_endpoint, **{fault: 1.0}) as proxy:

        async def main() -> tuple[FetchError, Fetcher]:
            fs, path = open_fs(kind, proxy.endpoint_url, key)
            fetcher = Fetcher(retry=policy)
            try:
                with pytest.raises(FetchError) as caught:
                    await fetcher.cat(fs, path, 0, 1000)
                return caught.value, fetcher
            finally:
                await close_fs(fs)

        error, fetcher = asyncio.run(main())
        requests_seen = proxy.stats.requests
    assert not isinstance(error, MissingObject)
    assert error.attempts == 3 and "gave up after 3 attempts" in str(error)
    assert path_in(error, key)
    assert requests_seen == 3  # no hidden retries below the fetcher
    assert fetcher.stats.failures == 1 and fetcher.stats.retries == 2
    if fault == "fail_rate":
        assert error.status == 503


def path_in(error: FetchError, key: str) -> bool:
    return key in str(error) and error.url.endswith(key)


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_a_missing_object_is_reported_at_once(
    kind: str, moto_endpoint: str, blob: tuple[str, bytes]
) -> None:
    key, _ = blob
    missing_key = key.rsplit("/", 1)[0] + "/no-such-object"
    with FaultProxy(moto_endpoint) as proxy:

        async def main() -> tuple[MissingObject, Fetcher]:
            fs, path = open_fs(kind, proxy.endpoint_url, missing_key)
            fetcher = Fetcher(retry=QUICK)
            try:
                with pytest.raises(MissingObject) as caught:
                    await fetcher.cat(fs, path, 0, 100)
                with pytest.raises(MissingObject):
                    await fetcher.size(fs, path)
                return caught.value, fetcher
            finally:
                await close_fs(fs)

        error, fetcher = asyncio.run(main())
    # Over HTTP the fetcher makes the request itself, so the status is known there too.
    assert error.status == 404 and error.attempts == 1
    assert fetcher.stats.retries == 0 and fetcher.stats.missing == 2


def test_a_dead_endpoint_and_a_stalled_one_end_in_fetch_error() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    policy = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.01, timeout=0.3)

    async def fetch_from(endpoint: str) -> FetchError:
        fs, path = open_fs("s3", endpoint, "bucket/key")
        try:
            with pytest.raises(FetchError) as caught:
                await Fetcher(retry=policy).cat(fs, path, 0, 10)
            return caught.value
        finally:
            await close_fs(fs)

    refused = asyncio.run(fetch_from(f"http://127.0.0.1:{dead_port}"))
    assert refused.attempts == 2
    # A server that never answers: each attempt is cut off by the policy's timeout.
    with FaultProxy(f"http://127.0.0.1:{dead_port}", latency=30) as proxy:
        stalled = asyncio.run(fetch_from(proxy.endpoint_url))
    assert stalled.attempts == 2 and "Timeout" in str(stalled)


def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    response = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return botocore.exceptions.ClientError(response, "GetObject")


def _caused(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


def _response_error(status: int) -> aiohttp.ClientResponseError:
    return aiohttp.ClientResponseError(None, (), status=status)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "verdict"),
    [
        (_client_error("NoSuchKey", 404), "missing"),
        (translate_boto_error(_client_error("NoSuchKey", 404)), "missing"),
        (translate_boto_error(_client_error("SlowDown", 503)), "transient"),
        (translate_boto_error(_client_error("InternalError", 500)), "transient"),
        (translate_boto_error(_client_error("BadGateway", 502)), "transient"),
        (translate_boto_error(_client_error("AccessDenied", 403)), "fatal"),
        (translate_boto_error(_client_error("InvalidRange", 416)), "fatal"),
        (_client_error("Throttling", 400), "transient"),
        (_response_error(503), "transient"),
        (_response_error(429), "transient"),
        (_response_error(404), "missing"),
        (_response_error(403), "fatal"),
        (FileNotFoundError("x"), "missing"),
        # fsspec's HTTP _info turns any failure into FileNotFoundError: look at the cause.
        (_caused(FileNotFoundError("x"), aiohttp.ServerDisconnectedError()), "transient"),
        (_caused(FileNotFoundError("x"), _response_error(503)), "transient"),
        (aiohttp.ClientPayloadError("cut"), "transient"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "transient"),
        (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), "transient"),
        (botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), "transient"),
        (botocore.parsers.ResponseParserError("half a response"), "transient"),
        (botocore.exceptions.SSLError(endpoint_url="https://x", error="bad cert"), "fatal"),
        (botocore.exceptions.NoCredentialsError(), "fatal"),
        (asyncio.TimeoutError(), "transient"),
        (OSError(errno.EBUSY, "Please reduce your request rate."), "transient"),
        (PermissionError(errno.EACCES, "denied"), "fatal"),
        (ValueError("a bug"), None),
    ],
)
def test_errors_are_classified(error: BaseException, verdict: str | None) -> None:
    assert classify_error(error) == verdict


class FakeFS:
    """An async filesystem whose answers the test scripts."""

    async_impl = True
    protocol = "fake"

    def __init__(self, data: bytes, answers: list[Any] | None = None):
        self.data = data
        self.answers = list(answers or [])
        self.active = 0
        self.gate: asyncio.Event | None = None
        self.all_busy: asyncio.Event | None = None
        self.busy_target = 0

    async def _cat_file(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        self.active += 1
        try:
            if self.gate is not None:
                if self.active >= self.busy_target and self.all_busy is not None:
                    self.all_busy.set()
                await self.gate.wait()
            answer = self.answers.pop(0) if self.answers else "right"
            if isinstance(answer, BaseException):
                raise answer
            if answer == "short":
                return self.data[start:end][:-1]
            if answer == "whole":
                return self.data
            return self.data[start:end]
        finally:
            self.active -= 1

    async def _info(self, path: str) -> dict[str, Any]:
        return {"size": len(self.data)}


def test_short_reads_are_retried_and_ignored_ranges_are_refused() -> None:
    data = bytes(range(256)) * 10

    async def main() -> None:
        fetcher = Fetcher(retry=QUICK)
        assert await fetcher.cat(FakeFS(data, ["short", "short"]), "p", 10, 60) == data[10:60]
        assert fetcher.stats.retries == 2
        with pytest.raises(FetchError, match="ignored the Range header") as caught:
            await fetcher.cat(FakeFS(data, ["whole"]), "p", 10, 60)
        assert caught.value.attempts == 1
        with pytest.raises(FetchError, match="short read"):
            await fetcher.cat(FakeFS(data, ["short"] * 10), "p", 0, 100)
        # Not an I/O failure: propagates as itself, unretried.
        with pytest.raises(ValueError, match="a bug"):
            await fetcher.cat(FakeFS(data, [ValueError("a bug")]), "p", 0, 10)

    asyncio.run(main())


def test_concurrency_is_bounded_and_in_flight_is_measured() -> None:
    async def main() -> Fetcher:
        fs = FakeFS(b"x" * 1000)
        fs.gate, fs.all_busy, fs.busy_target = asyncio.Event(), asyncio.Event(), 8
        fetcher = Fetcher(concurrency=8)
        tasks = [asyncio.ensure_future(fetcher.cat(fs, "p", i, i + 10)) for i in range(40)]
        await fs.all_busy.wait()
        for _ in range(20):  # let every other task try to get in
            await asyncio.sleep(0)
        assert fs.active == 8 and fetcher.stats.in_flight == 8
        fs.gate.set()
        assert await asyncio.gather(*tasks) == [b"x" * 10] * 40
        return fetcher

    stats = asyncio.run(main()).stats
    assert stats.max_in_flight == 8 and stats.requests == 40 and stats.in_flight == 0
    assert 0 < stats.mean_in_flight <= 8


def test_local_files_work_through_a_thread(tmp_path: Any) -> None:
    target = tmp_path / "object.bin"
    data = os.urandom(5000)
    target.write_bytes(data)
    fs = fsspec.filesystem("file")

    async def main() -> tuple[bytes, int]:
        fetcher = Fetcher()
        return await fetcher.cat(fs, str(target), 100, 200), await fetcher.size(fs, str(target))

    assert asyncio.run(main()) == (data[100:200], 5000)
    with pytest.raises(MissingObject):
        asyncio.run(Fetcher().cat(fs, str(tmp_path / "absent"), 0, 1))


def test_sole_retry_layer_switches_off_inner_retries_before_the_client_exists() -> None:
    fs = s3fs.S3FileSystem(endpoint_url="http://127.0.0.1:9", skip_instance_cache=True)
    sole_retry_layer(fs)
    assert fs.retries == 1
    assert fs.config_kwargs["retries"] == {"total_max_attempts": 1, "mode": "standard"}
