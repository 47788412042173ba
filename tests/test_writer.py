"""The shard writer's tar bytes: exactly what ``tarfile`` writes for the same members."""

from __future__ import annotations

import io
import random
import tarfile
import time
from pathlib import Path

import pytest

from oistream.errors import OistreamError
from oistream.sharding.writer import (
    LEASE_EXPIRY_SECONDS,
    LEASE_RECORD,
    TAR_MTIME,
    TAR_OWNER,
    OutputLocation,
    claim_output,
    tar_header,
)


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


# --- the lease ----------------------------------------------------------------------------------

PLAN = {"plan_hash": "h", "split": "train", "parameters": {}, "shards": []}


def _lease_of(host: str, renewed_seconds_ago: float) -> dict:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - renewed_seconds_ago))
    return {"host": host, "pid": 1, "started": stamp, "renewed": stamp, "run": "theirs"}


@pytest.mark.parametrize("minutes_ago", [5, 16])
def test_a_lease_from_another_host_holds_until_it_is_not_renewed(tmp_path, minutes_ago) -> None:
    """A preempted machine cannot be asked whether its run lives: its lease holds while it is
    renewed, and a rerun elsewhere takes it over once it has been silent for 15 minutes."""
    location = OutputLocation(str(tmp_path / "out"))
    holder = _lease_of("a-preempted-machine", minutes_ago * 60)
    location.write_json(LEASE_RECORD, holder)
    if minutes_ago * 60 < LEASE_EXPIRY_SECONDS:
        with pytest.raises(OistreamError, match=r"in use by another run .*renewed"):
            claim_output(location, PLAN, overwrite=False)
        assert location.read_json(LEASE_RECORD) == holder  # untouched
        return
    lease = claim_output(location, PLAN, overwrite=False)
    try:
        assert lease.took_over == holder
        assert location.read_json(LEASE_RECORD)["run"] == lease.record["run"]
    finally:
        lease.release()
    assert location.read_json(LEASE_RECORD) is None


def test_a_held_lease_is_renewed_while_it_is_ours_and_stops_at_release(tmp_path, monkeypatch):
    location = OutputLocation(str(tmp_path / "out"))
    lease = claim_output(location, PLAN, overwrite=False)
    assert lease._renewing is not None and lease._renewing.is_alive()
    started = location.read_json(LEASE_RECORD)["renewed"]
    later = time.time() + LEASE_EXPIRY_SECONDS
    monkeypatch.setattr(time, "time", lambda: later)
    assert lease.renew()
    renewed = location.read_json(LEASE_RECORD)["renewed"]
    assert renewed > started and renewed == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(later))
    # Taken over by another run meanwhile: never written back, and left alone at release.
    other = _lease_of("elsewhere", 0)
    location.write_json(LEASE_RECORD, other)
    assert not lease.renew()
    lease.release()
    assert not lease._renewing.is_alive()
    assert location.read_json(LEASE_RECORD) == other
