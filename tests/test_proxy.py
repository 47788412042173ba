"""The proxy's counts that the benchmarks read: bytes by kind, framing, in-flight means, CPU.

(``test_faultproxy.py`` covers forwarding and faults.)
"""

from __future__ import annotations

import asyncio
import threading

import aiohttp
import pytest
from aiohttp import web

from oistream.testing.proxy import Proxy

FIXED = b"f" * 10_000
CHUNKS = [b"c" * 3_000, b"d" * 4_000]


class Upstream:
    """``/fixed``: a body with Content-Length; ``/chunked``: one sent chunked;
    ``/gate``: answers once ``parties`` requests wait at once."""

    def __init__(self, parties: int = 1):
        self.parties = parties
        self.port = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _fixed(self, request: web.Request) -> web.Response:
        return web.Response(body=FIXED)

    async def _chunked(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for chunk in CHUNKS:
            await response.write(chunk)
        await response.write_eof()
        return response

    async def _gate(self, request: web.Request) -> web.Response:
        self._arrived += 1
        if self._arrived >= self.parties:
            self._open.set()
        await self._open.wait()
        return web.Response(body=b"g")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._arrived = 0
        self._open = asyncio.Event()
        app = web.Application()
        app.router.add_get("/fixed", self._fixed)
        app.router.add_get("/chunked", self._chunked)
        app.router.add_get("/gate", self._gate)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    def __enter__(self) -> Upstream:
        self._thread.start()
        self._ready.wait()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


async def _get_all(urls: list[str], method: str = "GET") -> list[tuple[int, bytes]]:
    """Fetch ``urls`` concurrently; ``(status, body)`` of each."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(url: str) -> tuple[int, bytes]:
            async with session.request(method, url) as response:
                return response.status, await response.read()

        return await asyncio.gather(*(one(url) for url in urls))


@pytest.mark.parametrize("process", [False, True])
def test_counts_bytes_by_kind_through_both_framings(process: bool) -> None:
    kinds = [("fixed", b"GET /fixed"), ("chunked", b"GET /chunked")]
    with (
        Upstream() as upstream,
        Proxy(f"http://127.0.0.1:{upstream.port}", process=process) as proxy,
    ):
        proxy.reset_stats(kinds=kinds)
        base = proxy.endpoint_url
        # In sequence, so that keep-alive connections carry several responses each.
        answers = [asyncio.run(_get_all([f"{base}/fixed", f"{base}/chunked"])) for _ in range(3)]
        heads = asyncio.run(_get_all([f"{base}/fixed"], method="HEAD"))
        stats = proxy.stats
    chunked_body = b"".join(CHUNKS)
    assert all(pair == [(200, FIXED), (200, chunked_body)] for pair in answers)
    assert heads == [(200, b"")]
    assert stats.requests == stats.responses == 7 and stats.unframed_connections == 0
    assert stats.requests_by_kind == {"fixed": 3, "chunked": 3, "other": 1}
    # Bodies are counted as payload: without chunk-size lines, the same on both sides.
    assert stats.body_bytes_by_kind == {"fixed": 3 * len(FIXED), "chunked": 3 * len(chunked_body)}
    assert stats.body_bytes == stats.bytes_sent == 3 * (len(FIXED) + len(chunked_body))
    # Heads and chunk framing are in bytes_down, and in the kind they answered.
    assert stats.bytes_down == sum(stats.bytes_by_kind.values())
    assert stats.bytes_by_kind["chunked"] > 3 * len(chunked_body)
    assert stats.bytes_by_kind["other"] > 0  # the HEAD's answer: a head alone
    assert stats.statuses == {200: 7} and stats.methods == {"GET": 6, "HEAD": 1}
    assert stats.unranged_gets == 6 and stats.ranged_gets == 0 and stats.bytes_up > 0
    assert stats.cpu_seconds > 0
    assert (
        set(stats.first_start_by_kind)
        == set(stats.last_end_by_kind)
        == {
            "fixed",
            "chunked",
            "other",
        }
    )
    assert all(
        stats.first_start_by_kind[k] <= stats.last_end_by_kind[k] for k in stats.last_end_by_kind
    )


def test_in_flight_counts_and_the_watched_span() -> None:
    """``/gate`` answers only when all requests wait at once, so all were in flight together."""
    parties = 20
    with (
        Upstream(parties) as upstream,
        Proxy(f"http://127.0.0.1:{upstream.port}", latency=0.05) as proxy,
    ):
        asyncio.run(_get_all([f"{proxy.endpoint_url}/fixed"]))
        proxy.reset_stats(watch=b"GET /gate")
        asyncio.run(_get_all([f"{proxy.endpoint_url}/fixed"]))  # before the watched span
        answers = asyncio.run(_get_all([f"{proxy.endpoint_url}/gate"] * parties))
        stats = proxy.stats
    assert answers == [(200, b"g")] * parties
    assert stats.requests == parties + 1 and stats.watched_requests == parties
    assert stats.max_in_flight == stats.max_concurrent == parties and stats.in_flight == 0
    # A time-weighted mean lies between none and the most at once; over the watched span,
    # where the 20 waited together, it is above the whole run's, which includes one alone.
    assert 0 < stats.mean_in_flight < parties
    assert stats.watched_mean_in_flight is not None
    assert stats.mean_in_flight < stats.watched_mean_in_flight <= parties
    assert 0 < stats.watched_seconds < stats.active_seconds


def test_a_chunked_answer_is_not_cut_and_an_upstream_that_is_gone_gets_502() -> None:
    with (
        Upstream() as upstream,
        Proxy(f"http://127.0.0.1:{upstream.port}", truncate_rate=1.0) as proxy,
    ):
        assert asyncio.run(_get_all([f"{proxy.endpoint_url}/chunked"])) == [(200, b"".join(CHUNKS))]
        assert proxy.stats.faults == {}  # a body of unknown length cannot be cut in half
        port = upstream.port
    with Proxy(f"http://127.0.0.1:{port}") as proxy:  # the upstream has stopped
        [(status, body)] = asyncio.run(_get_all([f"{proxy.endpoint_url}/fixed"]))
        stats = proxy.stats
    assert status == 502 and b"upstream failed" in body
    assert stats.statuses == {502: 1}


def test_rejects_an_upstream_it_cannot_relay_to() -> None:
    with pytest.raises(ValueError, match="http://host:port"):
        Proxy("http://127.0.0.1:9/prefix")
    with pytest.raises(ValueError, match="http://host:port"):
        Proxy("https://127.0.0.1:9")
