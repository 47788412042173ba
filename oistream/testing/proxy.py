"""A loopback HTTP/1.1 proxy that adds latency, injects faults, and counts what goes through.

Tests and benchmarks put it in front of an S3-compatible server (moto, nginx) to see what a
client does when the network misbehaves, and to count, at the server side rather than in our
own code, the requests and bytes a run really made. One class, :class:`Proxy`, one stats type,
:class:`ProxyStats`.

The engine is a byte relay, not an HTTP server: each client connection gets its own upstream
connection, and the bytes go through unchanged (``Host``, ``Expect: 100-continue`` and
signatures included). The proxy only *frames* the messages, reading each request's and each
response's head and following ``Content-Length`` or chunked bodies, to know where one ends and
the next begins. That keeps its CPU cost per request several times below an aiohttp
server-plus-client proxy's (``benchmarks/README.md`` has the figures), so a benchmark that
puts it in front of nginx measures the client, not the proxy. Clients are assumed not to
pipeline (none of ours do): a response belongs to the oldest request still waiting for one.

Latency: every chunk a client sends is held for ``latency`` seconds, in order, before it goes
upstream (a stand-in for the network distance to S3); responses flow back at once.

Faults, each drawn per request with the given rates:

* ``fail``: answer ``503 SlowDown`` with S3's XML error body, without asking upstream (and close
  the connection when the request had a body, since its unsent rest cannot be told apart from
  the next request);
* ``reset``: forward, send half the body, then reset the connection (TCP RST);
* ``truncate``: forward, send half the body, then close the connection cleanly, so the client
  gets fewer bytes than ``Content-Length`` announced.

``reset`` and ``truncate`` need a body of known, non-zero length: a HEAD, an empty answer or a
chunked one drawn for them goes through unharmed (and is not counted as a fault).

A request's fate depends only on the seed, the request (method, path and query, ``Range``) and
how many times that same request was seen before, never on the interleaving of concurrent
requests, so a run with a given seed meets the same faults every time. ``max_faults_per_request``
caps the faults one request can meet, guaranteeing that a patient client gets through.

An upstream that refuses the connection gets each request answered ``502`` (after the latency);
one that hangs up in the middle of a response gets the client's connection reset.

The proxy runs in a background thread (``process=False``, handy in tests) or in a child process
(``process=True``: its own interpreter and GIL, so it does not steal CPU from the client being
measured; it dies with its parent). It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import hashlib
import multiprocessing
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

FAULTS = ("fail", "reset", "truncate")

_SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>faultproxy</RequestId><HostId>faultproxy</HostId></Error>"
)

# A message head longer than this is not HTTP we understand: the connection is relayed blindly.
_MAX_HEAD = 65536

# Body framing states of a message being relayed.
_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _BLIND = range(5)


@dataclass
class ProxyStats:
    """What went through the proxy since it started or since ``reset_stats``.

    Requests: ``requests`` received from clients, split by ``methods``; GETs split into
    ``ranged_gets`` and ``unranged_gets`` by whether they carried a ``Range`` header;
    ``statuses`` maps each final status a client got (injected 503s and 502s included; 0: it got
    none, e.g. it hung up first) to a count; ``faults`` maps ``fail``/``reset``/``truncate`` to
    how many were injected. ``connections`` counts client connections;
    ``unframed_connections`` those whose messages could not be framed (their bytes are still
    counted, their requests end when the connection does).

    Bytes: ``bytes_down`` is every byte the server sent (status lines, headers, bodies),
    ``body_bytes`` its bodies alone, ``responses`` the responses it completed; ``bytes_up`` every
    byte clients sent; ``bytes_sent`` the response body bytes written to clients (after the
    cuts of ``reset``/``truncate``, with the injected error bodies).

    In flight: a request is in flight from its arrival to its response's last byte (latency
    included). ``max_in_flight`` is the most at once (also readable as ``max_concurrent``);
    ``mean_in_flight`` the time-weighted mean over the active span (first request to last
    response, ``active_seconds``); ``watched_mean_in_flight`` the same from the first request
    matching the ``watch`` prefix given to ``reset_stats`` (None when none came) over
    ``watched_seconds``.

    By kind: ``reset_stats(kinds=...)`` names kinds of request by request-line prefix;
    ``requests_by_kind``, ``bytes_by_kind`` (of ``bytes_down``), ``body_bytes_by_kind`` and the
    ``time.monotonic()`` of each kind's first arrival and last response end
    (``first_start_by_kind``, ``last_end_by_kind``: a timeline of a run as the server saw it)
    are kept per kind, the rest under ``"other"``.

    ``cpu_seconds`` is the CPU time the proxy's own thread used. ``log`` (only with
    ``keep_log=True``) holds ``(method, path, range, status, body bytes sent)`` per request, in
    the order they ended.
    """

    requests: int = 0
    methods: dict[str, int] = field(default_factory=dict)
    ranged_gets: int = 0
    unranged_gets: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    unframed_connections: int = 0
    responses: int = 0
    bytes_down: int = 0
    body_bytes: int = 0
    bytes_up: int = 0
    bytes_sent: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    mean_in_flight: float = 0.0
    active_seconds: float = 0.0
    watched_requests: int = 0
    watched_mean_in_flight: float | None = None
    watched_seconds: float = 0.0
    requests_by_kind: dict[str, int] = field(default_factory=dict)
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    body_bytes_by_kind: dict[str, int] = field(default_factory=dict)
    first_start_by_kind: dict[str, float] = field(default_factory=dict)
    last_end_by_kind: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    log: list[tuple[str, str, str | None, int, int]] | None = None

    @property
    def max_concurrent(self) -> int:
        """``max_in_flight`` under the name the fault proxy's tests know it by."""
        return self.max_in_flight


@dataclass(frozen=True)
class _Config:
    host: str
    upstream_port: int
    latency: float
    fail_rate: float
    reset_rate: float
    truncate_rate: float
    seed: int
    port: int
    max_faults_per_request: int | None
    keep_log: bool


class _Request:
    """One request on its way through; ``counters`` is the set it started in."""

    __slots__ = (
        *("method", "path", "range", "kind", "fault", "has_body"),
        *("status", "sent", "cut", "counters", "dropped", "ended"),
    )

    def __init__(self, method: str, path: str, byte_range: str | None, kind: str) -> None:
        self.method = method
        self.path = path
        self.range = byte_range
        self.kind = kind
        self.fault: str | None = None
        self.has_body = False
        self.status = 0
        self.sent = 0  # response body bytes written to the client
        self.cut: int | None = None  # body bytes after which the connection dies
        self.counters: _Counters | None = None
        self.dropped = False  # answered here: its bytes never go upstream
        self.ended = False


class _Counters:
    """One set of counters; lives in the proxy's event loop and is touched from it only."""

    def __init__(
        self,
        keep_log: bool,
        watch: bytes | None = None,
        kinds: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        self.stats = ProxyStats(log=[] if keep_log else None)
        self.watch = watch
        self.kinds = list(kinds)
        self.integral = 0.0  # requests in flight integrated over time
        self.last_change = 0.0
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.watch_start: float | None = None
        self.watch_integral_at_start = 0.0
        self.cpu_at_start = time.thread_time()

    def kind_of(self, head: bytes) -> str:
        return next((name for name, prefix in self.kinds if head.startswith(prefix)), "other")

    def _advance(self, now: float) -> None:
        self.integral += self.stats.in_flight * (now - self.last_change)
        self.last_change = now

    def request_started(self, now: float, head: bytes, request: _Request) -> None:
        stats = self.stats
        request.counters = self
        if self.first_start is None:
            self.first_start = self.last_change = now
        self._advance(now)
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        stats.requests += 1
        stats.methods[request.method] = stats.methods.get(request.method, 0) + 1
        if request.method == "GET":
            if request.range is None:
                stats.unranged_gets += 1
            else:
                stats.ranged_gets += 1
        kind = request.kind
        stats.requests_by_kind[kind] = stats.requests_by_kind.get(kind, 0) + 1
        stats.first_start_by_kind.setdefault(kind, now)
        if self.watch is not None and head.startswith(self.watch):
            stats.watched_requests += 1
            if self.watch_start is None:
                self.watch_start = now
                self.watch_integral_at_start = self.integral

    def request_ended(self, now: float, request: _Request) -> None:
        """Count ``request`` here (the current set), and let the set it started in see it go."""
        stats = self.stats
        started_in = request.counters
        if started_in is self:
            self._advance(now)
            stats.in_flight -= 1
            self.last_end = now
            stats.last_end_by_kind[request.kind] = now
        elif started_in is not None:
            started_in.stats.in_flight -= 1
        stats.statuses[request.status] = stats.statuses.get(request.status, 0) + 1
        stats.bytes_sent += request.sent
        if stats.log is not None:
            stats.log.append(
                (request.method, request.path, request.range, request.status, request.sent)
            )

    def snapshot(self) -> ProxyStats:
        # A deep copy by hand: the dicts and the log are the only mutable parts.
        stats = ProxyStats(**vars(self.stats))
        for name in ("methods", "statuses", "faults", "requests_by_kind", "bytes_by_kind"):
            setattr(stats, name, dict(getattr(stats, name)))
        for name in ("body_bytes_by_kind", "first_start_by_kind", "last_end_by_kind"):
            setattr(stats, name, dict(getattr(stats, name)))
        if stats.log is not None:
            stats.log = list(stats.log)
        stats.cpu_seconds = time.thread_time() - self.cpu_at_start
        if self.first_start is not None and self.last_end is not None:
            end = max(self.last_end, self.last_change)
            stats.active_seconds = end - self.first_start
            if stats.active_seconds > 0:
                stats.mean_in_flight = self.integral / stats.active_seconds
            if self.watch_start is not None and end > self.watch_start:
                stats.watched_seconds = end - self.watch_start
                stats.watched_mean_in_flight = (
                    self.integral - self.watch_integral_at_start
                ) / stats.watched_seconds
        return stats


class _Head:
    """A message head (``head`` ends with the blank line): its first line's first two words,
    and its headers looked up by name. Only the few headers framing needs are ever asked
    for, so they are found by searching, not parsed all (the per-request cost matters)."""

    __slots__ = ("first", "head", "lower", "second")

    def __init__(self, head: bytes) -> None:
        line_end = head.find(b"\r\n")
        words = head[:line_end].split(b" ", 2)
        if len(words) < 2:
            raise ValueError("not an HTTP message head")
        self.first, self.second = words[0], words[1]
        self.head = head
        self.lower = head.lower()

    def get(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or None."""
        start = self.lower.find(b"\r\n" + name + b":")
        if start < 0:
            return None
        start += len(name) + 3
        return self.head[start : self.head.find(b"\r\n", start)].strip()


def _body_framing(headers: _Head) -> tuple[int, int] | None:
    """``(state, length)`` of a body by its headers (RFC 9112 6.3); None: unframeable."""
    if b"chunked" in (headers.get(b"transfer-encoding") or b"").lower():
        return _CHUNKED, 0
    length = headers.get(b"content-length")
    if length is None:
        return None
    try:
        count = int(length)
    except ValueError:
        return None
    return (_LENGTH, count) if count >= 0 else None


class _ChunkedBody:
    """Follows a chunked body through a byte stream, counting its payload."""

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self.state = self._SIZE
        self.left = 0
        self.line = bytearray()

    def feed(self, data: bytes, position: int) -> tuple[int, int, bool]:
        """Consume from ``data[position:]``: ``(new position, payload bytes, body ended)``.

        Raises ValueError on a malformed chunk size or an over-long line."""
        payload = 0
        size = len(data)
        while position < size:
            if self.state == self._DATA:
                taken = min(self.left, size - position)
                self.left -= taken
                position += taken
                payload += taken
                if not self.left:
                    self.state = self._DATA_END
                continue
            end = data.find(b"\n", position)
            if end < 0:
                self.line += data[position:]
                if len(self.line) > _MAX_HEAD:
                    raise ValueError("chunk line too long")
                return size, payload, False
            line = (bytes(self.line) + data[position:end]).rstrip(b"\r")
            self.line.clear()
            position = end + 1
            if self.state == self._SIZE:
                chunk = int(line.split(b";", 1)[0], 16)
                if chunk < 0:
                    raise ValueError("negative chunk size")
                self.state, self.left = (self._TRAILER, 0) if chunk == 0 else (self._DATA, chunk)
            elif self.state == self._DATA_END:
                self.state = self._SIZE
            elif not line:  # the empty line that ends the trailer
                return position, payload, True
        return position, payload, False


class _ClientSide(asyncio.Protocol):
    """A client connection: its requests are framed, held for the latency, then go upstream
    (or are answered here); responses come back through ``_ServerSide``."""

    def __init__(self, proxy: _ProxyServer) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.transport: asyncio.Transport | None = None
        self.upstream: _ServerSide | None = None
        self.upstream_error: str | None = None
        self.delayed: collections.deque[tuple[float, _Request | None, bool, bytes]]
        self.delayed = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.pending: dict[_Request, None] = {}  # arrived, not ended, in arrival order
        self.forwarded: collections.deque[_Request] = collections.deque()  # awaiting upstream
        self.state = _HEAD
        self.body_left = 0
        self.chunked: _ChunkedBody | None = None
        self.head = bytearray()
        self.current: _Request | None = None  # the request whose body is arriving
        self.closed = False

    # -- connection life

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proxy.clients.add(self)
        self.proxy.counters.stats.connections += 1
        self.transport.pause_reading()  # until the upstream connection is up
        self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        config = self.proxy.config
        try:
            _, upstream = await self.loop.create_connection(
                lambda: _ServerSide(self), config.host, config.upstream_port
            )
        except OSError as error:
            self.upstream_error = str(error) or type(error).__name__
        else:
            self.upstream = upstream
            if self.closed:  # the client left while we connected
                upstream.transport.close()
                return
        if not self.closed:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.clients.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        self.end_all()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def end(self, request: _Request) -> None:
        if not request.ended:
            request.ended = True
            self.pending.pop(request, None)
            self.proxy.counters.request_ended(self.loop.time(), request)

    def end_all(self) -> None:
        for request in list(self.pending):
            self.end(request)
        self.forwarded.clear()

    def hang_up(self, *, reset: bool) -> None:
        """End this connection: with a TCP RST (like a crashed peer) or a clean close."""
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True  # nothing more goes either way
            if reset:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    # Linger 0: close() sends RST instead of FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            else:
                transport.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.abort()  # its unread rest must not reach anyone

    # -- client to server

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        proxy = self.proxy
        proxy.counters.stats.bytes_up += len(data)
        due = now + proxy.config.latency
        delayed = self.delayed
        if self.state == _BLIND:
            delayed.append((due, None, False, data))
        else:
            self._frame_requests(now, due, data)
        if self.timer is None:
            self._release()

    def _frame_requests(self, now: float, due: float, data: bytes) -> None:
        position, size = 0, len(data)
        delayed = self.delayed
        while position < size:
            if self.state == _LENGTH:
                taken = min(self.body_left, size - position)
                delayed.append((due, self.current, False, data[position : position + taken]))
                position += taken
                self.body_left -= taken
                if not self.body_left:
                    self.state = _HEAD
                continue
            if self.state == _CHUNKED:
                assert self.chunked is not None
                try:
                    end, _, done = self.chunked.feed(data, position)
                except ValueError:
                    self._go_blind(due, data[position:])
                    return
                delayed.append((due, self.current, False, data[position:end]))
                position = end
                if done:
                    self.state = _HEAD
                continue
            if self.state == _BLIND:
                delayed.append((due, None, False, data[position:]))
                return
            # A head: whole in this chunk (the usual case), or gathered over several.
            if self.head:
                self.head += data[position:]
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.head) > _MAX_HEAD:
                        self._go_blind(due, bytes(self.head))
                    return
                head = bytes(self.head[: end + 4])
                data, position, size = bytes(self.head[end + 4 :]), 0, len(self.head) - end - 4
                self.head.clear()
            else:
                end = data.find(b"\r\n\r\n", position)
                if end < 0:
                    self.head += data[position:]
                    if len(self.head) > _MAX_HEAD:
                        self._go_blind(due, bytes(self.head))
                    return
                head = data[position : end + 4] if position or end + 4 < size else data
                position = end + 4
            self._request_head(now, due, head)

    def _request_head(self, now: float, due: float, head: bytes) -> None:
        try:
            headers = _Head(head)
        except ValueError:
            self._go_blind(due, head)
            return
        method_bytes, target = headers.first, headers.second
        byte_range = headers.get(b"range")
        counters = self.proxy.counters
        request = _Request(
            method_bytes.decode("latin-1"),
            target.decode("latin-1"),
            None if byte_range is None else byte_range.decode("latin-1"),
            counters.kind_of(head),
        )
        framing = _body_framing(headers)
        if framing is None or framing == (_LENGTH, 0):
            self.state = _HEAD  # no body (RFC 9112 6.3: a request without framing has none)
        else:
            request.has_body = True
            self.state, self.body_left = framing
            self.chunked = _ChunkedBody() if self.state == _CHUNKED else None
        self.current = request
        if self.proxy.faulty:
            request.fault = self.proxy.draw_fault(request)
        counters.request_started(now, head, request)
        self.pending[request] = None
        self.delayed.append((due, request, True, head))

    def _go_blind(self, due: float, data: bytes) -> None:
        """Not HTTP we can frame: relay this connection's bytes as they come, counting them."""
        self.state = _BLIND
        self.proxy.counters.stats.unframed_connections += 1
        self.delayed.append((due, None, False, data))
        if self.upstream is not None:
            self.upstream.state = _BLIND

    def _release(self) -> None:
        """Send on, in order, every held chunk whose time has come; re-arm for the next."""
        self.timer = None
        now = self.loop.time()
        delayed = self.delayed
        while delayed and delayed[0][0] <= now and not self.closed:
            _, request, starts, data = delayed.popleft()
            if request is not None:
                if starts:
                    self._request_due(request)
                if request.dropped:
                    continue
            upstream = self.upstream
            if upstream is not None and upstream.transport is not None:
                upstream.transport.write(data)
        if delayed and not self.closed:
            self.timer = self.loop.call_at(delayed[0][0], self._release)

    def _request_due(self, request: _Request) -> None:
        """A request's latency is over: forward it, or answer it here."""
        if request.fault == "fail":
            self.proxy.injected(request, "fail")
            self.answer(request, 503, "Slow Down", _SLOW_DOWN_BODY, close=request.has_body)
        elif self.upstream is None:
            error = self.upstream_error or "not connected"
            body = f"proxy: upstream failed: {error}".encode()
            self.answer(request, 502, "Bad Gateway", body, close=True)
        else:
            if request.method == "HEAD":
                request.fault = None  # body faults need a body
            self.forwarded.append(request)

    def answer(self, request: _Request, status: int, reason: str, body: bytes, *, close: bool):
        """Answer ``request`` from here, without upstream."""
        request.dropped = True
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Retry-After: 1\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        ).encode()
        request.status = status
        if request.method != "HEAD":
            request.sent = len(body)
        else:
            body = b""
        if self.transport is not None and not self.closed:
            self.transport.write(head + body)
        self.end(request)
        if close:
            self.hang_up(reset=False)

    # -- flow control: a side that cannot keep up pauses the other

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()


class _ServerSide(asyncio.Protocol):
    """The upstream half: relays the server's bytes to the client and frames its responses."""

    def __init__(self, client: _ClientSide) -> None:
        self.client = client
        self.proxy = client.proxy
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.state = _HEAD
        self.body_left = 0
        self.chunked: _ChunkedBody | None = None
        self.request: _Request | None = None  # the one whose response body is coming
        self.cut: _Request | None = None  # the one whose fault ended the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        stats = self.proxy.counters.stats
        stats.bytes_down += len(data)
        request = self.request or (client.forwarded[0] if client.forwarded else None)
        kind = request.kind if request is not None else "other"
        stats.bytes_by_kind[kind] = stats.bytes_by_kind.get(kind, 0) + len(data)
        if self.state != _BLIND:
            cut_at = self._frame(data)
            if cut_at is not None:  # a fault ends the connection here
                if client.transport is not None and cut_at:
                    client.transport.write(data[:cut_at])
                assert self.cut is not None
                client.hang_up(reset=self.cut.fault == "reset")
                return
        if client.transport is not None and not client.closed:
            client.transport.write(data)

    def _body(self, taken: int) -> None:
        stats = self.proxy.counters.stats
        stats.body_bytes += taken
        request = self.request
        kind = request.kind if request is not None else "other"
        stats.body_bytes_by_kind[kind] = stats.body_bytes_by_kind.get(kind, 0) + taken
        if request is not None:
            request.sent += taken

    def _frame(self, data: bytes) -> int | None:
        """Follow the responses in ``data``; the position to cut at if a fault strikes."""
        position, size = 0, len(data)
        while position < size:
            if self.state == _LENGTH:
                taken = min(self.body_left, size - position)
                request = self.request
                cut = None if request is None else request.cut
                if cut is not None and request.sent + taken >= cut:
                    taken = cut - request.sent
                    self._body(taken)
                    self._cut(request)
                    return position + taken
                self._body(taken)
                position += taken
                self.body_left -= taken
                if not self.body_left:
                    self._response_done()
                continue
            if self.state == _CHUNKED:
                assert self.chunked is not None
                try:
                    position, payload, done = self.chunked.feed(data, position)
                except ValueError:
                    self._go_blind()
                    return None
                self._body(payload)
                if done:
                    self._response_done()
                continue
            if self.state == _UNTIL_CLOSE:
                self._body(size - position)
                return None
            if self.state == _BLIND:
                return None
            self.head += data[position:]
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > _MAX_HEAD:
                    self._go_blind()
                return None
            head, rest = bytes(self.head[: end + 4]), bytes(self.head[end + 4 :])
            self.head.clear()
            position = size - len(rest)
            if not self._response_head(head):
                return None
            if self.state == _LENGTH and self.request is not None and self.request.cut == 0:
                self._cut(self.request)
                return position
        return None

    def _response_head(self, head: bytes) -> bool:
        """Start following a response; False when it cannot be framed."""
        client = self.client
        try:
            headers = _Head(head)
            status = int(headers.second)
        except ValueError:
            self._go_blind()
            return False
        if not client.forwarded:
            self._go_blind()
            return False
        request = client.forwarded[0]
        if 100 <= status < 200:
            if status == 101:  # switched protocols: no longer HTTP
                self._go_blind()
                return False
            return True  # an interim answer (100 Continue): the final one follows
        request.status = status
        self.request = request
        if request.method == "HEAD" or status in (204, 304):
            self.state, self.body_left = _LENGTH, 0
        else:
            self.state, self.body_left = _body_framing(headers) or (_UNTIL_CLOSE, 0)
        if self.state == _CHUNKED:
            self.chunked = _ChunkedBody()
        if self.state == _LENGTH and not self.body_left:
            self._response_done()
        elif request.fault in ("reset", "truncate") and self.state == _LENGTH:
            self.proxy.injected(request, request.fault)
            request.cut = self.body_left // 2
        return True

    def _response_done(self) -> None:
        self.proxy.counters.stats.responses += 1
        self.state = _HEAD
        client = self.client
        request, self.request = self.request, None
        if client.forwarded and client.forwarded[0] is request:
            client.forwarded.popleft()
        if request is not None:
            client.end(request)
            if client.current is request and client.state in (_LENGTH, _CHUNKED):
                # Answered before its body was all sent (a refused Expect: 100-continue):
                # where that body ends and the next request begins is now anyone's guess.
                client.hang_up(reset=False)

    def _cut(self, request: _Request) -> None:
        """``request``'s fault strikes: it ends here, and ``data_received`` hangs up."""
        self.cut = request
        self.client.end(request)
        self.state = _BLIND  # whatever else arrives goes nowhere

    def _go_blind(self) -> None:
        # Bytes are still counted; this connection's requests end when it closes.
        if self.state != _BLIND and self.client.state != _BLIND:
            self.proxy.counters.stats.unframed_connections += 1
        self.state = self.client.state = _BLIND

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        client = self.client
        if self.state == _UNTIL_CLOSE:
            self._response_done()
            client.hang_up(reset=False)
        elif self.state in (_LENGTH, _CHUNKED) or self.head:
            client.hang_up(reset=True)  # mid-response: all we can do is hang up
        elif client.forwarded and self.state == _HEAD:
            client.answer(client.forwarded[0], 502, "Bad Gateway", b"upstream closed", close=True)
        else:
            client.hang_up(reset=False)
        client.end_all()


class _ProxyServer:
    """The proxy in its event loop: configuration, counters, fault draws, open connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: _Config) -> None:
        self.loop = loop
        self.config = config
        self.counters = _Counters(config.keep_log)
        self.clients: set[_ClientSide] = set()
        # Without faults nothing is drawn, so nothing is remembered per request.
        self.faulty = config.fail_rate + config.reset_rate + config.truncate_rate > 0
        self._seen: collections.Counter[tuple[str, str, str | None]] = collections.Counter()
        self._faulted: collections.Counter[tuple[str, str, str | None]] = collections.Counter()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await self.loop.create_server(
            lambda: _ClientSide(self), "127.0.0.1", self.config.port, backlog=4096
        )
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in list(self.clients):
            client.hang_up(reset=False)

    def reset_stats(self, watch: bytes | None, kinds: Sequence[tuple[str, bytes]]) -> None:
        self.counters = _Counters(self.config.keep_log, watch=watch, kinds=kinds)

    def draw_fault(self, request: _Request) -> str | None:
        """The fault this request meets (None for none); ``injected`` records it once it
        really happened (a body fault needs a body to cut)."""
        config = self.config
        key = (request.method, request.path, request.range)
        seen = self._seen[key]
        self._seen[key] = seen + 1
        limit = config.max_faults_per_request
        if limit is not None and self._faulted[key] >= limit:
            return None
        digest = hashlib.blake2b(
            f"{config.seed}\0{key[0]}\0{key[1]}\0{key[2]}\0{seen}".encode(), digest_size=8
        ).digest()
        draw = int.from_bytes(digest, "big") / 2**64
        for name, rate in zip(
            FAULTS, (config.fail_rate, config.reset_rate, config.truncate_rate), strict=True
        ):
            if draw < rate:
                return name
            draw -= rate
        return None

    def injected(self, request: _Request, fault: str) -> None:
        self._faulted[(request.method, request.path, request.range)] += 1
        faults = self.counters.stats.faults
        faults[fault] = faults.get(fault, 0) + 1


def _die_with_parent() -> None:
    """Get SIGTERM when the parent dies, even by SIGKILL (Linux; elsewhere a no-op)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _serve_in_child(config: _Config, control: Any, parent_pid: int) -> None:
    """Entry point of the child process: serve, and answer the parent over ``control``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()
    loop = asyncio.new_event_loop()
    server = _ProxyServer(loop, config)
    control.send(loop.run_until_complete(server.start()))
    stopped = loop.create_future()

    def on_command() -> None:
        try:
            command, argument = control.recv()
        except (EOFError, OSError):  # the parent went away: stop serving
            command, argument = "stop", None
        if command == "stats":
            control.send(server.counters.snapshot())
        elif command == "reset":
            server.reset_stats(*argument)
            control.send(None)
        elif not stopped.done():
            stopped.set_result(None)

    def check_parent() -> None:
        if os.getppid() != parent_pid and not stopped.done():
            stopped.set_result(None)
        else:
            loop.call_later(1.0, check_parent)

    loop.add_reader(control.fileno(), on_command)
    loop.call_later(1.0, check_parent)
    loop.run_until_complete(stopped)
    loop.remove_reader(control.fileno())
    server.close()
    loop.run_until_complete(asyncio.sleep(0))  # let the closing transports finish
    loop.close()
    with contextlib.suppress(OSError):
        control.send("stopped")


class Proxy:
    """A loopback proxy in front of ``upstream`` (``http://host:port``); see the module docstring.

    Use as a context manager, or ``start()``/``stop()``; ``endpoint_url`` (or ``url``) is where
    clients connect. ``stats`` returns a consistent snapshot of the counters (:class:`ProxyStats`);
    ``reset_stats`` zeroes them.
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
    ) -> None:
        rates = (fail_rate, reset_rate, truncate_rate)
        if any(rate < 0 for rate in rates) or sum(rates) > 1:
            raise ValueError("fault rates must be >= 0 and add up to at most 1")
        if latency < 0:
            raise ValueError("latency must be >= 0")
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or parts.path.strip("/") or parts.query:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self._config = _Config(
            host=parts.hostname,
            upstream_port=parts.port or 80,
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
        """Where clients connect: ``http://127.0.0.1:{port}``."""
        if self.port is None:
            raise RuntimeError("the proxy is not running: call start() first")
        return f"http://127.0.0.1:{self.port}"

    url = endpoint_url

    def start(self) -> Proxy:
        """Start serving (once; a running proxy is left as it is)."""
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
            self._loop = loop
            try:
                server = _ProxyServer(loop, self._config)
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
                server.close()
                loop.run_until_complete(asyncio.sleep(0))  # let the closing transports finish
                loop.close()

        self._thread = threading.Thread(target=run, name="oistream-proxy", daemon=True)
        self._thread.start()
        started.wait()
        if "error" in ready:
            raise ready["error"]
        self.port = ready["port"]

    def _start_process(self) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: the parent may hold loops
        parent_end, child_end = context.Pipe()
        self._child = context.Process(
            target=_serve_in_child,
            args=(self._config, child_end, os.getpid()),
            name="oistream-proxy",
            daemon=True,
        )
        self._child.start()
        child_end.close()
        self._control = parent_end
        if not parent_end.poll(60):
            self._child.kill()
            raise RuntimeError("the proxy process did not start within 60 s")
        self.port = parent_end.recv()

    def _in_loop(self, function: Any, *args: Any) -> Any:
        assert self._loop is not None

        async def call() -> Any:
            return function(*args)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=30)

    def _ask(self, command: str, argument: Any = None) -> Any:
        with self._control_lock:
            self._control.send((command, argument))
            return self._control.recv()

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        if self.port is None:
            raise RuntimeError("the proxy is not running")
        if self.process:
            return self._ask("stats")
        assert self._server is not None
        return self._in_loop(lambda: self._server.counters.snapshot())

    def reset_stats(
        self, watch: bytes | None = None, kinds: Sequence[tuple[str, bytes]] = ()
    ) -> None:
        """Zero the counters (the fault draws keep their history, so runs stay reproducible).

        ``watch``: the request-line prefix whose first arrival starts the watched span;
        ``kinds``: ``(name, request-line prefix)`` pairs that the per-kind counts split by.
        """
        argument = (watch, list(kinds))
        if self.port is None:  # not running: nothing counted to zero
            return
        if self.process:
            self._ask("reset", argument)
        else:
            assert self._server is not None
            self._in_loop(self._server.reset_stats, *argument)

    def stop(self) -> None:
        """Stop serving; open connections are closed."""
        if self.port is None:
            return
        if self.process:
            with self._control_lock:
                try:
                    self._control.send(("stop", None))
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

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
