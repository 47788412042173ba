"""Shards of a synthetic Open Images bucket for the training benchmarks, built the user's way.

``fake_shards`` writes a fake bucket (``oistream.testing``) into a work folder and shards it
with the real command line, ``python -m oistream shard``, reading the bucket's two roots as
local paths (no S3 server needed). Results are cached by their parameters, so a second script in
the same work folder reuses them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from oistream.testing.fakebucket import make_fake_bucket

CLASSES = ("Person", "Car", "Traffic light", "Traffic sign")
REPO = str(Path(__file__).resolve().parents[1])  # so `python -m oistream` runs from a checkout


def fake_shards(
    workdir: str | Path,
    *,
    images: int,
    image_size: int,
    seed: int = 0,
    samples_per_shard: int = 64,
    splits: tuple[str, ...] = ("train", "validation"),
) -> dict[str, Path]:
    """Shard folders by split (``manifest.json`` in each) for a bucket of ``images`` train
    images (validation gets ``max(8, images // 4)``) of long side ``image_size``."""
    root = Path(workdir) / f"fake-{images}x{image_size}-seed{seed}"
    folders = {split: root / "shards" / split for split in splits}
    if all((folder / "manifest.json").is_file() for folder in folders.values()):
        return folders
    started = time.perf_counter()
    bucket = root / "bucket"
    complete = bucket / ".complete"  # an interrupted build is redone, not reused
    if not complete.is_file():
        make_fake_bucket(
            bucket,
            images=images,
            image_size=image_size,
            seed=seed,
            splits=splits,
            processes=os.cpu_count() or 1,
        )
        complete.touch()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
    }
    for split, folder in folders.items():
        command = [sys.executable, "-m", "oistream", "shard", "--classes", *CLASSES]
        command += ["--split", split, "--out", str(folder), "--quiet"]
        command += ["--images", str(bucket / "open-images-dataset")]
        command += ["--metadata", str(bucket / "openimages")]
        command += ["--samples-per-shard", str(samples_per_shard)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    print(
        f"data: fake bucket of {images} train images at {image_size} px sharded in "
        f"{time.perf_counter() - started:.0f} s -> {root / 'shards'}",
        flush=True,
    )
    return folders
