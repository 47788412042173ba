"""The fault proxy forwards faithfully, injects the faults it is asked for, and scales."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import threading
import uuid

import aiohttp
import pytest
import s3fs
from aiohttp import web

from oistream.testing.faultproxy import FaultProxy

logging.getLogger("werkzeug").setLevel(logging.ERROR)

CREDENTIALS = {"key": "testing", "secret": "testing"}


@pytest.fixture(scope="module")
def stored_object(moto_endpoint: str) -> tuple[str, bytes]:
    """``(bucket/key, bytes)`` of a 300 kB object on the moto server."""
    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True, **CREDENTIALS)
    bucket = f"proxy-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket, acl="public-read")  # moto refuses anonymous reads of private buckets
    data = os.urandom(300_000)
    fs.pipe(f"{bucket}/blob", data)
    return f"{bucket}/blob", data


class BarrierUpstream:
    """A tiny upstream: ``/barrier`` answers only once ``parties`` requests wait at once;
    ``/echo`` answers with the request's headers and the sha256 of its body."""

    def __init__(self, parties: int):
        self.parties = parties
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _barrier(self, request: web.Request) -> web.Response:
        self._arrived += 1
        if self._arrived >= self.parties:
            self._all_here.set()
        await self._all_here.wait()
        return web.Response(body=b"x" * 100)

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {"headers": dict(request.headers), "sha256": hashlib.sha256(body).hexdigest()}
        )

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._arrived = 0
        self._all_here = asyncio.Event()
        app = web.Application(client_max_size=16 * 2**20)
        app.router.add_get("/barrier", self._barrier)
        app.router.add_route("*", "/echo", self._echo)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        self._loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    def __enter__(self) -> BarrierUpstream:
        self._thread.start()
        self._ready.wait()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


async def _get(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, bytes]:
    async with session.get(url, headers=headers) as response:
        return response.status, await response.read()


def test_forwards_ranges_heads_and_uploads_and_counts_bytes(
    moto_endpoint: str, stored_object: tuple[str, bytes]
) -> None:
    key, data = stored_object
    with FaultProxy(moto_endpoint, keep_log=True) as proxy:
        assert proxy.endpoint_url.startswith("http://127.0.0.1:")

        async def main() -> None:
            async with aiohttp.ClientSession() as session:
                status, body = await _get(
                    session, f"{proxy.endpoint_url}/{key}", Range="bytes=1000-1999"
                )
                assert (status, body) == (206, data[1000:2000])
                status, body = await _get(session, f"{proxy.endpoint_url}/{key}")
                assert (status, body) == (200, data)
                async with session.head(f"{proxy.endpoint_url}/{key}") as response:
                    assert response.headers["Content-Length"] == str(len(data))

        asyncio.run(main())
        # An upload through the proxy (signed, streamed body) lands intact upstream.
        via_proxy = s3fs.S3FileSystem(
            endpoint_url=proxy.endpoint_url, skip_instance_cache=True, **CREDENTIALS
        )
        bucket = key.split("/")[0]
        via_proxy.pipe(f"{bucket}/uploaded", data[:77_777])
        stats = proxy.stats

    direct = s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True, **CREDENTIALS)
    assert direct.cat_file(f"{bucket}/uploaded") == data[:77_777]
    assert stats.ranged_gets == 1 and stats.unranged_gets == 1
    assert stats.statuses[206] == 1 and stats.statuses[200] >= 3  # GET, HEAD, PUT
    assert stats.methods["PUT"] == 1
    assert stats.bytes_sent == 1000 + len(data) + sum(
        entry[4] for entry in stats.log if entry[0] == "PUT"
    )
    assert stats.faults == {}


def test_keeps_host_and_headers_and_streams_request_bodies() -> None:
    with (
        BarrierUpstream(parties=1) as upstream,
        FaultProxy(f"http://127.0.0.1:{upstream.port}") as proxy,
    ):

        async def main() -> dict:
            async with aiohttp.ClientSession() as session:
                body = os.urandom(2_000_000)
                async with session.put(
                    f"{proxy.endpoint_url}/echo?x=1&y=%2F",
                    data=body,
                    headers={"Host": "bucket.example:9", "X-Amz-Meta-Thing": "kept"},
                ) as response:
                    answer = await response.json()
                answer["expected"] = hashlib.sha256(body).hexdigest()
                return answer

        answer = asyncio.run(main())
    assert answer["sha256"] == answer["expected"]
    assert answer["headers"]["Host"] == "bucket.example:9"
    assert answer["headers"]["X-Amz-Meta-Thing"] == "kept"


def test_injected_faults_look_like_their_real_counterparts(
    moto_endpoint: str, stored_object: tuple[str, bytes]
) -> None:
    key, _ = stored_object

    async def fetch(proxy: FaultProxy) -> object:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.get(f"{proxy.endpoint_url}/{key}") as response:
                    return response.status, await response.read()
            except aiohttp.ClientError as error:
                return error

    with FaultProxy(moto_endpoint, fail_rate=1.0) as proxy:
        status, body = asyncio.run(fetch(proxy))
        assert status == 503 and b"<Code>SlowDown</Code>" in body
    for kind in ("reset", "truncate"):
        with FaultProxy(moto_endpoint, **{f"{kind}_rate": 1.0}) as proxy:
            outcome = asyncio.run(fetch(proxy))
            stats = proxy.stats
        # The client notices: the body ends before Content-Length says it should.
        assert isinstance(outcome, aiohttp.ClientPayloadError | aiohttp.ClientConnectionError)
        assert stats.faults == {kind: 1}
        assert 0 < stats.bytes_sent < 300_000


def _fault_sequence(upstream: str, seed: int, key: str) -> list[tuple]:
    with FaultProxy(
        upstream, fail_rate=0.2, reset_rate=0.2, truncate_rate=0.2, seed=seed, keep_log=True
    ) as proxy:

        async def main() -> None:
            async with aiohttp.ClientSession() as session:
                for _round in range(3):
                    for start in range(0, 10_000, 1_000):
                        headers = {"Range": f"bytes={start}-{start + 999}"}
                        with contextlib.suppress(aiohttp.ClientError):
                            await _get(session, f"{proxy.endpoint_url}/{key}", **headers)

        asyncio.run(main())
        return [
            (path, byte_range, status, sent)
            for _, path, byte_range, status, sent in proxy.stats.log
        ]


def test_faults_depend_only_on_the_seed_and_the_request(
    moto_endpoint: str, stored_object: tuple[str, bytes]
) -> None:
    key, _ = stored_object
    first = _fault_sequence(moto_endpoint, 7, key)
    again = _fault_sequence(moto_endpoint, 7, key)
    other = _fault_sequence(moto_endpoint, 8, key)
    assert first == again
    assert first != other
    statuses = {status for _, _, status, _ in first}
    assert {206, 503} <= statuses


def test_max_faults_per_request_lets_a_patient_client_through(
    moto_endpoint: str, stored_object: tuple[str, bytes]
) -> None:
    key, _ = stored_object
    with FaultProxy(moto_endpoint, fail_rate=1.0, max_faults_per_request=2) as proxy:

        async def main() -> list[int]:
            async with aiohttp.ClientSession() as session:
                return [
                    (await _get(session, f"{proxy.endpoint_url}/{key}", Range="bytes=0-9"))[0]
                    for _ in range(3)
                ]

        assert asyncio.run(main()) == [503, 503, 206]


def test_holds_hundreds_of_requests_in_flight_at_once() -> None:
    """The upstream answers only when all 300 requests are waiting at the same time: a proxy
    that serialised or capped its connections would never get an answer."""
    parties = 300
    with (
        BarrierUpstream(parties) as upstream,
        FaultProxy(f"http://127.0.0.1:{upstream.port}", latency=0.05) as proxy,
    ):

        async def main() -> list[int]:
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                url = f"{proxy.endpoint_url}/barrier"
                answers = await asyncio.gather(*(_get(session, url) for _ in range(parties)))
                return [status for status, _ in answers]

        assert asyncio.run(main()) == [200] * parties
        stats = proxy.stats
    assert stats.max_concurrent == parties
    assert stats.bytes_sent == 100 * parties


def test_runs_in_a_child_process(moto_endpoint: str, stored_object: tuple[str, bytes]) -> None:
    key, data = stored_object
    with FaultProxy(moto_endpoint, fail_rate=1.0, max_faults_per_request=1, process=True) as proxy:

        async def main() -> list[tuple[int, bytes]]:
            async with aiohttp.ClientSession() as session:
                url = f"{proxy.endpoint_url}/{key}"
                return [await _get(session, url, Range="bytes=5-14") for _ in range(2)]

        (first_status, _), second = asyncio.run(main())
        stats = proxy.stats
        proxy.reset_stats()
        assert proxy.stats.requests == 0
    assert first_status == 503 and second == (206, data[5:15])
    assert stats.requests == 2 and stats.faults == {"fail": 1}
    assert json.loads(json.dumps(stats.statuses, default=str))  # plain, picklable data
