"""The shard writer's tar bytes: exactly what ``tarfile`` writes for the same members."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest

from oistream.sharding.writer import TAR_MTIME, TAR_OWNER, OutputLocation, tar_header


def tarfile_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """The tar the writer used to make with tarfile in stream mode, member for member."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for field in sorted(fields):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(fields[field])
                info.mtime = TAR_MTIME
                info.mode = 0o444
                info.uname = info.gname = TAR_OWNER
                tar.addfile(info, io.BytesIO(fields[field]))
    return out.getvalue()


@pytest.mark.parametrize(
    "name",
    [
        "a.jpg",
        "0123456789abcdef.000.mask.png",
        "x" * 100,  # the longest name the name field holds
        "d" * 60 + "/" + "e" * 60 + ".json",  # over 100 bytes: prefix and name
        "caf\u00e9.json",  # not ASCII
    ],
)
@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 8**11 - 1])
def test_headers_equal_tarfiles(name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o444
    info.uname = info.gname = TAR_OWNER
    assert tar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING)


def test_a_shard_is_byte_for_byte_the_tar_tarfile_writes(tmp_path: Path) -> None:
    rng = random.Random(3)
    samples = []
    for index in range(40):
        key = f"{rng.getrandbits(64):016x}"
        fields = {"jpg": rng.randbytes(rng.randrange(0, 3000)), "json": b"{}"}
        for k in range(rng.randrange(0, 4)):
            fields[f"{k:03d}.mask.png"] = rng.randbytes(rng.choice([0, 512, 1024, 777]))
        samples.append((key if index else "k" * 87, fields))  # names up to 100 bytes
    location = OutputLocation(str(tmp_path))
    with location.shard("train-000000.tar") as shard:
        for key, fields in samples:
            shard.add(key, fields, instances=len(fields) - 2)
    written = (tmp_path / "train-000000.tar").read_bytes()
    assert written == tarfile_bytes(samples)
    assert shard.stats.bytes == len(written) and len(written) % tarfile.RECORDSIZE == 0
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        names = [m.name for m in tar]
    assert names == [f"{key}.{field}" for key, fields in samples for field in sorted(fields)]
