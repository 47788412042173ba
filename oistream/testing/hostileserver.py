"""A loopback HTTP file server that misbehaves on purpose, per path, and counts what it sends.

Where ``faultproxy`` injects the network's accidents (503s, resets, cut bodies) in front of a
real S3 server, this serves a folder itself, so that it can also tell lies no honest server
tells: ignore ``Range`` and send everything, answer another range than the one asked for,
refuse suffix ranges (an older server's 416), stall in the middle of a body or before a HEAD's
answer, redirect to another host, or replace an object between two reads. Honest by default:
``HEAD`` and ``GET`` with ``Content-Length``, a strong ``ETag`` (the MD5 of the bytes), single
ranges (suffix ranges, ``bytes=-N``, too) answered ``206`` with ``Content-Range``, ``If-Match``
answered ``412`` when it does not match, ``404`` for what is not there.

Behaviours are keyed by URL path (``fnmatch`` patterns): ``overrides`` replaces a file's bytes,
``misbehave`` names one of ``BEHAVIOURS``, ``replace_after`` swaps a file's bytes (and so its
ETag) after that many GETs of it. ``stats`` counts requests and body bytes written, per path
too, and logs each request (method, path, range, status, Host header). Body bytes go out in
64 kB writes, each awaited, so a client that hangs up stops the count close to where it left.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fnmatch
import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

BEHAVIOURS = (
    "ignore_range",
    "wrong_range",
    "no_suffix_range",
    "stall",
    "stall_head",
    "redirect_elsewhere",
    "fail",
)
_RANGE = re.compile(r"bytes=([0-9]+)-([0-9]*)")
_SUFFIX_RANGE = re.compile(r"bytes=-([0-9]+)")
_CHUNK = 64 * 1024


@dataclass
class ServerStats:
    """What the server did: requests, body bytes written (in all and per path), a request log."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_by_path: dict[str, int] = field(default_factory=dict)
    gets_by_path: dict[str, int] = field(default_factory=dict)
    log: list[tuple[str, str, str | None, int, str]] = field(default_factory=list)


class HostileServer:
    """Serve ``root`` on ``http://127.0.0.1:PORT`` from a background thread (a context manager).

    ``stall_seconds`` is how long a stalled body hangs before the server gives up on it; the
    client's inactivity time-out should end the wait long before.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        overrides: dict[str, bytes] | None = None,
        misbehave: dict[str, str] | None = None,
        replace_after: dict[str, tuple[int, bytes]] | None = None,
        stall_seconds: float = 600.0,
    ) -> None:
        self.root = Path(root)
        self.overrides = dict(overrides or {})
        self.misbehave = dict(misbehave or {})
        for behaviour in self.misbehave.values():
            if behaviour not in BEHAVIOURS:
                raise ValueError(f"unknown behaviour {behaviour!r}; one of {BEHAVIOURS}")
        self.replace_after = dict(replace_after or {})
        self.stall_seconds = stall_seconds
        self._stats = ServerStats()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stop: asyncio.Event | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats(self) -> ServerStats:
        with self._lock:
            return copy.deepcopy(self._stats)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = ServerStats()

    def _behaviour(self, path: str) -> str | None:
        for pattern, behaviour in self.misbehave.items():
            if fnmatch.fnmatchcase(path, pattern):
                return behaviour
        return None

    def _content(self, path: str, gets_before: int) -> bytes | None:
        swap = self.replace_after.get(path)
        if swap is not None and gets_before >= swap[0]:
            return swap[1]
        if path in self.overrides:
            return self.overrides[path]
        target = (self.root / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.root.resolve()) or not target.is_file():
            return None
        return target.read_bytes()

    def _record(self, request: web.Request, status: int) -> None:
        with self._lock:
            self._stats.requests += 1
            self._stats.log.append(
                (
                    request.method,
                    request.path,
                    request.headers.get("Range"),
                    status,
                    request.headers.get("Host", ""),
                )
            )

    def _count(self, path: str, sent: int) -> None:
        with self._lock:
            self._stats.bytes_sent += sent
            self._stats.bytes_by_path[path] = self._stats.bytes_by_path.get(path, 0) + sent

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        behaviour = self._behaviour(path)
        with self._lock:
            gets_before = self._stats.gets_by_path.get(path, 0)
            if request.method == "GET":
                self._stats.gets_by_path[path] = gets_before + 1
        if behaviour == "fail":
            self._record(request, 503)
            return web.Response(status=503, text="unavailable")
        if behaviour == "redirect_elsewhere":
            # Same port, another host name: a client that follows it is seen in the log.
            self._record(request, 302)
            raise web.HTTPFound(f"http://localhost:{self.port}{path}")
        data = self._content(path, gets_before)
        if data is None:
            self._record(request, 404)
            return web.Response(status=404, text="not found")
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        if_match = request.headers.get("If-Match")
        if if_match is not None and if_match not in ("*", etag):
            self._record(request, 412)
            return web.Response(status=412, text="precondition failed", headers=headers)
        if request.method == "HEAD":
            self._record(request, 200)
            if behaviour == "stall_head":  # the answer comes only after stall_seconds
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(self.stall_seconds)
            return web.Response(status=200, headers={**headers, "Content-Length": str(len(data))})
        start, stop, status = 0, len(data), 200
        asked = request.headers.get("Range")
        if asked is not None and behaviour != "ignore_range":
            match = _RANGE.fullmatch(asked.strip())
            suffix = _SUFFIX_RANGE.fullmatch(asked.strip())
            if suffix is not None and behaviour == "no_suffix_range":
                self._record(request, 416)
                return web.Response(status=416)
            if suffix is not None and int(suffix[1]) > 0 and data:  # the last N bytes
                start, stop = max(0, len(data) - int(suffix[1])), len(data)
            elif match is None or int(match[1]) >= len(data):
                self._record(request, 416)
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            else:
                start = int(match[1])
                stop = min(len(data), int(match[2]) + 1) if match[2] else len(data)
            status = 206
            shown = (start, stop)
            if behaviour == "wrong_range":  # the right length from one byte further on
                start, stop = min(start + 1, len(data) - 1), min(stop + 1, len(data))
                shown = (start, stop)
            headers["Content-Range"] = f"bytes {shown[0]}-{shown[1] - 1}/{len(data)}"
        body = data[start:stop]
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        self._record(request, status)
        await response.prepare(request)
        sent = 0
        # A stalling server sends the first half of the body, then nothing.
        end = max(1, len(body) // 2) if behaviour == "stall" else len(body)
        try:
            for offset in range(0, end, _CHUNK):
                chunk = body[offset : min(end, offset + _CHUNK)]
                await response.write(chunk)
                sent += len(chunk)
            if behaviour == "stall":
                await asyncio.sleep(self.stall_seconds)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._count(path, sent)
        return response

    def start(self) -> HostileServer:
        started = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(
                app, access_log=None, handle_signals=False, shutdown_timeout=0.2
            )
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = int(self._runner.addresses[0][1])
            self._stop = asyncio.Event()
            started.set()
            await self._stop.wait()
            await self._runner.cleanup()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(serve())
            except BaseException as error:  # reported to start() instead of dying silently
                failure.append(error)
                started.set()
            finally:
                # Handlers still stalling end here, instead of being destroyed pending.
                leftovers = asyncio.all_tasks(loop)
                for task in leftovers:
                    task.cancel()
                if leftovers:
                    loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=run, name="hostileserver", daemon=True)
        self._thread.start()
        started.wait(30)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


__all__ = ["BEHAVIOURS", "HostileServer", "ServerStats"]
