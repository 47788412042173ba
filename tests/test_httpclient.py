"""The fetcher's lean HTTP client: framing, keep-alive, and every way a server can misbehave."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import fsspec
import pytest

from oistream.sharding import httpclient
from oistream.sharding.fetch import Fetcher, FetchError, ObjectTooLarge, RetryPolicy

QUICK = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01, timeout=5, read_timeout=0.5)
BODY = bytes(range(256)) * 40  # 10,240 bytes

Handler = Callable[[bytes, asyncio.StreamWriter, int], Awaitable[bool]]


@pytest.fixture(autouse=True)
def lean_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OISTREAM_HTTP_CLIENT", "lean")


def test_the_switch_and_filesystems_it_cannot_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = fsspec.filesystem("http", skip_instance_cache=True)
    assert httpclient.usable_for(plain)
    with_auth = fsspec.filesystem("http", skip_instance_cache=True, client_kwargs={"auth": 1})
    assert not httpclient.usable_for(with_auth)
    monkeypatch.setenv("OISTREAM_HTTP_CLIENT", "aiohttp")
    assert not httpclient.usable_for(plain)
    monkeypatch.delenv("OISTREAM_HTTP_CLIENT")
    assert httpclient.usable_for(plain)  # the default: every shard test goes through it


async def serve(handler: Handler) -> tuple[asyncio.AbstractServer, str, list[int]]:
    """A raw HTTP server: ``handler(request head, writer, request number)`` answers each request
    and returns whether to keep the connection. Returns the server, its URL and a list that
    counts the connections it accepted."""
    connections: list[int] = []
    count = [0]

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                count[0] += 1
                if not await handler(head, writer, count[0]):
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", connections


def answer(status: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def byte_range(head: bytes) -> tuple[int, int] | None:
    for line in head.decode().split("\r\n"):
        if line.lower().startswith("range: bytes="):
            first, last = line.split("=", 1)[1].split("-")
            return int(first), int(last)
    return None


async def ranged_answer(head: bytes, writer: asyncio.StreamWriter, number: int) -> bool:
    """A well-behaved server: 206 for ranges, 200 for the whole object, keep-alive."""
    wanted = byte_range(head)
    if wanted is None:
        writer.write(answer("200 OK", {"Content-Length": str(len(BODY))}, BODY))
    else:
        first, last = wanted
        part = BODY[first : last + 1]
        headers = {
            "Content-Length": str(len(part)),
            "Content-Range": f"bytes {first}-{last}/{len(BODY)}",
        }
        writer.write(answer("206 Partial Content", headers, part))
    return True


def run(handler: Handler, use: Callable[[Fetcher, Any, str], Awaitable[Any]]) -> tuple[Any, Any]:
    """``use(fetcher, fs, url)`` against a server answering with ``handler``; returns its result
    (or the exception it raised) and the server's connection count."""

    async def main() -> tuple[Any, Any]:
        server, url, connections = await serve(handler)
        fs = fsspec.filesystem("http", asynchronous=True, skip_instance_cache=True)
        assert httpclient.usable_for(fs)
        try:
            result: Any = await use(Fetcher(concurrency=8, retry=QUICK), fs, f"{url}/object")
        except Exception as error:  # handed back to the test
            result = error
        finally:
            httpclient.close_pool(fs)
            server.close()
            await server.wait_closed()
        return result, len(connections)

    return asyncio.run(main())


def test_ranges_and_whole_objects_reuse_one_connection() -> None:
    async def use(fetcher: Fetcher, fs: Any, url: str) -> list[bytes]:
        parts = [await fetcher.cat(fs, url, start, start + 1000) for start in range(0, 9000, 1000)]
        return [*parts, await fetcher.cat(fs, url), await fetcher.info(fs, url)]

    result, connections = run(ranged_answer, use)
    *parts, whole, info = result
    assert b"".join(parts) == BODY[:9000] and whole == BODY and info["size"] == len(BODY)
    assert connections == 1  # keep-alive: eleven requests, one connection


def test_chunked_and_close_delimited_bodies_are_read_whole() -> None:
    async def handler(head: bytes, writer: asyncio.StreamWriter, number: int) -> bool:
        if number == 1:
            chunks = b"".join(
                b"%x;ext=1\r\n%s\r\n" % (len(BODY[i : i + 3000]), BODY[i : i + 3000])
                for i in range(0, len(BODY), 3000)
            )
            writer.write(answer("200 OK", {"Transfer-Encoding": "chunked"}, chunks + b"0\r\n\r\n"))
            return True
        writer.write(answer("200 OK", {}, BODY))  # no length: the body ends with the connection
        return False

    async def use(fetcher: Fetcher, fs: Any, url: str) -> tuple[bytes, bytes]:
        return await fetcher.cat(fs, url), await fetcher.cat(fs, url)

    (chunked, delimited), connections = run(handler, use)
    assert chunked == BODY and delimited == BODY and connections == 1


def test_a_body_cut_short_or_a_dropped_connection_is_retried() -> None:
    async def handler(head: bytes, writer: asyncio.StreamWriter, number: int) -> bool:
        if number == 1:  # promises the range, sends half, hangs up
            writer.write(
                answer(
                    "206 Partial Content",
                    {"Content-Length": "1000", "Content-Range": f"bytes 0-999/{len(BODY)}"},
                    BODY[:500],
                )
            )
            return False
        if number == 2:  # hangs up before answering
            return False
        return await ranged_answer(head, writer, number)

    async def use(fetcher: Fetcher, fs: Any, url: str) -> tuple[bytes, int]:
        return await fetcher.cat(fs, url, 0, 1000), fetcher.stats.retries

    (data, retries), connections = run(handler, use)
    assert data == BODY[:1000] and retries == 2 and connections == 3


def test_a_stalled_body_times_out_and_is_retried_then_given_up() -> None:
    async def handler(head: bytes, writer: asyncio.StreamWriter, number: int) -> bool:
        writer.write(answer("200 OK", {"Content-Length": str(len(BODY))}, BODY[:100]))
        await writer.drain()
        await asyncio.sleep(3)  # longer than read_timeout: the client must not wait for it
        return False

    async def use(fetcher: Fetcher, fs: Any, url: str) -> bytes:
        return await fetcher.cat(fs, url)

    loop_started = asyncio.new_event_loop().time()
    error, _ = run(handler, use)
    assert isinstance(error, FetchError) and error.attempts == QUICK.attempts
    assert "no byte from the server" in str(error)
    assert asyncio.new_event_loop().time() - loop_started < QUICK.attempts * 1.5


def test_a_server_sending_more_than_asked_is_cut_off_and_refused() -> None:
    async def handler(head: bytes, writer: asyncio.StreamWriter, number: int) -> bool:
        if number == 1:  # ignores Range: the whole (2 MB) object with 200
            whole = BODY * 200
            writer.write(answer("200 OK", {"Content-Length": str(len(whole))}, whole))
            return True
        writer.write(answer("200 OK", {}, BODY * 50))  # a whole object over the cap
        return False

    async def use(fetcher: Fetcher, fs: Any, url: str) -> list[BaseException]:
        errors: list[BaseException] = []
        try:
            await fetcher.cat(fs, url, 0, 100)
        except FetchError as error:
            errors.append(error)
        small = Fetcher(retry=QUICK, max_object_bytes=len(BODY) * 2)
        try:
            await small.cat(fs, url)
        except FetchError as error:
            errors.append(error)
        return errors

    errors, connections = run(handler, use)
    ignored, too_large = errors
    assert "ignored Range" in str(ignored) and ignored.attempts == 1
    assert isinstance(too_large, ObjectTooLarge)
    # The first connection was dropped with most of its body unread, not reused.
    assert connections == 2


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 2000 Nope\r\n\r\n",
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n",  # Latin-1 "²": isdigit, not int
        b"HTTP/1.1 20\xb2 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_a_malformed_answer_is_a_fetch_error_at_once(garbage: bytes) -> None:
    async def handler(head: bytes, writer: asyncio.StreamWriter, number: int) -> bool:
        writer.write(garbage)
        await writer.drain()
        await asyncio.sleep(0.2)
        return False

    async def use(fetcher: Fetcher, fs: Any, url: str) -> bytes:
        return await fetcher.cat(fs, url)

    error, _ = run(handler, use)
    assert isinstance(error, FetchError) and error.attempts == 1 and error.status == 400


def test_error_statuses_are_classified_as_with_aiohttp() -> None:
    async def handler(head: bytes, writer: asyncio.StreamWriter, number: int) -> bool:
        status = {1: "503 Slow Down", 2: "404 Not Found"}.get(number, "403 Forbidden")
        writer.write(answer(status, {"Content-Length": "5"}, b"nope!"))
        return True

    async def use(fetcher: Fetcher, fs: Any, url: str) -> list[BaseException]:
        errors = []
        for _ in range(2):
            try:
                await fetcher.cat(fs, url, 0, 10)
            except FetchError as error:
                errors.append(error)
        return errors

    (missing, forbidden), connections = run(handler, use)
    # The 503 was retried on the same connection, the 404 is missing, the 403 fatal.
    assert type(missing).__name__ == "MissingObject" and missing.attempts == 2
    assert forbidden.status == 403 and forbidden.attempts == 1 and connections == 1


@pytest.mark.parametrize("length", ["ten", "1e6", "\u0661\u0662", "-5"])
def test_a_head_with_a_length_that_is_no_number_reports_no_size(length: str) -> None:
    """A HEAD's answer has no body to frame, so its Content-Length is never checked on the way
    in; read as a size it must say "no size" (one line), not raise ValueError. ("١٢", two
    Arabic-Indic digits, is 12 to int() and str.isdigit, and no number to HTTP.)"""

    async def handler(head: bytes, writer: asyncio.StreamWriter, number: int) -> bool:
        writer.write(answer("200 OK", {"Content-Length": length}))
        return True

    async def use(fetcher: Fetcher, fs: Any, url: str) -> list[Any]:
        return [await fetcher.info(fs, url), await fetcher.size(fs, url)]

    error, _ = run(handler, use)
    assert isinstance(error, FetchError) and "reports no size" in str(error)
