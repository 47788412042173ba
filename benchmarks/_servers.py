"""Shared pieces of the sharding benchmarks: a cached fake bucket, nginx, and a counting proxy.

* ``cached_bucket`` builds a fake Open Images bucket (``oistream.testing``) once per set of
  parameters under a work folder and reuses it on later runs.
* ``Nginx`` serves that folder over HTTP on 127.0.0.1 (path style: ``/{bucket}/{key}``), with
  ranges, keep-alive and sendfile. It stands in for S3: moto's server manages only ~230 GETs/s
  here, far too slow to measure a client that keeps hundreds of requests in flight.
* ``CountingProxy`` is a TCP proxy in its own process between the client and nginx. It delays
  every request by a fixed latency (a stand-in for the network distance to S3), and it counts,
  independently of the client's own bookkeeping, the bytes the server sends back, the requests,
  and the time-weighted number of requests in flight. It frames HTTP/1.1 responses by their
  ``Content-Length`` (nginx always sends one for files, ranges and errors) to know when each
  response ends; nothing else of HTTP is parsed.

Everything listens on 127.0.0.1 only, and every server is stopped when its ``with`` block ends
(Ctrl-C included); both also die with the benchmark process if it is killed outright.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_CLASSES = ["Person", "Car", "Traffic light", "Traffic sign"]
IMAGES_BUCKET = "open-images-dataset"
METADATA_BUCKET = "openimages"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "oistream-bench"
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")

# Requests start with a method token; anything else in the client-to-server direction is the
# continuation of a request (the benchmark's clients send no request bodies).
_METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ", b"OPTIONS ", b"PATCH ")


# ---------------------------------------------------------------------------------------------
# The fake bucket, built once


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The options every sharding benchmark shares: where the bucket lives and its shape."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--images", type=int, default=94_000, help="train images of the bucket")
    parser.add_argument("--image-size", type=int, default=160, help="long side of the images")
    parser.add_argument("--scenes", type=int, default=64, help="distinct scenes rendered")
    return parser


def prepare_bench(args: Any) -> dict:
    """What every sharding benchmark does first: clean exits, nginx present, the bucket built.

    ``args`` carries ``workdir``, ``images``, ``image_size`` and ``scenes``.
    """
    raise_on_sigterm()
    require_nginx()
    return cached_bucket(
        args.workdir,
        images=args.images,
        image_size=args.image_size,
        distinct_scenes=args.scenes,
        zip64=True,
    )


def cached_bucket(
    workdir: Path,
    *,
    images: int,
    image_size: int,
    distinct_scenes: int,
    zip64: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """A train-only fake bucket under ``workdir``, built on first use and reused afterwards.

    Returns ``make_fake_bucket``'s summary plus ``"built_seconds"`` (0 when reused). The summary
    is written last, so a folder without it (an interrupted build) is rebuilt.
    """
    from oistream.testing.fakebucket import make_fake_bucket

    name = f"bucket-n{images}-px{image_size}-scenes{distinct_scenes}-zip64{int(zip64)}-s{seed}"
    root = Path(workdir) / name
    summary_file = root / "summary.json"
    if summary_file.exists():
        return json.loads(summary_file.read_text()) | {"built_seconds": 0.0}
    shutil.rmtree(root, ignore_errors=True)
    log(f"building the fake bucket {root} ({images} train images, once; later runs reuse it)")
    started = time.perf_counter()
    building = Path(workdir) / f".{name}.building"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    summary = make_fake_bucket(
        building,
        images,
        seed=seed,
        image_size=image_size,
        zip64=zip64,
        distinct_scenes=distinct_scenes,
        splits=("train",),
    )
    os.replace(building, root)
    summary.update(
        root=str(root),
        images_root=str(root / IMAGES_BUCKET),
        metadata_root=str(root / METADATA_BUCKET),
    )
    summary_file.write_text(json.dumps(summary))
    return summary | {"built_seconds": time.perf_counter() - started}


def mask_zip_paths(bucket_root: str | Path, split: str = "train") -> dict[str, Path]:
    """Prefix -> path of each of the split's 16 mask zips in a fake bucket on disk."""
    folder = Path(bucket_root) / METADATA_BUCKET / "v5" / f"{split}-masks"
    return {p.stem.rsplit("-", 1)[1]: p for p in sorted(folder.glob(f"{split}-masks-*.zip"))}


def shard_members(out: str | Path) -> Iterator[tuple[str, bytes]]:
    """``(member name, bytes)`` of every member of every tar shard in ``out``, in order."""
    for shard in sorted(Path(out).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.isfile():
                    handle = tar.extractfile(info)
                    assert handle is not None
                    yield info.name, handle.read()


# ---------------------------------------------------------------------------------------------
# Processes that die with us


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the benchmark dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, alive: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server meant for port {port} exited")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def run_command(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``command`` to completion in its own process group, output captured.

    If we are interrupted (Ctrl-C, SIGTERM via ``raise_on_sigterm``) the whole group is killed:
    the command's worker processes too, which would otherwise be left waiting for work.
    """
    process = subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate()
    except BaseException:
        kill_group(process.pid)
        process.wait()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (one started with ``start_new_session``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def raise_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so ``with`` blocks stop their servers on it too."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------------------------------------
# nginx


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return next((c for c in NGINX_CANDIDATES if os.access(c, os.X_OK)), None)


def require_nginx() -> str:
    """The nginx binary, or one line saying how to get it and exit status 2."""
    nginx = find_nginx()
    if nginx is None:
        print(
            "nginx not found: this benchmark serves the fake bucket with it; "
            "install it with `apt-get install nginx-light`",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return nginx


_NGINX_CONFIG = """\
worker_processes {workers};
daemon off;
master_process on;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    keepalive_timeout 600s;
    open_file_cache max=200000 inactive=600s;
    default_type application/octet-stream;
    client_body_temp_path {home}/body;
    proxy_temp_path {home}/proxy;
    fastcgi_temp_path {home}/fastcgi;
    uwsgi_temp_path {home}/uwsgi;
    scgi_temp_path {home}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        root {root};
        location / {{ }}
    }}
}}
"""


class Nginx:
    """nginx serving ``root`` on 127.0.0.1: ``GET /{bucket}/{key}`` reads ``root/{bucket}/{key}``.

    Use as a context manager; ``url`` is the endpoint. ``workers`` nginx worker processes.
    """

    def __init__(self, root: str | Path, *, workers: int = 1, binary: str | None = None):
        self.root = Path(root).resolve()
        self.workers = workers
        self.binary = binary or require_nginx()
        self.port = 0
        self._home: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Nginx:
        self._home = tempfile.TemporaryDirectory(prefix="oistream-nginx-")
        home = self._home.name
        self.port = free_port()
        config = Path(home) / "nginx.conf"
        config.write_text(
            _NGINX_CONFIG.format(workers=self.workers, home=home, port=self.port, root=self.root)
        )
        self._process = subprocess.Popen(
            [self.binary, "-p", home, "-c", str(config), "-e", f"{home}/error.log"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        try:
            wait_for_port(self.port, lambda: self._process.poll() is None)
        except BaseException:
            log = (Path(home) / "error.log").read_text(errors="replace")[-2000:]
            self.__exit__(None, None, None)
            raise RuntimeError(f"nginx did not start:\n{log}") from None
        return self

    def cpu_seconds(self) -> float:
        """CPU time nginx (master and workers) has used so far; 0 without psutil."""
        try:
            import psutil
        except ImportError:
            return 0.0
        total = 0.0
        with contextlib.suppress(psutil.Error):
            master = psutil.Process(self._process.pid)
            for process in [master, *master.children(recursive=True)]:
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def __exit__(self, *exc: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGQUIT)  # graceful: master stops its workers
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._home is not None:
            self._home.cleanup()
            self._home = None


# ---------------------------------------------------------------------------------------------
# The counting, delaying proxy


@dataclass
class ProxyStats:
    """What went through the proxy since it started or since ``reset``.

    ``bytes_down`` is every byte the server sent (status lines, headers, bodies);
    ``body_bytes`` the bodies alone. ``requests`` counts requests received from clients,
    ``responses`` the responses framed complete. The in-flight figures are time-weighted means
    of the requests open at the proxy (from a request's arrival to its response's last byte,
    latency included): ``mean_in_flight`` over the whole active span (first request to last
    response), ``watched_mean_in_flight`` from the first request matching the watched prefix
    to the last response (None when no such request came). ``bytes_by_kind`` splits
    ``bytes_down`` by the kinds of request named at ``reset`` (by request-line prefix), the rest
    under ``"other"``.
    """

    requests: int = 0
    responses: int = 0
    bytes_down: int = 0
    body_bytes: int = 0
    bytes_up: int = 0
    connections: int = 0
    max_in_flight: int = 0
    mean_in_flight: float = 0.0
    active_seconds: float = 0.0
    watched_requests: int = 0
    watched_mean_in_flight: float | None = None
    watched_seconds: float = 0.0
    unframed_connections: int = 0
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    requests_by_kind: dict[str, int] = field(default_factory=dict)
    body_bytes_by_kind: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0  # CPU time the proxy process itself used
    # time.monotonic() (the same clock in every process here) of each kind's first request and
    # last response: a timeline of a run seen from the server's side
    first_start_by_kind: dict[str, float] = field(default_factory=dict)
    last_end_by_kind: dict[str, float] = field(default_factory=dict)


class _Counters:
    """Lives in the proxy process; touched from its event loop only."""

    def __init__(self, watch: bytes | None = None, kinds: Sequence[tuple[str, bytes]] = ()) -> None:
        self.watch = watch
        self.kinds = list(kinds)
        self.bytes_by_kind: collections.Counter[str] = collections.Counter()
        self.requests_by_kind: collections.Counter[str] = collections.Counter()
        self.body_bytes_by_kind: collections.Counter[str] = collections.Counter()
        self.requests = self.responses = 0
        self.bytes_down = self.body_bytes = self.bytes_up = 0
        self.connections = self.unframed = 0
        self.in_flight = self.max_in_flight = 0
        self.integral = 0.0  # in-flight count integrated over time
        self.last_change = 0.0
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.watch_start: float | None = None
        self.watch_integral_at_start = 0.0
        self.watched_requests = 0
        self.cpu_at_start = time.process_time()
        # time.monotonic() of each kind's first request arrival and last response end
        self.first_start_by_kind: dict[str, float] = {}
        self.last_end_by_kind: dict[str, float] = {}

    def _advance(self, now: float) -> None:
        self.integral += self.in_flight * (now - self.last_change)
        self.last_change = now

    def kind_of(self, head: bytes) -> str:
        return next((name for name, prefix in self.kinds if head.startswith(prefix)), "other")

    def request_started(self, now: float, head: bytes) -> None:
        kind = self.kind_of(head)
        self.requests_by_kind[kind] += 1
        self.first_start_by_kind.setdefault(kind, now)
        if self.first_start is None:
            self.first_start = self.last_change = now
        self._advance(now)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.requests += 1
        if self.watch is not None and head.startswith(self.watch):
            self.watched_requests += 1
            if self.watch_start is None:
                self.watch_start = now
                self.watch_integral_at_start = self.integral

    def request_ended(self, now: float, kind: str) -> None:
        self._advance(now)
        self.in_flight -= 1
        self.last_end = now
        self.last_end_by_kind[kind] = now

    def snapshot(self) -> ProxyStats:
        stats = ProxyStats(
            requests=self.requests,
            responses=self.responses,
            bytes_down=self.bytes_down,
            body_bytes=self.body_bytes,
            bytes_up=self.bytes_up,
            connections=self.connections,
            max_in_flight=self.max_in_flight,
            watched_requests=self.watched_requests,
            unframed_connections=self.unframed,
            bytes_by_kind=dict(self.bytes_by_kind),
            requests_by_kind=dict(self.requests_by_kind),
            body_bytes_by_kind=dict(self.body_bytes_by_kind),
            cpu_seconds=time.process_time() - self.cpu_at_start,
            first_start_by_kind=dict(self.first_start_by_kind),
            last_end_by_kind=dict(self.last_end_by_kind),
        )
        if self.first_start is not None and self.last_end is not None:
            end, integral = self.last_end, self.integral
            # The integral runs to the last change; requests still open count up to last_end.
            if self.last_change > end:
                end = self.last_change
            stats.active_seconds = end - self.first_start
            if stats.active_seconds > 0:
                stats.mean_in_flight = integral / stats.active_seconds
            if self.watch_start is not None and end > self.watch_start:
                stats.watched_seconds = end - self.watch_start
                stats.watched_mean_in_flight = (
                    integral - self.watch_integral_at_start
                ) / stats.watched_seconds
        return stats


class _ClientSide(asyncio.Protocol):
    """A client connection: requests go upstream after the latency, responses come back at once."""

    def __init__(self, proxy: _ProxyServer) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.transport: asyncio.Transport | None = None
        self.upstream: _ServerSide | None = None
        self.delayed: collections.deque[tuple[float, bytes]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        # (method, kind) of each request sent and not yet answered, oldest first
        self.open_requests: collections.deque[tuple[bytes, str]] = collections.deque()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proxy.counters.connections += 1
        self.transport.pause_reading()  # until the upstream connection is up
        self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            _, upstream = await self.loop.create_connection(
                lambda: _ServerSide(self), "127.0.0.1", self.proxy.upstream_port
            )
        except OSError:
            self.transport.close()
            return
        self.upstream = upstream
        if not self.closed:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        counters = self.proxy.counters
        counters.bytes_up += len(data)
        if data.startswith(_METHODS):
            head = data[:256]
            counters.request_started(now, head)
            self.open_requests.append((data[: data.index(b" ")], counters.kind_of(head)))
        self.delayed.append((now + self.proxy.latency, data))
        if self.timer is None:
            self._release()

    def _release(self) -> None:
        """Forward, in order, every delayed chunk whose time has come; re-arm for the next."""
        self.timer = None
        now = self.loop.time()
        while self.delayed and self.delayed[0][0] <= now:
            _, data = self.delayed.popleft()
            if self.upstream is not None and self.upstream.transport is not None:
                self.upstream.transport.write(data)
        if self.delayed:
            self.timer = self.loop.call_at(self.delayed[0][0], self._release)

    def pause_writing(self) -> None:  # the client reads slower than the server sends
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def finish_open_requests(self) -> None:
        now = self.loop.time()
        while self.open_requests:
            _, kind = self.open_requests.popleft()
            self.proxy.counters.request_ended(now, kind)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.finish_open_requests()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


class _ServerSide(asyncio.Protocol):
    """The upstream half: forwards nginx's bytes to the client and frames its responses."""

    def __init__(self, client: _ClientSide) -> None:
        self.client = client
        self.counters = client.proxy.counters
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.body_left = 0
        self.framing = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.counters.bytes_down += len(data)
        # Without pipelining (no client here pipelines) a chunk belongs to the oldest request.
        kind = self.client.open_requests[0][1] if self.client.open_requests else "other"
        self.counters.bytes_by_kind[kind] += len(data)
        if self.client.transport is not None:
            self.client.transport.write(data)
        if self.framing:
            self._frame(data)

    def _frame(self, data: bytes) -> None:
        position = 0
        while position < len(data):
            if self.body_left:
                taken = min(self.body_left, len(data) - position)
                self.body_left -= taken
                self.counters.body_bytes += taken
                if self.client.open_requests:
                    self.counters.body_bytes_by_kind[self.client.open_requests[0][1]] += taken
                position += taken
                if not self.body_left:
                    self._response_done()
                continue
            self.head += data[position:]
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 65536:
                    self._give_up_framing()
                return
            head, rest = bytes(self.head[: end + 4]), bytes(self.head[end + 4 :])
            self.head.clear()
            length = self._body_length(head)
            if length is None:
                self._give_up_framing()
                return
            self.body_left = length
            if not length:
                self._response_done()
            data, position = rest, 0

    def _body_length(self, head: bytes) -> int | None:
        lines = head.split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            return None
        method = self.client.open_requests[0][0] if self.client.open_requests else b"GET"
        if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            return 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return int(value.strip())
        return None

    def _response_done(self) -> None:
        self.counters.responses += 1
        if self.client.open_requests:
            _, kind = self.client.open_requests.popleft()
            self.counters.request_ended(self.client.loop.time(), kind)

    def _give_up_framing(self) -> None:
        # Bytes are still counted; this connection's requests end when it closes.
        self.framing = False
        self.counters.unframed += 1

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.finish_open_requests()
        if self.client.transport is not None:
            self.client.transport.close()


class _ProxyServer:
    def __init__(self, loop: asyncio.AbstractEventLoop, upstream_port: int, latency: float):
        self.loop = loop
        self.upstream_port = upstream_port
        self.latency = latency
        self.counters = _Counters()


def _proxy_main(upstream_port: int, latency: float, control: Any, parent_pid: int) -> None:
    """The proxy process: serve until told to stop, answering stats requests on ``control``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()
    loop = asyncio.new_event_loop()
    proxy = _ProxyServer(loop, upstream_port, latency)
    server = loop.run_until_complete(
        loop.create_server(lambda: _ClientSide(proxy), "127.0.0.1", 0, backlog=4096)
    )
    control.send(("ready", server.sockets[0].getsockname()[1]))
    stop = loop.create_future()

    def on_command() -> None:
        try:
            command, argument = control.recv()
        except (EOFError, OSError):
            command, argument = "stop", None
        if command == "stats":
            control.send(proxy.counters.snapshot())
        elif command == "reset":
            watch, kinds = argument
            proxy.counters = _Counters(watch=watch, kinds=kinds)
            control.send("ok")
        elif not stop.done():
            stop.set_result(None)

    def check_parent() -> None:
        if os.getppid() != parent_pid and not stop.done():
            stop.set_result(None)
        else:
            loop.call_later(1.0, check_parent)

    loop.add_reader(control.fileno(), on_command)
    loop.call_later(1.0, check_parent)
    loop.run_until_complete(stop)
    server.close()
    loop.close()


class CountingProxy:
    """A delaying, counting TCP proxy to 127.0.0.1:``upstream_port``, in its own process.

    ``latency`` seconds are added to every request (to each client-to-server chunk, in order;
    responses flow back at once). ``reset(watch=b"GET /bucket/", kinds=[("images",
    b"GET /bucket/")])`` zeroes the counters, names the requests whose first arrival starts the
    "watched" span and the kinds bytes are counted by; ``stats()`` reads the counters.
    """

    def __init__(self, upstream_port: int, latency: float = 0.0) -> None:
        self.upstream_port = upstream_port
        self.latency = latency
        self.port = 0
        self._process: multiprocessing.process.BaseProcess | None = None
        self._control: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> CountingProxy:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._process = context.Process(
            target=_proxy_main,
            args=(self.upstream_port, self.latency, theirs, os.getpid()),
            daemon=True,
            name="counting-proxy",
        )
        self._process.start()
        theirs.close()
        self._control = ours
        if not ours.poll(30):
            self.__exit__(None, None, None)
            raise RuntimeError("the counting proxy did not start")
        _, self.port = ours.recv()
        return self

    def _ask(self, command: str, argument: Any = None) -> Any:
        self._control.send((command, argument))
        return self._control.recv()

    def stats(self) -> ProxyStats:
        return self._ask("stats")

    def reset(self, watch: bytes | None = None, kinds: Sequence[tuple[str, bytes]] = ()) -> None:
        self._ask("reset", (watch, list(kinds)))

    def __exit__(self, *exc: object) -> None:
        if self._process is None:
            return
        with contextlib.suppress(OSError, BrokenPipeError):
            self._control.send(("stop", None))
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._control.close()
        self._process = None


# ---------------------------------------------------------------------------------------------
# Proxy overhead


async def _hammer(url: str, seconds: float, connections: int) -> int:
    """Requests completed in ``seconds`` by ``connections`` keep-alive loops GETting ``url``."""
    import aiohttp

    done = 0
    deadline = asyncio.get_running_loop().time() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def loop_requests() -> None:
            nonlocal done
            while asyncio.get_running_loop().time() < deadline:
                async with session.get(url, headers={"Range": "bytes=0-4095"}) as response:
                    await response.read()
                done += 1

        await asyncio.gather(*(loop_requests() for _ in range(connections)))
    return done


def request_rate(url: str, seconds: float = 2.0, connections: int = 64) -> float:
    """Small range GETs per second one aiohttp client process gets from ``url``."""
    started = time.perf_counter()
    done = asyncio.run(_hammer(url, seconds, connections))
    return done / (time.perf_counter() - started)


def proxy_overhead(nginx_port: int, object_key: str, seconds: float = 2.0) -> dict[str, float]:
    """Small range GETs/s straight to nginx and through a zero-latency ``CountingProxy``."""
    direct = request_rate(f"http://127.0.0.1:{nginx_port}/{object_key}", seconds)
    with CountingProxy(nginx_port, latency=0.0) as proxy:
        proxied = request_rate(f"{proxy.url}/{object_key}", seconds)
    return {"direct": direct, "proxied": proxied}


def format_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} GB"


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"
