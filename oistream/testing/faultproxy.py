"""A loopback HTTP reverse proxy that adds latency and injects faults, and counts bytes.

Tests and benchmarks put it in front of an S3-compatible server (moto, nginx) to see what the
fetcher does when the network misbehaves, and to count the bytes a run really requested — at
the server side, not in our own code. It forwards method, path, query and headers unchanged
(``Host`` included, so signed requests stay valid) and streams bodies both ways.

Faults, each drawn per request with the given rates:

* ``fail``: answer ``503 SlowDown`` with S3's XML error body, without asking upstream;
* ``reset``: forward, send half the body, then reset the connection (TCP RST);
* ``truncate``: forward, send half the body, then close the connection cleanly, so the client
  gets fewer bytes than ``Content-Length`` announced.

``reset`` and ``truncate`` need a body of known, non-zero length: a HEAD or an empty answer drawn
for one of them goes through unharmed (and is not counted as a fault).

A request's fate depends only on the seed, the request (method, path and query, ``Range``) and
how many times that same request was seen before, never on the interleaving of concurrent
requests, so a run with a given seed meets the same faults every time. ``max_faults_per_request``
caps the faults one request can meet, guaranteeing that a patient client gets through.

The proxy runs in a background thread (``process=False``, handy in tests) or in a child process
(``process=True``: its own interpreter and GIL, so it does not steal CPU from the client being
measured). It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import multiprocessing
import socket
import struct
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

# Headers that describe one connection, not the message: never forwarded (RFC 9110 7.6.1).
# ``Expect`` is answered by our own server already; forwarding it would make aiohttp's client
# wait for a second ``100 Continue``.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)

_SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>faultproxy</RequestId><HostId>faultproxy</HostId></Error>"
)

_CHUNK = 256 * 1024

FAULTS = ("fail", "reset", "truncate")


@dataclass
class ProxyStats:
    """What the proxy saw. ``bytes_sent`` counts response body bytes written to clients.

    ``statuses`` maps each status sent (injected 503s included) to a count; ``faults`` maps
    ``fail``/``reset``/``truncate`` to how many were injected; ``ranged_gets`` and
    ``unranged_gets`` split GETs by whether they carried a ``Range`` header.
    """

    requests: int = 0
    bytes_sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    methods: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    ranged_gets: int = 0
    unranged_gets: int = 0
    max_concurrent: int = 0
    concurrent: int = 0
    log: list[tuple[str, str, str | None, int, int]] | None = None  # method, path, range,
    # status, body bytes sent; kept only with keep_log=True


@dataclass
class _Outcome:
    """What one request got: the status sent (0: none) and the body bytes written."""

    status: int = 0
    sent: int = 0


@dataclass(frozen=True)
class _Config:
    upstream: str
    latency: float
    fail_rate: float
    reset_rate: float
    truncate_rate: float
    seed: int
    port: int
    max_faults_per_request: int | None
    keep_log: bool


class _ProxyServer:
    """The proxy itself, living in one event loop (the background thread's or process's)."""

    def __init__(self, config: _Config):
        self.config = config
        self.stats = ProxyStats(log=[] if config.keep_log else None)
        self._seen: dict[tuple[str, str, str | None], int] = defaultdict(int)
        self._faulted: dict[tuple[str, str, str | None], int] = defaultdict(int)
        self._upstream = config.upstream.rstrip("/")
        # Without faults nothing is drawn, so nothing is remembered per request.
        self._faulty = config.fail_rate + config.reset_rate + config.truncate_rate > 0
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.ServerRunner | None = None

    async def start(self) -> int:
        connector = aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # pass bodies through byte for byte
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        # handler_cancellation: a client that hangs up stops its request here too.
        server = web.Server(self.handle, access_log=None, handler_cancellation=True)
        # A test proxy need not wait for slow requests to finish when it stops.
        self._runner = web.ServerRunner(
            server, handle_signals=False, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.config.port, backlog=1024)
        await site.start()
        sockets = self._runner.addresses
        return int(sockets[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def snapshot(self) -> ProxyStats:
        return copy.deepcopy(self.stats)

    def reset_stats(self) -> None:
        concurrent = self.stats.concurrent
        self.stats = ProxyStats(log=[] if self.config.keep_log else None, concurrent=concurrent)

    def _draw_fault(self, key: tuple[str, str, str | None]) -> str | None:
        """The fault this request meets (``None`` for none); ``_injected`` records it once
        it really happened (a body fault needs a body to cut)."""
        config = self.config
        method, path, byte_range = key
        seen = self._seen[key]
        self._seen[key] = seen + 1
        limit = config.max_faults_per_request
        if limit is not None and self._faulted[key] >= limit:
            return None
        digest = hashlib.blake2b(
            f"{config.seed}\0{method}\0{path}\0{byte_range}\0{seen}".encode(), digest_size=8
        ).digest()
        draw = int.from_bytes(digest, "big") / 2**64
        for name, rate in zip(
            FAULTS, (config.fail_rate, config.reset_rate, config.truncate_rate), strict=True
        ):
            if draw < rate:
                return name
            draw -= rate
        return None

    def _injected(self, key: tuple[str, str, str | None], fault: str) -> None:
        self._faulted[key] += 1
        self.stats.faults[fault] = self.stats.faults.get(fault, 0) + 1

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        stats.concurrent += 1
        stats.max_concurrent = max(stats.max_concurrent, stats.concurrent)
        stats.methods[request.method] = stats.methods.get(request.method, 0) + 1
        byte_range = request.headers.get("Range")
        if request.method == "GET":
            if byte_range is None:
                stats.unranged_gets += 1
            else:
                stats.ranged_gets += 1
        outcome = _Outcome()
        try:
            if self.config.latency > 0:
                await asyncio.sleep(self.config.latency)
            key = (request.method, request.raw_path, byte_range)
            fault = self._draw_fault(key) if self._faulty else None
            if fault == "fail":
                self._injected(key, fault)
                outcome.status = 503
                if request.method != "HEAD":
                    outcome.sent = len(_SLOW_DOWN_BODY)
                return web.Response(
                    status=503,
                    body=_SLOW_DOWN_BODY,
                    headers={"Content-Type": "application/xml", "Retry-After": "1"},
                )
            if request.method == "HEAD":
                # Body faults need a body. (Cutting the header block instead would not reach
                # the code under test either: aiohttp's client silently retries idempotent
                # requests whose connection dies before a complete response.)
                fault = None
            if request.headers.get("Expect", "").lower() == "100-continue":
                # botocore waits for this before sending a PUT body. The low-level server has
                # no router to answer it (web.Application would), and upstream never sees
                # the Expect header, so the proxy answers it itself.
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.writer.output_size = 0
            try:
                return await self._forward(request, key, fault, outcome)
            except ConnectionError:
                # The client went away (gave up, timed out): nobody is left to answer.
                return web.Response()
            except aiohttp.ClientError as error:
                if outcome.status:  # upstream failed mid-body: all we can do is hang up
                    self._kill(request, reset=True)
                    return web.Response()
                outcome.status = 502
                return web.Response(status=502, text=f"fault proxy: upstream failed: {error}")
        finally:
            # stats may have been replaced by reset_stats() meanwhile: count in the current one
            current = self.stats
            current.concurrent -= 1
            current.statuses[outcome.status] = current.statuses.get(outcome.status, 0) + 1
            current.bytes_sent += outcome.sent
            if current.log is not None:
                entry = (request.method, request.raw_path, byte_range, outcome.status, outcome.sent)
                current.log.append(entry)

    async def _forward(
        self,
        request: web.BaseRequest,
        key: tuple[str, str, str | None],
        fault: str | None,
        outcome: _Outcome,
    ) -> web.StreamResponse:
        assert self._session is not None
        headers = CIMultiDict(
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in _HOP_BY_HOP
        )
        body = request.content if request.body_exists else None
        url = URL(self._upstream + request.raw_path, encoded=True)
        async with self._session.request(
            request.method,
            url,
            headers=headers,
            data=body,
            allow_redirects=False,
            auto_decompress=False,
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    response.headers.add(name, value)
            length = upstream.content_length
            cut = None
            if fault is not None and length:  # no body, or one of unknown length: no fault
                self._injected(key, fault)
                cut = length // 2
            outcome.status = upstream.status
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(_CHUNK):
                if cut is not None and outcome.sent + len(chunk) >= cut:
                    part = chunk[: cut - outcome.sent]
                    if part:
                        await response.write(part)
                        outcome.sent += len(part)
                    upstream.close()  # its unread rest must not go back to the pool
                    self._kill(request, reset=fault == "reset")
                    return response
                await response.write(chunk)
                outcome.sent += len(chunk)
            await response.write_eof()
            return response

    @staticmethod
    def _kill(request: web.BaseRequest, *, reset: bool) -> None:
        transport = request.transport
        if transport is None:
            return
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # Linger 0: close() sends RST instead of FIN, like a crashed peer or middlebox.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()


def _serve_in_child(config: _Config, control: Any) -> None:
    """Entry point of the child process: serve, and answer the parent over ``control``."""

    async def main() -> None:
        server = _ProxyServer(config)
        port = await server.start()
        control.send(port)
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_command() -> None:
            try:
                command = control.recv()
            except EOFError:  # the parent went away: stop serving
                stopped.set()
                return
            if command == "stats":
                control.send(server.snapshot())
            elif command == "reset":
                server.reset_stats()
                control.send(None)
            elif command == "stop":
                stopped.set()

        loop.add_reader(control.fileno(), on_command)
        await stopped.wait()
        loop.remove_reader(control.fileno())
        await server.close()
        control.send("stopped")

    asyncio.run(main())


class FaultProxy:
    """A loopback reverse proxy in front of ``upstream``; see the module docstring.

    Use as a context manager, or ``start()``/``stop()``; ``endpoint_url`` is where clients
    connect. ``stats`` returns a consistent snapshot of the counters (``ProxyStats``).
    """

    def __init__(
        self,
        upstream: str,
        *,
        latency: float = 0.0,
        fail_rate: float = 0.0,
        reset_rate: float = 0.0,
        truncate_rate: float = 0.0,
        seed: int = 0,
        port: int = 0,
        max_faults_per_request: int | None = None,
        keep_log: bool = False,
        process: bool = False,
    ):
        rates = (fail_rate, reset_rate, truncate_rate)
        if any(rate < 0 for rate in rates) or sum(rates) > 1:
            raise ValueError("fault rates must be >= 0 and add up to at most 1")
        if latency < 0:
            raise ValueError("latency must be >= 0")
        self._config = _Config(
            upstream=upstream,
            latency=latency,
            fail_rate=fail_rate,
            reset_rate=reset_rate,
            truncate_rate=truncate_rate,
            seed=seed,
            port=port,
            max_faults_per_request=max_faults_per_request,
            keep_log=keep_log,
        )
        self.process = process
        self.port: int | None = None
        self._server: _ProxyServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._child: Any = None
        self._control: Any = None
        self._control_lock = threading.Lock()

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the proxy is not running: call start() first")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        if self.port is not None:
            return self
        if self.process:
            self._start_process()
        else:
            self._start_thread()
        return self

    def _start_thread(self) -> None:
        ready: dict[str, Any] = {}
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                server = _ProxyServer(self._config)
                ready["port"] = loop.run_until_complete(server.start())
                self._server = server
            except BaseException as exc:
                ready["error"] = exc
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(server.close())
                # Requests still waiting (a long latency) end here, as asyncio.run ends its own.
                leftovers = asyncio.all_tasks(loop)
                for task in leftovers:
                    task.cancel()
                if leftovers:
                    loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        started.wait()
        if "error" in ready:
            raise ready["error"]
        self.port = ready["port"]

    def _start_process(self) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: the parent may hold loops
        parent_end, child_end = context.Pipe()
        self._child = context.Process(
            target=_serve_in_child, args=(self._config, child_end), name="faultproxy", daemon=True
        )
        self._child.start()
        child_end.close()
        self._control = parent_end
        if not parent_end.poll(60):
            self._child.kill()
            raise RuntimeError("the fault proxy process did not start within 60 s")
        self.port = parent_end.recv()

    def _in_loop(self, function: Any) -> Any:
        assert self._loop is not None

        async def call() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=30)

    @property
    def stats(self) -> ProxyStats:
        if self.port is None:
            raise RuntimeError("the proxy is not running")
        if self.process:
            with self._control_lock:
                self._control.send("stats")
                return self._control.recv()
        assert self._server is not None
        return self._in_loop(self._server.snapshot)

    def reset_stats(self) -> None:
        """Zero the counters (the fault draws keep their history, so runs stay reproducible)."""
        if self.process:
            with self._control_lock:
                self._control.send("reset")
                self._control.recv()
        elif self._server is not None:
            self._in_loop(self._server.reset_stats)

    def stop(self) -> None:
        if self.port is None:
            return
        if self.process:
            with self._control_lock:
                try:
                    self._control.send("stop")
                    if self._control.poll(10):
                        self._control.recv()
                except (BrokenPipeError, EOFError, OSError):
                    pass
            self._child.join(10)
            if self._child.is_alive():
                self._child.kill()
                self._child.join()
            self._control.close()
        else:
            assert self._loop is not None and self._thread is not None
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self.port = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
