"""nginx serving the fake bucket over HTTP, and what a proxy in front of it costs.

``Nginx`` serves a folder on 127.0.0.1, path style (``/{bucket}/{key}``), with ranges,
keep-alive and sendfile. It stands in for S3: moto's server manages only ~230 GETs/s here, far
too slow to measure a client that keeps hundreds of requests in flight. The benchmarks put
``oistream.testing.proxy.Proxy`` in front of it to add latency and count what was requested;
``proxy_overhead`` measures that proxy's cost: small range GETs/s straight to nginx and through
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _procs import die_with_parent, free_port, wait_for_port

from oistream.testing.proxy import Proxy

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


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
            preexec_fn=die_with_parent,
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
    """Small range GETs/s straight to nginx and through a zero-latency ``Proxy`` in its own
    process (as the benchmarks run it), and the proxy's CPU microseconds per request."""
    direct = request_rate(f"http://127.0.0.1:{nginx_port}/{object_key}", seconds)
    with Proxy(f"http://127.0.0.1:{nginx_port}", process=True) as proxy:
        proxied = request_rate(f"{proxy.url}/{object_key}", seconds)
        stats = proxy.stats
    cpu_per_request = 1e6 * stats.cpu_seconds / max(1, stats.requests)
    return {"direct": direct, "proxied": proxied, "proxy_cpu_us_per_request": cpu_per_request}
