"""The fake bucket the sharding benchmarks read, built once, and what they share about it.

``cached_bucket`` builds a fake Open Images bucket (``oistream.testing.fakebucket``) once per set
of parameters under a work folder and reuses it on later runs; ``bench_parser`` and
``prepare_bench`` are the options and first steps every ``shard_*.py`` shares;
``mask_zip_paths`` and ``shard_members`` read the bucket and the shards written from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _nginx import require_nginx
from _procs import raise_on_sigterm

BENCH_CLASSES = ["Person", "Car", "Traffic light", "Traffic sign"]
IMAGES_BUCKET = "open-images-dataset"
METADATA_BUCKET = "openimages"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "oistream-bench"


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
