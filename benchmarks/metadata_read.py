"""Reading the segmentation CSV over HTTP(S), 100 ms away: one streamed GET against fsspec's file.

The real metadata lives behind HTTPS (``https://storage.googleapis.com/openimages``), where
every whole-file read goes through fsspec's HTTP filesystem. The fake bucket of the sharding
benchmarks (``_bucket.py``: 94,000 train images, a 64.7 MB segmentation CSV of 326k rows) is
served by nginx behind a proxy adding ``--latency`` to every request, and the CSV is read as
``oistream shard`` reads it (``catalog.read_segmentations``: streamed, filtered to Person and
Car, bounded to ``--max-images``), through a first-run metadata cache, two ways:

* ours: ``MetadataCache.open``, one streamed GET (resumed by a ranged GET where a body breaks
  off; no HEAD first, as nothing is cached to validate);
* baseline: the file fsspec's HTTP filesystem opens (``fs.open(path, "rb", size=...)``: its
  random-access file, reading by ranges of its block size with read-ahead), as the cache did
  before it streamed.

Each contender runs ``--rounds`` times, interleaved; printed per contender: the best wall
time, the mean of its CPU time, the requests and body bytes the proxy counted in its last
round, the rows kept; then ours / baseline in time and bytes, and the load average.

Run: ``.venv/bin/python benchmarks/metadata_read.py [--latency 0.1] [--rounds 3]`` (needs
nginx: ``apt-get install nginx-light``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import _bucket
import _nginx
from _report import format_bytes

from oistream.sharding import catalog
from oistream.sharding.cache import MetadataCache
from oistream.testing.proxy import Proxy

CLASSES = ("/m/01g317", "/m/0k4j")  # Person, Car


def read_ours(url: str, max_images: int) -> int:
    cache = MetadataCache(tempfile.mkdtemp(prefix="oistream-metadata-bench-"))
    table = catalog.read_segmentations(
        url,
        CLASSES,
        {},
        opener=lambda: cache.open(url, {}),
        selection=catalog.Selection(None, max_images, 0, None),
    )
    return len(table.rows)


def read_baseline(url: str, max_images: int) -> int:
    from oistream import sources

    def opener():
        fs, path = sources.filesystem(url, {})
        info = fs.info(path)
        return fs.open(path, "rb", size=int(info["size"]))

    table = catalog.read_segmentations(
        url, CLASSES, {}, opener=opener, selection=catalog.Selection(None, max_images, 0, None)
    )
    return len(table.rows)


def main() -> int:
    parser = _bucket.bench_parser(__doc__)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds added per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-images", type=int, default=940, help="the 1%% subset's bound")
    args = parser.parse_args()
    bucket = _bucket.prepare_bench(args)
    csv = Path(bucket["root"]) / "openimages" / "v5" / "train-annotations-object-segmentation.csv"
    print(f"CSV: {csv} ({format_bytes(csv.stat().st_size)}); latency {args.latency * 1000:.0f} ms")
    contenders = {"ours (streamed)": read_ours, "baseline (fsspec file)": read_baseline}
    results: dict[str, dict] = {name: {"wall": [], "cpu": []} for name in contenders}
    with contextlib.ExitStack() as stack:
        nginx = stack.enter_context(_nginx.Nginx(bucket["root"]))
        proxy = stack.enter_context(Proxy(nginx.url, latency=args.latency, process=True))
        url = f"{proxy.endpoint_url}/openimages/v5/train-annotations-object-segmentation.csv"
        csv.read_bytes()  # in the page cache for both
        for round_index in range(args.rounds):
            order = list(contenders) if round_index % 2 == 0 else list(reversed(contenders))
            for name in order:
                proxy.reset_stats()
                wall, cpu = time.perf_counter(), time.process_time()
                rows = contenders[name](url, args.max_images)
                results[name]["wall"].append(time.perf_counter() - wall)
                results[name]["cpu"].append(time.process_time() - cpu)
                stats = proxy.stats
                results[name].update(
                    rows=rows, requests=stats.requests, body=stats.body_bytes, methods=stats.methods
                )
    load = os.getloadavg()[0]
    for name, r in results.items():
        methods = ", ".join(f"{count} {method}" for method, count in sorted(r["methods"].items()))
        print(
            f"  {name:24s} {min(r['wall']):5.2f} s (best of {args.rounds})  CPU "
            f"{sum(r['cpu']) / len(r['cpu']):5.2f} s  {r['requests']} requests ({methods}), "
            f"{format_bytes(r['body'])} of bodies, {r['rows']} rows kept"
        )
    ours, base = results["ours (streamed)"], results["baseline (fsspec file)"]
    same = "yes" if ours["rows"] == base["rows"] else "NO"
    print(
        f"baseline / ours: {min(base['wall']) / min(ours['wall']):.2f}x the time, "
        f"{base['body'] / ours['body']:.2f}x the bytes, {base['requests']} against "
        f"{ours['requests']} requests; same rows: {same} (load {load:.1f} on {os.cpu_count()} CPUs)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
