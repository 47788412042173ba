"""Remote zips: directories equal zipfile's, members byte-identical, few bytes requested."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import random
import struct
import tracemalloc
import uuid
import zipfile
from pathlib import Path
from typing import Any
from unittest import mock

import fsspec
import pytest
import s3fs
from hypothesis import given, settings
from hypothesis import strategies as st

from oistream.sharding import remotezip
from oistream.sharding.fetch import Fetcher, MissingObject, RetryPolicy
from oistream.sharding.remotezip import (
    LOCAL_EXTRA_MARGIN,
    TAIL_BYTES,
    CentralDirectoryCache,
    CorruptMember,
    CorruptZip,
    ZipMember,
    _parse_central_directory,
    _tiled_entries,
    coalesce,
    fetch_members,
    member_span,
    pick_members,
    read_central_directory,
    read_zip_directory,
)
from oistream.testing.faultproxy import FaultProxy
from oistream.testing.zipreference import zipfile_members

logging.getLogger("werkzeug").setLevel(logging.ERROR)

CREDENTIALS = {"key": "testing", "secret": "testing"}
QUICK = RetryPolicy(attempts=6, base_delay=0.001, max_delay=0.01, timeout=20)


# ---------------------------------------------------------------------------------------------
# Zips to read


def mask_name(rng: random.Random) -> str:
    """Shaped like Open Images' MaskPath: ImageID_LabelName_BoxID.png."""
    return f"{rng.getrandbits(64):016x}_m0{rng.getrandbits(20):05x}_{rng.getrandbits(32):08x}.png"


def varied_members(seed: int = 0, count: int = 40) -> list[tuple[str, bytes, int]]:
    """Stored, deflated and bzip2 members, empty to 20 kB, ASCII and UTF-8 names."""
    rng = random.Random(seed)
    members = []
    methods = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2]
    for index in range(count):
        size = rng.choice([0, 1, 100, 3000, 20_000])
        noise = rng.randbytes(size // 2)
        data = noise + b"ab" * (size // 4)  # half noise, half compressible
        members.append((mask_name(rng), data, methods[index % 3]))
    members.append(("ünïcode-mäsk.png", b"\x89PNG" * 100, zipfile.ZIP_DEFLATED))
    members.append(("folder/", b"", zipfile.ZIP_STORED))
    return members


def build_zip(
    members: list[tuple[str, bytes, int]],
    *,
    comment: bytes = b"",
    force_zip64_end: bool = False,
    zip64_limit: int | None = None,
    long_local_extra: set[str] = frozenset(),  # type: ignore[assignment]
) -> bytes:
    buffer = io.BytesIO()
    with mock.patch.object(zipfile, "ZIP64_LIMIT", zip64_limit or zipfile.ZIP64_LIMIT):
        archive = zipfile.ZipFile(buffer, "w")
        for name, data, method in members:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 2, 3, 4, 6))
            info.compress_type = method
            if name in long_local_extra:
                info.extra = struct.pack("<HH", 0xCAFE, 196) + bytes(196)
            archive.writestr(info, data)
        archive.comment = comment
        # zipfile writes Zip64 end records only past 65535 members: a limit of 0 forces them.
        limit = 0 if force_zip64_end else zipfile.ZIP_FILECOUNT_LIMIT
        with mock.patch.object(zipfile, "ZIP_FILECOUNT_LIMIT", limit):
            archive.close()
    return buffer.getvalue()


def zipfile_read(data: bytes, names: list[str]) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in names}


def has_zip64_end_record(data: bytes) -> bool:
    return zipfile.stringEndArchive64Locator in data[-(22 + 20 + 1024) :]


# ---------------------------------------------------------------------------------------------
# A bucket on a local S3 server


class Bucket:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, **CREDENTIALS)
        self.name = f"zips-{uuid.uuid4().hex[:12]}"
        self.fs.mkdir(self.name)

    def put(self, key: str, data: bytes) -> str:
        self.fs.pipe(f"{self.name}/{key}", data)
        return f"{self.name}/{key}"


@pytest.fixture(scope="module")
def bucket(moto_endpoint: str) -> Bucket:
    return Bucket(moto_endpoint)


def run(endpoint: str, work: Any, fetcher: Fetcher | None = None) -> Any:
    """Run ``work(fetcher, fs)`` in a fresh loop with an async s3fs on ``endpoint``."""

    async def main() -> Any:
        fs = s3fs.S3FileSystem(
            endpoint_url=endpoint, asynchronous=True, skip_instance_cache=True, **CREDENTIALS
        )
        try:
            return await work(fetcher or Fetcher(concurrency=32, retry=QUICK), fs)
        finally:
            if fs._s3 is not None:
                await fs._s3.__aexit__(None, None, None)

    return asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# Central directories


ZIP_KINDS = {
    "plain": {"comment": b"a comment " * 100},
    "zip64-end-records": {"force_zip64_end": True},
    "zip64-extra-fields": {"zip64_limit": 1000, "force_zip64_end": True},
    "long-comment": {"comment": b"c" * 65535},
}


@pytest.mark.parametrize("kind", list(ZIP_KINDS))
def test_central_directory_equals_zipfiles_and_costs_few_ranged_requests(
    kind: str, bucket: Bucket
) -> None:
    members = varied_members(seed=1, count=150)
    data = build_zip(members, **ZIP_KINDS[kind])
    assert has_zip64_end_record(data) == ("zip64" in kind)
    # Each central entry: 46 bytes, the name, at most a 28-byte Zip64 extra field.
    directory_size = sum(46 + len(name.encode()) + 28 for name, _, _ in members)
    path = bucket.put(f"{kind}.zip", data)
    with FaultProxy(bucket.endpoint, keep_log=True) as proxy:
        directory = run(proxy.endpoint_url, lambda f, fs: read_central_directory(f, fs, path))
        stats = proxy.stats
    assert directory == zipfile_members(data)
    assert stats.unranged_gets == 0
    assert stats.methods == {"HEAD": 1, "GET": stats.ranged_gets}
    assert stats.ranged_gets <= 2  # the tail, then the directory unless the tail held it
    assert stats.bytes_sent <= TAIL_BYTES + directory_size < len(data) / 2


def test_zip64_extra_fields_are_really_there() -> None:
    """The fixture above must exercise the 0xFFFFFFFF fields, or it proves nothing."""
    data = build_zip(varied_members(seed=1), zip64_limit=1000)
    end = data.rfind(zipfile.stringEndArchive)
    cd_offset = struct.unpack_from("<L", data, end + 16)[0]
    offsets = []
    position = cd_offset
    while data[position : position + 4] == zipfile.stringCentralDir:
        fields = struct.unpack_from(zipfile.structCentralDir, data, position)
        offsets.append(fields[18])
        position += 46 + fields[12] + fields[13] + fields[14]
    assert 0xFFFFFFFF in offsets


def test_more_than_65535_members(bucket: Bucket) -> None:
    members = [(f"m{i:05d}", b"x" if i % 2 else b"", zipfile.ZIP_STORED) for i in range(65_600)]
    data = build_zip(members)
    assert has_zip64_end_record(data)
    path = bucket.put("many.zip", data)
    names = ["m00000", "m00001", "m40001", "m65599"]

    async def work(fetcher: Fetcher, fs: Any) -> tuple[dict, dict]:
        directory = await read_central_directory(fetcher, fs, path, size=len(data))
        found, _ = pick_members(directory, names)
        return directory, await fetch_members(fetcher, fs, path, found)

    directory, fetched = run(bucket.endpoint, work)
    expected = zipfile_members(data)
    assert len(directory) == 65_600
    assert directory == expected
    assert fetched == zipfile_read(data, names)


def test_a_zip_behind_other_bytes_is_read_like_zipfile_does(bucket: Bucket) -> None:
    data = b"#!/bin/sh\n" * 500 + build_zip(varied_members(seed=2, count=10))
    path = bucket.put("appended.zip", data)
    names = list(zipfile_members(data))

    async def work(fetcher: Fetcher, fs: Any) -> tuple[dict, dict]:
        directory = await read_central_directory(fetcher, fs, path)
        return directory, await fetch_members(fetcher, fs, path, list(directory.values()))

    directory, fetched = run(bucket.endpoint, work)
    assert directory == zipfile_members(data)
    assert fetched == zipfile_read(data, names)


def test_not_a_zip_and_a_missing_zip(bucket: Bucket) -> None:
    path = bucket.put("noise.zip", os.urandom(100_000))
    with pytest.raises(CorruptZip, match="not a zip"):
        run(bucket.endpoint, lambda f, fs: read_central_directory(f, fs, path))
    with pytest.raises(MissingObject):
        run(bucket.endpoint, lambda f, fs: read_central_directory(f, fs, f"{bucket.name}/gone"))


def test_wanted_keeps_only_those_members(bucket: Bucket) -> None:
    data = build_zip(varied_members(seed=3))
    path = bucket.put("wanted.zip", data)
    every = zipfile_members(data)
    wanted = set(list(every)[:5]) | {"not-in-the-zip"}
    directory = run(
        bucket.endpoint, lambda f, fs: read_central_directory(f, fs, path, wanted=wanted)
    )
    assert directory == {name: every[name] for name in list(every)[:5]}


# ---------------------------------------------------------------------------------------------
# Members


def realistic_members(seed: int, images: int) -> list[tuple[str, bytes, int]]:
    """Like the mask zips: members sorted by name, 1-4 masks per image, PNG-sized and already
    compressed (stored), so neighbours in the zip are masks of the same image."""
    rng = random.Random(seed)
    members = []
    for _ in range(images):
        image_id = f"{rng.getrandbits(64):016x}"
        for _ in range(rng.randint(1, 4)):
            name = f"{image_id}_m0{rng.getrandbits(20):05x}_{rng.getrandbits(32):08x}.png"
            members.append((name, rng.randbytes(rng.randint(2500, 9000)), zipfile.ZIP_STORED))
    return sorted(members)


def test_members_are_byte_identical_and_requested_bytes_stay_near_the_payload(
    bucket: Bucket,
) -> None:
    members = realistic_members(seed=4, images=300)
    data = build_zip(members)
    path = bucket.put("realistic.zip", data)
    rng = random.Random(5)
    chosen_images = set(rng.sample(sorted({m[0][:16] for m in members}), 30))
    names = [name for name, _, _ in members if name[:16] in chosen_images]
    rng.shuffle(names)
    names = names[: len(names) - 3]  # some images lose a mask: gaps inside an image
    with FaultProxy(bucket.endpoint) as proxy:

        async def work(fetcher: Fetcher, fs: Any) -> dict[str, bytes | Exception]:
            directory = await read_central_directory(fetcher, fs, path)
            proxy.reset_stats()
            found, missing = pick_members(directory, names)
            assert not missing
            return await fetch_members(fetcher, fs, path, found)

        fetched = run(proxy.endpoint_url, work)
        stats = proxy.stats
    assert fetched == zipfile_read(data, names)
    payload = sum(len(fetched[name]) for name in names)
    assert stats.unranged_gets == 0
    assert stats.bytes_sent <= 1.10 * payload
    assert stats.ranged_gets < len(names)  # neighbours were coalesced


def test_every_member_survives_faults(bucket: Bucket) -> None:
    members = realistic_members(seed=6, images=60)
    data = build_zip(members)
    path = bucket.put("faulty.zip", data)
    names = [name for name, _, _ in members][::3]
    with FaultProxy(
        bucket.endpoint,
        fail_rate=0.25,
        reset_rate=0.15,
        truncate_rate=0.15,
        seed=11,
        max_faults_per_request=3,
    ) as proxy:

        async def work(fetcher: Fetcher, fs: Any) -> tuple[dict, Fetcher]:
            directory = await read_central_directory(fetcher, fs, path)
            found, _ = pick_members(directory, names)
            return await fetch_members(fetcher, fs, path, found), fetcher

        fetched, fetcher = run(proxy.endpoint_url, work)
        faults = proxy.stats.faults
    assert fetched == zipfile_read(data, names)
    assert fetcher.stats.retries == sum(faults.values()) > 0


def test_a_local_extra_field_longer_than_the_margin_is_fetched(bucket: Bucket) -> None:
    members = realistic_members(seed=7, images=5)
    long_extra = {members[2][0], members[-1][0]}
    data = build_zip(members, long_local_extra=long_extra)
    path = bucket.put("extra.zip", data)

    async def work(fetcher: Fetcher, fs: Any) -> tuple[dict, int]:
        directory = await read_central_directory(fetcher, fs, path)
        found, _ = pick_members(directory, sorted(long_extra))
        before = fetcher.stats.requests
        fetched = await fetch_members(fetcher, fs, path, found)
        return fetched, fetcher.stats.requests - before

    fetched, requests = run(bucket.endpoint, work)
    assert fetched == zipfile_read(data, sorted(long_extra))
    assert requests == 4  # two spans, each completed by a second request


def test_damage_becomes_corrupt_member_values_and_spares_the_others(bucket: Bucket) -> None:
    members = varied_members(seed=8)
    data = bytearray(build_zip(members))
    directory = zipfile_members(bytes(data))
    by_method = {}
    for member in directory.values():
        if member.file_size > 1000:
            by_method.setdefault(member.compress_type, []).append(member)
    stored, deflated = by_method[zipfile.ZIP_STORED][0], by_method[zipfile.ZIP_DEFLATED][0]
    bad_signature = by_method[zipfile.ZIP_BZIP2][0]
    for member in (stored, deflated):
        start, _ = member_span(member)
        data_start = start + 30 + len(member.name.encode())
        data[data_start + member.compress_size // 2] ^= 0xFF
    data[bad_signature.header_offset] ^= 0xFF
    path = bucket.put("damaged.zip", bytes(data))
    damaged = {stored.name, deflated.name, bad_signature.name}
    healthy = [m.name for m in directory.values() if m.name not in damaged]

    async def work(fetcher: Fetcher, fs: Any) -> dict:
        return await fetch_members(fetcher, fs, path, list(directory.values()))

    fetched = run(bucket.endpoint, work)
    for name in damaged:
        assert isinstance(fetched[name], CorruptMember), name
    assert "CRC" in str(fetched[stored.name])
    assert "local header" in str(fetched[bad_signature.name])
    assert {name: fetched[name] for name in healthy} == zipfile_read(bytes(data), healthy)


def test_missing_members_and_a_vanished_zip_are_missing_objects(bucket: Bucket) -> None:
    data = build_zip(varied_members(seed=9, count=6))
    path = bucket.put("vanishing.zip", data)
    directory = zipfile_members(data)
    found, missing = pick_members(directory, [*list(directory)[:3], "nope.png"])
    assert [m.name for m in found] == list(directory)[:3]
    assert isinstance(missing["nope.png"], MissingObject)
    bucket.fs.rm(path)
    fetched = run(bucket.endpoint, lambda f, fs: fetch_members(f, fs, path, found))
    assert set(fetched) == {m.name for m in found}
    assert all(isinstance(value, MissingObject) for value in fetched.values())


def test_local_zip_files_work_too(tmp_path: Path) -> None:
    data = build_zip(varied_members(seed=10, count=8), force_zip64_end=True)
    target = tmp_path / "local.zip"
    target.write_bytes(data)
    fs = fsspec.filesystem("file")

    async def main() -> dict:
        fetcher = Fetcher()
        directory = await read_central_directory(fetcher, fs, str(target))
        return await fetch_members(fetcher, fs, str(target), list(directory.values()))

    assert asyncio.run(main()) == zipfile_read(data, list(zipfile_members(data)))


# ---------------------------------------------------------------------------------------------
# The on-disk cache


def test_cache_serves_the_directory_with_one_head_until_the_zip_changes(
    bucket: Bucket, tmp_path: Path
) -> None:
    cache = CentralDirectoryCache(tmp_path / "cache")
    first = build_zip(varied_members(seed=12))
    path = bucket.put("cached.zip", first)

    proxy = FaultProxy(bucket.endpoint).start()  # one endpoint: it is part of the cache key

    def read_through_proxy() -> tuple[dict, Any]:
        proxy.reset_stats()
        directory = run(
            proxy.endpoint_url, lambda f, fs: read_central_directory(f, fs, path, cache=cache)
        )
        return directory, proxy.stats

    directory, stats = read_through_proxy()
    assert directory == zipfile_members(first) and stats.methods["GET"] >= 1
    again, stats = read_through_proxy()
    assert again == directory and stats.methods == {"HEAD": 1}
    second = build_zip(varied_members(seed=13))
    bucket.put("cached.zip", second)
    changed, stats = read_through_proxy()
    assert changed == zipfile_members(second) and stats.methods["GET"] >= 1
    # A damaged cache file is a miss, not an error: a bad header, or bytes that no longer
    # match their digest (one flipped byte in the directory's offsets would misplace members).
    for file in (tmp_path / "cache").glob("*.cd"):
        data = bytearray(file.read_bytes())
        data[-30] ^= 0x01
        file.write_bytes(bytes(data))
    flipped, stats = read_through_proxy()
    assert flipped == zipfile_members(second) and stats.methods["GET"] >= 1
    for file in (tmp_path / "cache").glob("*.cd"):
        file.write_text("{not json")
    assert read_through_proxy()[0] == zipfile_members(second)
    proxy.stop()
    wanted = {next(iter(zipfile_members(second)))}
    kept = run(
        bucket.endpoint,
        lambda f, fs: read_central_directory(f, fs, path, cache=cache, wanted=wanted),
    )
    assert set(kept) == wanted


def run_http(work: Any) -> Any:
    """Run ``work(fetcher, fs)`` in a fresh loop with fsspec's async HTTP filesystem."""
    from oistream.sharding import httpclient

    async def main() -> Any:
        fs = fsspec.filesystem("http", asynchronous=True, skip_instance_cache=True)
        try:
            return await work(Fetcher(concurrency=8, retry=QUICK), fs)
        finally:
            httpclient.close_pool(fs)

    return asyncio.run(main())


def many_members(count: int) -> list[tuple[str, bytes, int]]:
    rng = random.Random(count)
    return [(mask_name(rng), rng.randbytes(50), zipfile.ZIP_STORED) for _ in range(count)]


@pytest.mark.parametrize("count", [40, 2000])  # a directory inside the tail, and one past it
def test_an_http_zip_is_located_from_a_suffix_range_without_a_head(
    tmp_path: Path, count: int
) -> None:
    """The tail's answer gives the size and ETag: one round trip (two when the directory is
    longer than the tail) where a HEAD, the tail and the directory took three."""
    from oistream.testing.hostileserver import HostileServer

    data = build_zip(many_members(count))
    (tmp_path / "masks.zip").write_bytes(data)
    with HostileServer(tmp_path) as server:
        url = f"{server.url}/masks.zip"
        members, size, etag = run_http(lambda f, fs: read_zip_directory(f, fs, url))
        log = [entry[:3] for entry in server.stats.log]
    assert members == zipfile_members(data)
    assert size == len(data) and etag == f'"{hashlib.md5(data).hexdigest()}"'
    assert log[0] == ("GET", "/masks.zip", f"bytes=-{TAIL_BYTES}")
    assert [method for method, _, _ in log] == ["GET"] * (1 if len(data) <= TAIL_BYTES else 2)


def test_a_cached_http_zip_costs_one_head_and_a_refused_suffix_range_falls_back_to_it(
    tmp_path: Path,
) -> None:
    from oistream.testing.hostileserver import HostileServer

    data = build_zip(many_members(2000))
    (tmp_path / "zips").mkdir()
    for name in ("a.zip", "b.zip"):
        (tmp_path / "zips" / name).write_bytes(data)
    cache = CentralDirectoryCache(tmp_path / "cache")
    with HostileServer(tmp_path / "zips", misbehave={"/b.zip": "no_suffix_range"}) as server:

        def read(name: str, keep: CentralDirectoryCache | None) -> tuple[dict, list[tuple]]:
            before = len(server.stats.log)
            members, *_ = run_http(
                lambda f, fs: read_zip_directory(f, fs, f"{server.url}/{name}", cache=keep)
            )
            return members, [entry[:3] for entry in server.stats.log[before:]]

        first, first_log = read("a.zip", cache)
        again, again_log = read("a.zip", cache)
        refused, refused_log = read("b.zip", None)
    assert first == again == refused == zipfile_members(data)
    assert "HEAD" not in [method for method, _, _ in first_log]
    assert again_log == [("HEAD", "/a.zip", None)]  # the kept directory, validated
    tail = max(0, len(data) - TAIL_BYTES)
    assert refused_log[:3] == [
        ("GET", "/b.zip", f"bytes=-{TAIL_BYTES}"),  # answered 416
        ("HEAD", "/b.zip", None),
        ("GET", "/b.zip", f"bytes={tail}-{len(data) - 1}"),
    ]


# ---------------------------------------------------------------------------------------------
# Coalescing


def contiguous(sizes: list[int], name_length: int = 36) -> list[ZipMember]:
    members, offset = [], 0
    for index, size in enumerate(sizes):
        name = f"{index:0{name_length}d}"
        members.append(ZipMember(name, offset, size, size, 0, 0))
        offset += 30 + name_length + size
    return members


def test_neighbours_merge_into_one_span() -> None:
    members = contiguous([3000, 4000, 5000])
    spans = coalesce(list(reversed(members)) + members[:1])  # any order, duplicates
    assert spans == [(0, members[-1].header_offset + 66 + 5000 + LOCAL_EXTRA_MARGIN, members)]


def test_gaps_merge_only_within_max_gap_and_the_waste_budget() -> None:
    members = contiguous([5000, 3000, 5000, 3000, 5000])
    chosen = [members[0], members[2], members[4]]  # gaps of 3066 - margin bytes
    gap = members[2].header_offset - member_span(members[0])[1]
    assert gap == 3066 - LOCAL_EXTRA_MARGIN
    assert len(coalesce(chosen, max_gap=gap - 1, max_waste=10)) == 3
    assert len(coalesce(chosen, max_gap=gap, max_waste=10)) == 1
    # 15000 bytes of payload allow 750 bytes of gaps at 5 %: not one 3018-byte gap.
    assert len(coalesce(chosen, max_gap=16_384)) == 3
    budget = 2 * gap / 15_000 * 1.001
    assert len(coalesce(chosen, max_gap=16_384, max_waste=budget)) == 1
    assert len(coalesce(chosen, max_gap=16_384, max_waste=budget * 0.98)) == 2


def test_max_span_caps_a_request() -> None:
    members = contiguous([1000] * 10)
    spans = coalesce(members, max_span=3500)
    assert [len(group) for _, _, group in spans] == [3, 3, 3, 1]
    assert all(end - start <= 3500 for start, end, _ in spans)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 40_000), st.integers(0, 30_000), st.booleans()),
        min_size=1,
        max_size=40,
    ),
    st.integers(0, 50_000),
    st.floats(0, 1),
)
def test_coalescing_covers_every_member_within_the_byte_bound(
    layout: list[tuple[int, int, bool]], max_gap: int, max_waste: float
) -> None:
    members, offset, chosen = [], 0, []
    for index, (gap_before, size, take) in enumerate(layout):
        offset += gap_before
        member = ZipMember(f"member-{index}", offset, size, size, 0, 0)
        offset = member_span(member)[1] - LOCAL_EXTRA_MARGIN
        members.append(member)
        if take:
            chosen.append(member)
    spans = coalesce(chosen, max_gap, max_waste=max_waste)
    covered = [m for _, _, group in spans for m in group]
    assert sorted(covered, key=lambda m: m.header_offset) == chosen
    for start, end, group in spans:
        for member in group:
            member_start, member_end = member_span(member)
            assert start <= member_start and member_end <= end
    requested = sum(end - start for start, end, _ in spans)
    overhead = sum(member_span(m)[1] - member_span(m)[0] - m.compress_size for m in chosen)
    payload = sum(m.compress_size for m in chosen)
    assert requested <= payload * (1 + max_waste) + overhead + 1e-6
    assert [s for s, _, _ in spans] == sorted(s for s, _, _ in spans)


def test_tail_request_covers_the_longest_comment_and_zip64_records() -> None:
    assert TAIL_BYTES >= 22 + 65_535 + 20 + 56
    assert LOCAL_EXTRA_MARGIN < 46 + 1 + 22  # never past the end of the zip


def test_a_byte_budget_holds_at_most_its_limit_and_lets_an_oversized_request_go_alone():
    import asyncio

    from oistream.sharding.remotezip import ByteBudget

    async def scenario() -> tuple[int, list[int]]:
        budget = ByteBudget(100)
        held, peaks = 0, []
        release = asyncio.Event()

        async def take(nbytes: int) -> None:
            nonlocal held
            async with budget.hold(nbytes):
                held += min(nbytes, 100)
                peaks.append(held)
                await release.wait()
                held -= min(nbytes, 100)

        tasks = [asyncio.create_task(take(n)) for n in (60, 30, 40, 500)]
        for _ in range(5):
            await asyncio.sleep(0)  # let every task ask; those that fit now get in
        in_at_first = len(peaks)
        release.set()
        await asyncio.gather(*tasks)
        return in_at_first, peaks

    in_at_first, peaks = asyncio.run(scenario())
    assert in_at_first == 2  # 60 + 30 fit; 40 would make 130
    assert max(peaks) <= 100 and len(peaks) == 4  # the 500-byte request went, alone


# ---------------------------------------------------------------------------------------------
# The central directory's parse: numpy finds the entries, the walk judges a broken directory


def directory_of(data: bytes) -> tuple[bytes, int]:
    """The central directory of a zip without Zip64 records, and its entry count."""
    end = data.rfind(zipfile.stringEndArchive)
    _, _, _, _, entries, size, offset, _ = struct.unpack_from(zipfile.structEndArchive, data, end)
    return data[offset : offset + size], entries


# Names that the fast path must not trip over: a signature inside a name (the entries then no
# longer tile by signatures alone), names shorter than the 8-byte key, non-ASCII names.
AWKWARD_NAMES = ["PK\x01\x02.png", "a", "abcdefg", "é", "x/PK\x01\x02PK\x01\x02", "名前.png"]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    awkward=st.lists(st.sampled_from(AWKWARD_NAMES), unique=True),
    share=st.floats(0.0, 1.0),
)
def test_parse_finds_what_zipfile_finds(seed: int, awkward: list[str], share: float) -> None:
    rng = random.Random(seed)
    names = sorted({mask_name(rng) for _ in range(rng.randrange(0, 300))} | set(awkward))
    data = build_zip([(name, b"", zipfile.ZIP_STORED) for name in names])
    directory, entries = directory_of(data)
    wanted = {name for name in names if rng.random() < share} | {"absent.png", "ab", mask_name(rng)}
    assert _parse_central_directory(directory, entries, 0, wanted, "z") == zipfile_members(
        data, wanted
    )
    assert _parse_central_directory(directory, entries, 0, None, "z") == zipfile_members(data)
    if names and not any("PK\x01\x02" in name for name in names):
        assert _tiled_entries(directory) is not None  # found by their signatures
    with mock.patch.object(remotezip, "_NUMPY_PARSE_MAX_BYTES", 0):  # walked, as a big one is
        assert _parse_central_directory(directory, entries, 0, wanted, "z") == zipfile_members(
            data, wanted
        )


def test_a_signature_inside_a_name_sends_the_parse_to_the_walk() -> None:
    rng = random.Random(7)
    names = sorted([mask_name(rng) for _ in range(50)] + ["PK\x01\x02.png"])
    assert 0 < names.index("PK\x01\x02.png") < 50  # an entry follows it: the chain breaks
    data = build_zip([(name, b"", zipfile.ZIP_STORED) for name in names])
    directory, entries = directory_of(data)
    assert _tiled_entries(directory) is None
    wanted = {"PK\x01\x02.png", names[0], names[-1]}
    assert _parse_central_directory(directory, entries, 0, wanted, "z") == zipfile_members(
        data, wanted
    )


def test_a_name_stored_in_cp437_is_found_by_its_cp437_bytes() -> None:
    """Without the UTF-8 flag a name's bytes are cp437: b'\\xc3\\xa9' is '├⌐', not 'é'."""
    data = bytearray(build_zip([("é.png", b"mask", zipfile.ZIP_STORED)]))
    for signature, flag_at in ((zipfile.stringFileHeader, 6), (zipfile.stringCentralDir, 8)):
        at = data.find(signature) + flag_at
        data[at : at + 2] = struct.pack("<H", struct.unpack_from("<H", data, at)[0] & ~0x800)
    directory, entries = directory_of(bytes(data))
    assert list(zipfile_members(bytes(data))) == ["├⌐.png"]  # zipfile reads it so too
    found = _parse_central_directory(directory, entries, 0, {"├⌐.png", "é.png"}, "z")
    assert found == zipfile_members(bytes(data))


def test_a_broken_directory_is_refused_where_it_breaks() -> None:
    names = [mask_name(random.Random(i)) for i in range(3)]
    directory, entries = directory_of(build_zip([(n, b"", zipfile.ZIP_STORED) for n in names]))
    second = 46 + len(names[0])
    broken = {
        directory[:-5]: "z: central directory entry runs past its end",
        directory + b"PK\x01\x02": "z: truncated central directory",
        directory[:second] + b"XXXX" + directory[second + 4 :]: (
            f"z: bad central directory entry at {second}"
        ),
    }
    for data, message in broken.items():
        with pytest.raises(CorruptZip) as raised:
            _parse_central_directory(data, entries, 0, None, "z")
        assert str(raised.value) == message


def test_an_entry_count_other_than_the_end_records_is_refused() -> None:
    directory, entries = directory_of(build_zip([("a.png", b"", zipfile.ZIP_STORED)]))
    with pytest.raises(CorruptZip, match="holds 1 entries, the end record says 2"):
        _parse_central_directory(directory, entries + 1, 0, None, "z")
    # Writers that store the count modulo 65536 are read as they meant.
    assert list(_parse_central_directory(directory, entries + 65536, 0, None, "z")) == ["a.png"]


def test_a_directory_of_signature_bytes_costs_no_index_per_byte() -> None:
    """32 MB of 'P' (the signature's first byte): without a bound on their count, numpy would
    index every one of them (256 MB of positions) before finding that none starts an entry."""
    flood = b"P" * (32 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptZip, match="bad central directory entry at 0"):
            _parse_central_directory(flood, 1, 0, {"a.png"}, "z")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(flood)
