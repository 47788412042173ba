"""Resume cost and S3 bytes: seeking to a saved loader position against replaying the epoch,
and the shard cache against streaming every epoch.

Data: ``--samples`` (2,000) synthetic format-v1 samples (``--size`` px JPEGs, one or two mask
PNGs each) in shards of ``--per-shard``, written here, local and uploaded to a moto S3 server
on loopback (``oistream.testing.s3server``) behind a counting proxy
(``oistream.testing.faultproxy``).

1. Resume: for positions at 10% and 90% of an epoch (``epoch_samples = --samples``,
   ``--workers`` DataLoader workers, batch ``--batch``, shuffle buffer ``--shuffle``), a fresh
   Python process is timed from its start to its first batch after the position: ``seek``
   (``make_loader(...).load_state_dict(state)``, what ``--resume auto`` does) and ``replay``
   (iterate from the epoch's start and drop the batches already trained on: the trainer before
   this change). Mark: seek at 90% within 1.3x of seek at 10%, from local and s3:// shards.
2. Bytes: one-pass epochs (each shard read once per epoch, ``--workers`` workers) over 3
   epochs from s3://, body bytes the proxy sent, over the shards' total size: with
   ``shard_cache`` (mark <= 1.05x) and without (3x expected).

Times are wall clock on a shared machine: the load average is printed beside them.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/resume.py [--samples 2000] [--per-shard 100]``
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = r"""
import sys, time, json
started = float(sys.argv[1])
import torch
from oistream.loader import ShardDataset, make_loader
config = json.loads(sys.argv[2])
state = torch.load(config["state"], weights_only=True)
dataset = ShardDataset(config["source"], epoch_samples=config["samples"], shuffle=config["shuffle"],
                       seed=1, endpoint_url=config.get("endpoint"))
loader = make_loader(dataset, batch_size=config["batch"], num_workers=config["workers"])
batches = iter(loader) if config["mode"] == "replay" else None
if config["mode"] == "seek":
    loader.load_state_dict(state)
    batches = iter(loader)
else:
    for _ in range(state["batches"]):
        next(batches)
images, targets = next(batches)
print(json.dumps({"seconds": time.time() - started, "first": targets[0]["image_key"]}))
"""


def write_shards(root: Path, samples: int, per_shard: int, size: int) -> int:
    """Format-v1 shards and their manifest; returns the total bytes."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    records, total = [], 0
    for shard in range(0, samples, per_shard):
        name = f"train-{shard // per_shard:06d}.tar"
        buffer = io.BytesIO()
        with wds.TarWriter(buffer, mtime=0) as writer:
            for index in range(shard, min(shard + per_shard, samples)):
                key = f"{index:016x}"
                height, width = size * 3 // 4, size
                pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
                jpeg = io.BytesIO()
                Image.fromarray(pixels).save(jpeg, "JPEG", quality=80)
                sample = {"__key__": key, "jpg": jpeg.getvalue()}
                instances = []
                for k in range(1 + index % 2):
                    mask = np.zeros((height, width), np.uint8)
                    y, x = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
                    mask[y : y + height // 3, x : x + width // 3] = 255
                    png = io.BytesIO()
                    Image.fromarray(mask).convert("1").save(png, "PNG")
                    sample[f"{k:03d}.mask.png"] = png.getvalue()
                    instances.append(
                        {"mask": f"{k:03d}.mask.png", "class_index": 1 + k, "label": f"/m/{k}"}
                    )
                record = {"image_id": key, "width": width, "height": height, "instances": instances}
                sample["json"] = json.dumps(record).encode()
                writer.write(sample)
        data = buffer.getvalue()
        (root / name).write_bytes(data)
        total += len(data)
        records.append(
            {"name": name, "samples": min(per_shard, samples - shard), "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}
        )  # fmt: skip
    classes = [{"index": 0, "mid": None, "name": "background"}]
    classes += [{"index": i, "mid": f"/m/{i - 1}", "name": f"class {i}"} for i in (1, 2)]
    manifest = {"format_version": 1, "split": "train", "classes": classes, "shards": records}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return total


def position_at(source: str, batches: int, args: argparse.Namespace, endpoint: str | None) -> dict:
    import oistream

    dataset = oistream.ShardDataset(
        source, epoch_samples=args.samples, shuffle=args.shuffle, seed=1, endpoint_url=endpoint
    )
    loader = oistream.make_loader(dataset, batch_size=args.batch, num_workers=args.workers)
    stream = iter(loader)
    for _ in range(batches):
        next(stream)
    state = loader.state_dict()
    del stream
    return state


def time_child(config: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(started), json.dumps(config)],
        capture_output=True, text=True, env=env, timeout=1800, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--size", type=int, default=96, help="image width in pixels")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shuffle", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1, help="timings per case (best kept)")
    parser.add_argument(
        "--sources", nargs="*", default=["local", "s3"], help="where part 1 reads (none: skip)"
    )
    parser.add_argument("--skip-bytes", action="store_true", help="skip part 2")
    args = parser.parse_args()

    import torch

    from oistream.loader import ShardDataset, make_loader
    from oistream.testing.faultproxy import FaultProxy
    from oistream.testing.s3server import LocalS3

    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    total = write_shards(work / "train", args.samples, args.per_shard, args.size)
    shards = sorted((work / "train").iterdir())
    print(f"{args.samples} samples in {len(shards) - 1} shards, {total / 2**20:.1f} MiB; "
          f"workers {args.workers}, batch {args.batch}, shuffle {args.shuffle}")  # fmt: skip
    batches_per_epoch = args.samples // args.batch
    with LocalS3() as s3:
        bucket = s3.make_bucket().removeprefix("s3://")
        for path in shards:
            s3.client.put_object(Bucket=bucket, Key=f"train/{path.name}", Body=path.read_bytes())
        with FaultProxy(s3.endpoint_url) as proxy:
            sources = {"local": (str(work / "train"), None),
                       "s3": (f"s3://{bucket}/train", proxy.endpoint_url)}  # fmt: skip
            print("\n1. seconds from process start to the first batch after the position")
            for where, (source, endpoint) in sources.items():
                if where not in args.sources:
                    continue
                seconds: dict[tuple[str, int], float] = {}
                firsts: dict[tuple[str, int], str] = {}
                for percent in (10, 90):
                    k = batches_per_epoch * percent // 100
                    state_path = work / f"state-{where}-{percent}.pt"
                    torch.save(position_at(source, k, args, endpoint), state_path)
                    for mode in ("seek", "replay"):
                        config = {"state": str(state_path), "source": source, "mode": mode,
                                  "samples": args.samples, "shuffle": args.shuffle,
                                  "batch": args.batch, "workers": args.workers,
                                  "endpoint": endpoint}  # fmt: skip
                        runs = [time_child(config) for _ in range(args.rounds)]
                        assert len({r["first"] for r in runs}) == 1
                        seconds[(mode, percent)] = min(r["seconds"] for r in runs)
                        firsts[(mode, percent)] = runs[0]["first"]
                        print(f"  {where:5s} {mode:6s} at {percent}% (batch {k}): "
                              f"{seconds[(mode, percent)]:.2f} s  first {runs[0]['first']}  "
                              f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
                    assert firsts[("seek", percent)] == firsts[("replay", percent)], "disagree"
                ratio = seconds[("seek", 90)] / seconds[("seek", 10)]
                gain = seconds[("replay", 90)] / seconds[("seek", 90)]
                replay = seconds[("replay", 90)] / seconds[("replay", 10)]
                print(f"  {where}: seek 90%/10% = {ratio:.2f}x (mark <= 1.3x: "
                      f"{'met' if ratio <= 1.3 else 'MISSED'}); replay 90%/10% = {replay:.2f}x; "
                      f"replay/seek at 90% = {gain:.1f}x")  # fmt: skip

            if args.skip_bytes:
                return
            print("\n2. bytes read from s3:// over 3 one-pass epochs, over the shards' size")
            source, endpoint = sources["s3"]
            for label, cache in (("with shard_cache", work / "cache"), ("without", None)):
                dataset = ShardDataset(source, shuffle=args.shuffle, seed=1, train=False,
                                       endpoint_url=endpoint, shard_cache=cache)  # fmt: skip
                loader = make_loader(dataset, batch_size=args.batch, num_workers=args.workers)
                proxy.reset_stats()
                seen = 0
                for _ in range(3):
                    seen += sum(len(images) for images, _ in loader)
                sent = proxy.stats.bytes_sent
                ratio = sent / total
                mark = (
                    ""
                    if cache is None
                    else f" (mark <= 1.05x: {'met' if ratio <= 1.05 else 'MISSED'})"
                )
                print(f"  {label}: {sent / 2**20:.1f} MiB for {seen} samples = {ratio:.3f}x "
                      f"the shards{mark}  load {os.getloadavg()[0]:.1f}")  # fmt: skip
                del loader


if __name__ == "__main__":
    main()
