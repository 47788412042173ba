"""The loader against hostile shards: pixel bombs, compressed tars, non-integer class indices.

Memory cases read the shard in a child process under an address-space limit a little above
what importing the loader maps, so decoding a bomb fails fast there instead of swapping here.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shardfactory import (
    FakeInstance,
    random_samples,
    sample_members,
    write_shards,
    write_tar,
)

from oistream.loader import ShardDataset, ShardWarning

# Mapped by a child that has imported the loader (torch, numba) before reading anything:
# about 3.7 GB here. The limit leaves 1.5 GB for reading the shard.
_HEADROOM = 1_500 << 20


def blank_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def blank_jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "JPEG", quality=50)
    return buffer.getvalue()


def read_in_child(folder: Path) -> dict:
    """Keys read, ShardWarnings and peak RSS of one pass over ``folder`` in a limited child."""
    script = textwrap.dedent(
        f"""
        import json, resource, warnings
        import oistream.loader as loader
        def peak_rss():  # VmHWM: ru_maxrss would carry over the parent's peak through fork
            status = open("/proc/self/status").read()
            return int(status.split("VmHWM:")[1].split()[0]) * 1024
        peak_vm = int(open("/proc/self/status").read().split("VmPeak:")[1].split()[0]) * 1024
        limit = peak_vm + {_HEADROOM}
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", loader.ShardWarning)
            keys = [t["image_key"] for _, t in loader.ShardDataset({str(folder)!r}, shuffle=0,
                    train=False)]
        print(json.dumps({{"keys": keys,
                          "warnings": [str(w.message) for w in caught
                                       if issubclass(w.category, loader.ShardWarning)],
                          "peak_rss": peak_rss()}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_pixel_bombs_are_skipped_from_their_headers(tmp_path: Path) -> None:
    # 40 masks of 13000 x 13000 (each under Pillow's pixel limit): 6.8 GB decoded on main; a
    # 9000 x 9000 JPEG with 200 tiny masks: mask planes of 16 GB. Both between good samples.
    good, masks_bomb, planes_bomb, last = random_samples(4, seed=1, max_instances=2)
    png = blank_png(13_000, 13_000)
    masks_bomb.instances = [FakeInstance(mask=np.zeros((1, 1)), class_index=1, png=png)] * 40
    planes_bomb.jpeg = blank_jpeg(9_000, 9_000)
    tiny = blank_png(4, 4)
    planes_bomb.instances = [FakeInstance(mask=np.zeros((4, 4)), class_index=1, png=tiny)] * 200
    write_shards(tmp_path, [good, masks_bomb, planes_bomb, last], samples_per_shard=4)
    seen = read_in_child(tmp_path)
    assert seen["keys"] == [good.key, last.key]
    for bomb in (masks_bomb, planes_bomb):
        assert any(bomb.key in w and "pixel budget" in w for w in seen["warnings"])
    assert seen["peak_rss"] < 2 << 30


def test_the_budget_is_an_option_real_samples_never_reach(tmp_path: Path) -> None:
    samples = random_samples(3, seed=3, size=(768, 1024), max_instances=4)
    write_shards(tmp_path, samples, samples_per_shard=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShardWarning)
        assert len(list(ShardDataset(tmp_path, shuffle=0, train=False))) == 3
    with pytest.warns(ShardWarning, match="pixel budget"):
        tight = list(ShardDataset(tmp_path, shuffle=0, train=False, pixel_budget=1000))
    assert tight == []


def test_a_gzip_compressed_tar_is_refused_unread(tmp_path: Path) -> None:
    samples = random_samples(2, seed=4, max_instances=2)
    members = [m for s in samples for m in sample_members(s)]
    plain = write_tar(tmp_path / "plain.tar", members)
    (tmp_path / "train-000000.tar").write_bytes(gzip.compress(plain))
    (tmp_path / "plain.tar").unlink()
    with pytest.warns(ShardWarning, match="gzip-compressed, not a format v1"):
        assert list(ShardDataset(tmp_path, shuffle=0, train=False)) == []


@pytest.mark.parametrize("bad", [1.9, True, "1"])
def test_class_index_must_be_an_integer(tmp_path: Path, bad) -> None:
    good, other = random_samples(2, seed=5, max_instances=0)
    for sample in (good, other):
        sample.instances = [FakeInstance(mask=np.ones((30, 40)), class_index=1)]
    members = sample_members(good) + [
        (name, _with_class_index(data, bad) if name.endswith(".json") else data)
        for name, data in sample_members(other)
    ]
    write_tar(tmp_path / "train-000000.tar", members)
    with pytest.warns(ShardWarning, match=rf"skipping sample {other.key}.*class_index"):
        keys = [t["image_key"] for _, t in ShardDataset(tmp_path, shuffle=0, train=False)]
    assert keys == [good.key]


def _with_class_index(data: bytes, value) -> bytes:
    record = json.loads(data)
    record["instances"][0]["class_index"] = value
    return json.dumps(record).encode()
