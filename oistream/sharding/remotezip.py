"""Read members out of a remote zip with range requests, never downloading the whole zip.

Open Images keeps its masks in 16 zips per split, ~168k members each (Zip64). A subset needs a
few members from each, so we read the end records and the central directory by range requests
(``read_central_directory``; over HTTP the tail by a suffix range, which also tells the zip's
size and ETag: ``read_zip_directory``), then fetch only the members asked for: each one's local
header plus data, with members that sit close together fetched in one request (``coalesce``),
inflated and CRC-checked here (``fetch_members``).

Every zip is untrusted: offsets and sizes from its end records and directory are checked
against the object's size before any request is made for them, a member's declared and actual
inflated size are capped (``DEFAULT_MAX_MEMBER_BYTES``), and member reads pin the ETag the
directory was read under (``If-Match``), so a zip replaced mid-run is a transient failure,
never "corrupt".

Byte budget of ``fetch_members`` (``coalesce`` documents the proof): for each member it asks
for ``30 + len(name) + LOCAL_EXTRA_MARGIN`` bytes besides the member's own compressed bytes, and
the gaps it bridges to save requests add at most ``max_waste`` of the payload. With the
defaults and Open Images' mask names (~45 bytes) that is 123 bytes per member + 5 %: requested
<= 1.10 x payload for members of 2.5 kB and more.
"""

from __future__ import annotations

import asyncio
import bz2
import contextlib
import hashlib
import json
import os
import struct
import tempfile
import zipfile
import zlib
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from oistream.sharding.fetch import Fetcher, FetchError, MissingObject, is_http
from oistream.sharding.options import DEFAULT_MAX_MEMBER_BYTES

# Local header fields we read: signature, version, flags, method, time, date, crc, sizes,
# name length, extra length (zipfile.structFileHeader).
_LOCAL_HEADER = struct.Struct(zipfile.structFileHeader)
_CENTRAL_HEADER = struct.Struct(zipfile.structCentralDir)
_END_RECORD = struct.Struct(zipfile.structEndArchive)
_ZIP64_LOCATOR = struct.Struct(zipfile.structEndArchive64Locator)
_ZIP64_END_RECORD = struct.Struct(zipfile.structEndArchive64)
LOCAL_HEADER_SIZE = _LOCAL_HEADER.size  # 30

# Bytes asked for after each member's name to cover its local extra field, whose length is only
# known once the header is read. 48 covers Info-ZIP's "UT" + "ux" fields (28) plus a Zip64
# extra (20); Python's zipfile writes none. A longer extra costs one more small request. It
# must stay below 69 (the smallest central directory entry plus end record that follow the last
# member), so a span never reaches past the end of the zip.
LOCAL_EXTRA_MARGIN = 48

# The end record (22 bytes) may be followed by a comment of up to 65535 bytes and preceded by
# the Zip64 end record (56) and locator (20): one tail request of this size finds them all.
TAIL_BYTES = 64 * 1024 + 1024

DEFAULT_MAX_GAP = 16 * 1024  # never bridge a gap wider than this to save a request
DEFAULT_MAX_WASTE = 0.05  # bridged gap bytes, as a fraction of the payload of the merged span
DEFAULT_MAX_SPAN = 8 * 1024 * 1024  # one request's size cap: bounds memory per request
CENTRAL_DIRECTORY_CHUNK = 8 * 1024 * 1024  # a 17 MB directory comes in 3 concurrent parts
# A train zip's directory is ~17 MB (168k entries); a directory claiming more is refused.
MAX_DIRECTORY_BYTES = 256 * 1024 * 1024

_UTF8_FLAG = 0x800
_ENCRYPTED_FLAG = 0x1
_ZIP64_EXTRA_ID = 0x0001
_SUPPORTED_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2}


@dataclass(frozen=True, slots=True)  # slots: a train zip's directory has ~168k of these
class ZipMember:
    name: str
    header_offset: int
    compress_size: int
    file_size: int
    compress_type: int
    crc: int

    def __reduce__(self) -> tuple[type[ZipMember], tuple[str, int, int, int, int, int]]:
        # Every shard task carries its members to a worker. A slots dataclass pickles through
        # dataclasses' generic state functions: 23 us a member dumped and loaded, 10 us this way.
        return ZipMember, (
            self.name,
            self.header_offset,
            self.compress_size,
            self.file_size,
            self.compress_type,
            self.crc,
        )


class CorruptMember(Exception):
    """A member whose bytes cannot be trusted: bad local header, bad inflate, CRC mismatch.

    ``decided`` is True when the directory alone decides it (the member lies outside the zip,
    declares too many bytes): a second read could not change the answer.
    """

    def __init__(self, message: str, *, decided: bool = False) -> None:
        super().__init__(message)
        self.decided = decided


class CorruptZip(Exception):
    """A zip whose end records or central directory cannot be read.

    Not a ``FetchError``: the bytes arrived, they are just not a zip. The caller fails the
    images whose masks it holds (after a second read confirms it), never the run.
    """

    def __init__(self, message: str, *, url: str = "") -> None:
        super().__init__(message)
        self.url = url


def pinned_etag(tag: str | None) -> str | None:
    """The ETag to send as ``If-Match``, or None where the tag is not an HTTP ETag."""
    if tag is None or tag.startswith("mtime:"):
        return None
    return tag


async def read_central_directory(
    fetcher: Fetcher,
    fs: Any,
    path: str,
    size: int | None = None,
    *,
    wanted: Collection[str] | None = None,
    cache: CentralDirectoryCache | None = None,
    etag: str | None = None,
    budget: ByteBudget | None = None,
    tail: bytes | None = None,
) -> dict[str, ZipMember]:
    """The members of the zip at ``path``, by name, read with two or three range requests.

    One request for the tail (end record, a possible comment, the Zip64 locator and, nearly
    always, the Zip64 end record), another for the Zip64 end record only if it was not in the
    tail, then the central directory itself (from the tail when it fits there, else in
    ``CENTRAL_DIRECTORY_CHUNK`` parts fetched concurrently). ``size`` saves a metadata request.

    ``wanted`` keeps only those names (a train zip's full directory is ~30 MB of Python
    objects). With a ``cache`` the object's size and ETag are looked up (one HEAD) and a cached
    directory is used when both match; otherwise the directory is read and stored. ``etag``
    (with ``size``, from the caller's own HEAD) saves that HEAD; every read pins it. With a
    ``budget``, the directory's bytes are fetched only while the budget holds them. ``tail``,
    the zip's last ``min(TAIL_BYTES, size)`` bytes already read (``read_zip_directory``), saves
    the tail request.
    """
    if size is None or (cache is not None and etag is None):
        size, etag = await _size_and_tag(fetcher, fs, path)
    if cache is not None and etag is not None:
        # The cache's disk reads, writes and digests run on a thread: on the 1% shard
        # benchmark its 16 directories' writes held the event loop 30-96 ms, images waiting.
        cached = await asyncio.to_thread(cache.get, _cache_url(fs, path), size, etag)
        if cached is not None:
            with contextlib.suppress(CorruptZip):  # a damaged entry is a miss: read afresh
                return _parse_central_directory(*cached, wanted, path)
    pin = pinned_etag(etag)

    if size < _END_RECORD.size:
        raise CorruptZip(f"{path}: not a zip ({size} bytes)", url=path)
    tail_start = max(0, size - TAIL_BYTES)
    if tail is None or len(tail) != size - tail_start:
        tail = await fetcher.cat(fs, path, tail_start, size, if_match=pin)
    cd_offset, cd_size, entries, concat, records_start = await _read_end_records(
        fetcher, fs, path, tail, tail_start, size, pin
    )
    cd_start = cd_offset + concat
    cd_end = cd_start + cd_size
    # The directory lies between the start of the zip proper and its end records; a negative
    # ``concat`` means the records claim a directory beyond where they themselves sit.
    if concat < 0 or cd_start < 0 or cd_end > records_start:
        raise CorruptZip(
            f"{path}: central directory [{cd_offset}, +{cd_size}) lies outside the zip "
            f"({size} bytes)",
            url=path,
        )
    if cd_size > MAX_DIRECTORY_BYTES or entries * _CENTRAL_HEADER.size > cd_size:
        raise CorruptZip(
            f"{path}: end record claims {entries} entries in {cd_size} bytes", url=path
        )
    if cd_start >= tail_start:
        directory_bytes = tail[cd_start - tail_start : cd_end - tail_start]
    else:
        # The tail may already hold the directory's last part: fetch only what comes before.
        fetched = min(tail_start, cd_end) - cd_start
        async with budget.hold(fetched) if budget is not None else contextlib.nullcontext():
            head = await _fetch_chunked(fetcher, fs, path, cd_start, fetched, pin)
        directory_bytes = head + tail[: max(0, cd_end - tail_start)]
    del tail

    # Parsed (every entry walked and checked) before it is cached: a bad zip is never stored.
    members = _parse_central_directory(directory_bytes, entries, concat, wanted, path)
    if cache is not None and etag is not None:
        await asyncio.to_thread(
            cache.put, _cache_url(fs, path), size, etag, directory_bytes, entries, concat
        )
    return members


async def _size_and_tag(fetcher: Fetcher, fs: Any, path: str) -> tuple[int, str | None]:
    """The object's size and version tag (``_version_tag``) from one HEAD."""
    info = await fetcher.info(fs, path)
    if info.get("size") is None:
        raise FetchError(f"HEAD {path}: the server reports no size", url=path)
    return int(info["size"]), _version_tag(info)


async def read_zip_directory(
    fetcher: Fetcher,
    fs: Any,
    path: str,
    *,
    wanted: Collection[str] | None = None,
    cache: CentralDirectoryCache | None = None,
    budget: ByteBudget | None = None,
) -> tuple[dict[str, ZipMember], int, str | None]:
    """``read_central_directory`` of a zip whose size is not known yet, with the ``(size,
    version tag)`` it was read under (member reads check and pin them).

    Over HTTP, unless ``cache`` holds a directory of this URL (then one HEAD validates it), the
    tail is read first by a suffix range, whose answer also gives the size and ETag: one
    round trip where a HEAD and then the tail took two, before the first mask can be asked
    for. A server that refuses suffix ranges gets the HEAD.
    """
    if is_http(fs) and (cache is None or not cache.knows(_cache_url(fs, path))):
        tail = await fetcher.tail(fs, path, TAIL_BYTES)
        if tail is not None:
            etag = _version_tag({"ETag": tail.etag})
            members = await read_central_directory(
                fetcher,
                fs,
                path,
                tail.size,
                wanted=wanted,
                cache=cache if etag is not None else None,  # nothing to key an entry by
                etag=etag,
                budget=budget,
                tail=tail.data,
            )
            return members, tail.size, etag
    size, etag = await _size_and_tag(fetcher, fs, path)
    members = await read_central_directory(
        fetcher, fs, path, size, wanted=wanted, cache=cache, etag=etag, budget=budget
    )
    return members, size, etag


class ByteBudget:
    """At most ``limit`` bytes held at once by ``hold(nbytes)`` blocks (asyncio); a request
    larger than the whole budget waits until it is alone, then goes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        nbytes = min(nbytes, self.limit)
        async with self._changed:
            await self._changed.wait_for(lambda: self._held + nbytes <= self.limit)
            self._held += nbytes
        try:
            yield
        finally:
            async with self._changed:
                self._held -= nbytes
                self._changed.notify_all()


def check_member_bounds(
    member: ZipMember, object_size: int | None, max_member_bytes: int, path: str
) -> CorruptMember | None:
    """Why the directory alone rules ``member`` out (outside the zip, too big), or None."""
    where = f"{path}:{member.name}"
    if member.file_size > max_member_bytes or member.compress_size > max_member_bytes:
        size = max(member.file_size, member.compress_size)
        return CorruptMember(
            f"{where}: declares {size} bytes, over the cap of {max_member_bytes}", decided=True
        )
    # Deflate adds at most 5 bytes per 16 kB stored block, bzip2 about 1 % + 600 bytes: more
    # compressed bytes than that over the declared size is a lie (a bomb declaring a small
    # size), decided from the directory before a byte of it is fetched.
    most = member.file_size + member.file_size // 100 + 1024
    if member.compress_size > (member.file_size if member.compress_type == 0 else most):
        return CorruptMember(
            f"{where}: {member.compress_size} compressed bytes cannot inflate to the "
            f"{member.file_size} declared",
            decided=True,
        )
    data_end = member.header_offset + LOCAL_HEADER_SIZE + len(member.name.encode("utf-8"))
    data_end += member.compress_size
    if member.header_offset < 0 or (object_size is not None and data_end > object_size):
        return CorruptMember(
            f"{where}: member at offset {member.header_offset} (+{member.compress_size} bytes) "
            f"lies outside the zip ({object_size} bytes)",
            decided=True,
        )
    return None


def pick_members(
    directory: Mapping[str, ZipMember], names: Iterable[str]
) -> tuple[list[ZipMember], dict[str, MissingObject]]:
    """Split ``names`` into the members the zip has and a ``MissingObject`` for each it lacks."""
    found: list[ZipMember] = []
    missing: dict[str, MissingObject] = {}
    for name in dict.fromkeys(names):
        member = directory.get(name)
        if member is None:
            missing[name] = MissingObject(f"no member {name!r} in the zip", url=name)
        else:
            found.append(member)
    return found, missing


def member_span(member: ZipMember) -> tuple[int, int]:
    """Bytes ``[start, end)`` to ask for to get ``member``'s local header and data, as planned."""
    start = member.header_offset
    name_length = len(member.name.encode("utf-8"))
    overhead = LOCAL_HEADER_SIZE + name_length + LOCAL_EXTRA_MARGIN
    return start, start + overhead + member.compress_size


def coalesce(
    members: Sequence[ZipMember],
    max_gap: int = DEFAULT_MAX_GAP,
    *,
    max_waste: float = DEFAULT_MAX_WASTE,
    max_span: int = DEFAULT_MAX_SPAN,
) -> list[tuple[int, int, list[ZipMember]]]:
    """Group members into ``(start, end, members)`` request spans, sorted by offset.

    Neighbouring spans merge when the gap between them is at most ``max_gap``, the gap bytes
    bridged in the merged span stay within ``max_waste`` x its members' compressed bytes, and
    the merged span stays within ``max_span`` bytes (a single member may exceed it). Overlaps
    (the extra margin reaching into the next header) always merge when the size cap allows.
    So the bytes requested are at most ``sum(compress_size) * (1 + max_waste)`` plus
    ``30 + len(name) + LOCAL_EXTRA_MARGIN`` per member.
    """
    spans: list[tuple[int, int, list[ZipMember]]] = []
    unique = {member.name: member for member in members}.values()
    start = end = 0
    payload = waste = 0
    group: list[ZipMember] = []
    for member in sorted(unique, key=lambda m: (m.header_offset, m.name)):
        member_start, member_end = member_span(member)
        if group:
            gap = max(0, member_start - end)
            merged_end = max(end, member_end)
            if (
                gap <= max_gap
                and waste + gap <= max_waste * (payload + member.compress_size)
                and merged_end - start <= max_span
            ):
                group.append(member)
                end = merged_end
                payload += member.compress_size
                waste += gap
                continue
            spans.append((start, end, group))
        start, end, group = member_start, member_end, [member]
        payload, waste = member.compress_size, 0
    if group:
        spans.append((start, end, group))
    return spans


async def fetch_members(
    fetcher: Fetcher,
    fs: Any,
    path: str,
    members: Sequence[ZipMember],
    max_gap: int = DEFAULT_MAX_GAP,
    *,
    max_waste: float = DEFAULT_MAX_WASTE,
    max_span: int = DEFAULT_MAX_SPAN,
    object_size: int | None = None,
    etag: str | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> dict[str, bytes | Exception]:
    """Each member's uncompressed bytes, or the exception that stands for it.

    Spans (see ``coalesce``) are fetched concurrently through ``fetcher``. A member-level
    problem becomes a ``CorruptMember`` value; a span whose request fails for good gives its
    ``FetchError``/``MissingObject`` to each of its members. Nothing here kills the others.
    The caller bounds memory by how many members it passes at once.

    Members the directory places outside ``object_size`` or that declare more than
    ``max_member_bytes`` are ``CorruptMember`` without a request; spans never reach past
    ``object_size``. ``etag`` is sent as ``If-Match`` on every read. A member found corrupt
    is read once more on its own: only a second corrupt read is final.
    """
    results: dict[str, bytes | Exception] = {}
    fetchable = []
    for member in members:
        problem = check_member_bounds(member, object_size, max_member_bytes, path)
        if problem is None:
            fetchable.append(member)
        else:
            results[member.name] = problem
    spans = coalesce(fetchable, max_gap, max_waste=max_waste, max_span=max_span)
    pin = pinned_etag(etag)

    async def fetch_span(start: int, end: int, group: list[ZipMember]) -> None:
        if object_size is not None:
            end = min(end, object_size)
        try:
            data = await fetcher.cat(fs, path, start, end, if_match=pin)
        except FetchError as error:
            for member in group:
                results[member.name] = error
            return
        for member in group:
            try:
                results[member.name] = await _extract(
                    fetcher, fs, path, member, data, start, pin, max_member_bytes
                )
            except (CorruptMember, FetchError) as problem:
                results[member.name] = problem

    await asyncio.gather(*(fetch_span(*span) for span in spans))
    # Corrupt bytes may be a bad transfer (a proxy's mangling) rather than a bad zip: confirm.
    suspects = [m for m in fetchable if isinstance(results.get(m.name), CorruptMember)]
    await asyncio.gather(*(fetch_span(*member_span(m), [m]) for m in suspects))
    return results


async def _extract(
    fetcher: Fetcher,
    fs: Any,
    path: str,
    member: ZipMember,
    span: bytes,
    span_start: int,
    pin: str | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> bytes:
    where = f"{path}:{member.name}"
    offset = member.header_offset - span_start
    header = span[offset : offset + LOCAL_HEADER_SIZE]
    if len(header) < LOCAL_HEADER_SIZE:
        raise CorruptMember(f"{where}: local header beyond the bytes fetched")
    fields = _LOCAL_HEADER.unpack(header)
    signature, flags = fields[0], fields[3]
    name_length, extra_length = fields[10], fields[11]
    if signature != zipfile.stringFileHeader:
        raise CorruptMember(f"{where}: bad local header signature at {member.header_offset}")
    if flags & _ENCRYPTED_FLAG:
        raise CorruptMember(f"{where}: encrypted members are not supported")
    name_start = offset + LOCAL_HEADER_SIZE
    local_name = span[name_start : name_start + name_length]
    encoding = "utf-8" if flags & _UTF8_FLAG else "cp437"
    if local_name.decode(encoding, errors="replace") != member.name:
        raise CorruptMember(f"{where}: local header names {local_name!r}")
    data_start = name_start + name_length + extra_length
    data_end = data_start + member.compress_size
    raw = span[data_start:data_end]
    if len(raw) < member.compress_size:
        # The local extra field was longer than planned for: fetch the rest of the data.
        have = max(0, len(span) - data_start)
        rest_start = span_start + data_start + have
        rest = await fetcher.cat(fs, path, rest_start, span_start + data_end, if_match=pin)
        raw = span[data_start : data_start + have] + rest
        if len(raw) != member.compress_size:
            raise CorruptMember(f"{where}: data runs past the end of the zip")
    if member.file_size > 1 << 20:  # keep big inflates off the event loop
        return await asyncio.to_thread(_decompress, raw, member, where, max_member_bytes)
    return _decompress(raw, member, where, max_member_bytes)


def _decompress(
    raw: bytes, member: ZipMember, where: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> bytes:
    """Inflate in one bounded step: the output never exceeds ``min(declared, cap) + 1`` bytes,
    whatever the input claims, so a bomb costs its compressed size and the cap, no more."""
    method = member.compress_type
    limit = min(member.file_size, max_member_bytes) + 1  # +1: detect overlong
    if method not in _SUPPORTED_METHODS:
        raise CorruptMember(f"{where}: unsupported compression method {method}")
    if method == zipfile.ZIP_STORED:
        data = raw
        complete = True
    else:
        try:
            if method == zipfile.ZIP_DEFLATED:
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                data = inflater.decompress(raw, limit)
                complete = inflater.eof
            else:
                bunzipper = bz2.BZ2Decompressor()
                data = bunzipper.decompress(raw, limit)
                complete = bunzipper.eof
        except (zlib.error, OSError, EOFError) as error:
            raise CorruptMember(f"{where}: cannot decompress: {error}") from error
    if not complete or len(data) != member.file_size:
        raise CorruptMember(
            f"{where}: decompressed to {len(data)} bytes, the directory says {member.file_size}"
        )
    if zlib.crc32(data) != member.crc:
        raise CorruptMember(f"{where}: CRC mismatch")
    return data


async def _read_end_records(
    fetcher: Fetcher,
    fs: Any,
    path: str,
    tail: bytes,
    tail_start: int,
    size: int,
    pin: str | None,
) -> tuple[int, int, int, int, int]:
    """``(cd_offset, cd_size, entries, concat, records_start)`` from the end record(s) in ``tail``.

    ``concat`` is the number of bytes before the zip proper (a zip appended to another file):
    offsets in the records are relative to the zip, zipfile shifts them, and so do we.
    ``records_start`` is where the end records begin: the directory must end before it.
    """
    end = _find_end_record(tail)
    if end < 0:
        raise CorruptZip(f"{path}: not a zip (no end of central directory record)", url=path)
    fields = _END_RECORD.unpack_from(tail, end)
    entries, cd_size, cd_offset = fields[4], fields[5], fields[6]
    end_location = tail_start + end
    locator = end - _ZIP64_LOCATOR.size
    if locator < 0 or tail[locator : locator + 4] != zipfile.stringEndArchive64Locator:
        return cd_offset, cd_size, entries, end_location - cd_size - cd_offset, end_location
    _, disk, record_offset, disks = _ZIP64_LOCATOR.unpack_from(tail, locator)
    if disk != 0 or disks > 1:
        raise CorruptZip(f"{path}: zips spanning several disks are not supported", url=path)
    # Like zipfile, expect the Zip64 end record right before the locator (no extensible data);
    # the locator's own offset is the fallback, fetched when the tail does not hold it.
    record = locator - _ZIP64_END_RECORD.size
    record_location = tail_start + record
    if record >= 0 and tail[record : record + 4] == zipfile.stringEndArchive64:
        record_bytes = tail[record : record + _ZIP64_END_RECORD.size]
    else:
        record_location = record_offset
        if record_offset < 0 or record_offset + _ZIP64_END_RECORD.size > tail_start + locator:
            raise CorruptZip(
                f"{path}: Zip64 locator points to {record_offset}, outside the zip ({size} bytes)",
                url=path,
            )
        record_bytes = await fetcher.cat(
            fs, path, record_offset, record_offset + _ZIP64_END_RECORD.size, if_match=pin
        )
        if record_bytes[:4] != zipfile.stringEndArchive64:
            raise CorruptZip(f"{path}: Zip64 locator points to no Zip64 end record", url=path)
    fields64 = _ZIP64_END_RECORD.unpack(record_bytes)
    entries, cd_size, cd_offset = fields64[7], fields64[8], fields64[9]
    return cd_offset, cd_size, entries, record_location - cd_size - cd_offset, record_location


def _find_end_record(tail: bytes) -> int:
    """Offset of the end of central directory record in ``tail``, or -1.

    Prefer a record whose comment length reaches exactly to the end of the file; fall back to
    the last signature found (zipfile does the same), for zips with trailing junk.
    """
    position = len(tail)
    last_seen = -1
    while True:
        position = tail.rfind(zipfile.stringEndArchive, 0, position)
        if position < 0:
            return last_seen
        if position + _END_RECORD.size <= len(tail):
            comment_length = _END_RECORD.unpack_from(tail, position)[7]
            if position + _END_RECORD.size + comment_length == len(tail):
                return position
            if last_seen < 0:
                last_seen = position


async def _fetch_chunked(
    fetcher: Fetcher, fs: Any, path: str, start: int, size: int, pin: str | None = None
) -> bytes:
    bounds = range(start, start + size, CENTRAL_DIRECTORY_CHUNK)
    parts = await asyncio.gather(
        *(
            fetcher.cat(fs, path, b, min(b + CENTRAL_DIRECTORY_CHUNK, start + size), if_match=pin)
            for b in bounds
        )
    )
    return b"".join(parts)


# Signature and the three lengths of a central directory entry: all that walking past an entry
# needs (name, extra and comment lengths sit at offsets 28, 30 and 32).
_CENTRAL_LENGTHS = struct.Struct("<4s24xHHH")
# Directories up to this size are parsed with numpy (a train mask zip's holds 14 MB); its
# scratch arrays stay within about twice this. Larger ones, which only a hostile or unusual zip
# has (MAX_DIRECTORY_BYTES allows 256 MB), are walked entry by entry, holding nothing per entry.
_NUMPY_PARSE_MAX_BYTES = 64 * 2**20
# Entries whose names are compared at a time (their first bytes' scratch: 64 B an entry).
_NAME_BATCH = 65536
# Wanted names are first matched by their first bytes, as one little-endian integer hashed to
# a slot of a table (1 MiB of bools: a few hundred thousand wanted names still leave most empty).
_NAME_KEY_BYTES = 8
_NAME_TABLE_BITS = 20


def _parse_central_directory(
    data: bytes, entries: int, concat: int, wanted: Collection[str] | None, path: str
) -> dict[str, ZipMember]:
    """The members named in ``wanted`` (all when None), every entry found and checked.

    Every entry's signature and bounds are checked and the entries counted against the end
    record whatever ``wanted`` holds; only the wanted ones are decoded in full. Names are
    matched as their stored bytes: a wanted name is looked for as UTF-8, and for entries
    without the UTF-8 flag as cp437 too.

    The entries are found with numpy when their signatures alone tile the directory
    (``_tiled_entries``), else walked one after another (``_walk_entries``), which raises
    ``CorruptZip`` at the first bad one. A train mask zip's directory (168k entries, 0.8%
    wanted; ``benchmarks/central_directory.py``): 20 ms, against 60-75 ms walked.
    """
    stored = None if wanted is None else _stored_names(wanted)
    tiled = _tiled_entries(data) if len(data) <= _NUMPY_PARSE_MAX_BYTES else None
    if tiled is None:
        count, spans = _walk_entries(data, stored, path)
    else:
        starts, name_ends = tiled
        count = len(starts)
        if stored is not None:
            chosen = _entries_named(data, starts, name_ends, stored)
            starts, name_ends = starts[chosen], name_ends[chosen]
        spans = list(zip(starts.tolist(), name_ends.tolist(), strict=True))
    # Some writers store the entry count modulo 65536 instead of writing Zip64 records.
    if count != entries and (entries == 0xFFFF or count % 65536 != entries % 65536):
        raise CorruptZip(
            f"{path}: central directory holds {count} entries, the end record says {entries}",
            url=path,
        )
    members: dict[str, ZipMember] = {}
    view = memoryview(data)
    for entry_start, extra_start in spans:
        fields = _CENTRAL_HEADER.unpack_from(data, entry_start)
        flags, method, crc = fields[5], fields[6], fields[9]
        compress_size, file_size = fields[10], fields[11]
        extra_length, header_offset = fields[13], fields[18]
        raw_name = data[entry_start + _CENTRAL_HEADER.size : extra_start]
        name = raw_name.decode("utf-8" if flags & _UTF8_FLAG else "cp437", errors="replace")
        if wanted is not None and name not in wanted:
            continue  # the bytes of a wanted name, read in the other encoding
        if 0xFFFFFFFF in (compress_size, file_size, header_offset):
            file_size, compress_size, header_offset = _zip64_extra(
                view[extra_start : extra_start + extra_length],
                file_size,
                compress_size,
                header_offset,
                path,
            )
        members[name] = ZipMember(
            name, header_offset + concat, compress_size, file_size, method, crc
        )
    return members


def _stored_names(wanted: Collection[str]) -> set[bytes]:
    """The bytes a wanted name may be stored as: UTF-8, and cp437 where it has that form."""
    stored = {name.encode("utf-8") for name in wanted}
    for name in wanted:
        if not name.isascii():  # an ASCII name is the same bytes in both
            with contextlib.suppress(UnicodeEncodeError):
                stored.add(name.encode("cp437"))
    return stored


def _walk_entries(
    data: bytes, names: set[bytes] | None, path: str
) -> tuple[int, list[tuple[int, int]]]:
    """Walk the directory entry by entry: how many entries it holds, and (entry start, name
    end) of those whose stored name is in ``names`` (all when None); ``CorruptZip`` at the
    first entry that is cut short, misplaced or runs past the end."""
    spans = []
    position = count = 0
    size = len(data)
    header_size = _CENTRAL_HEADER.size
    lengths = _CENTRAL_LENGTHS.unpack_from
    signature = zipfile.stringCentralDir
    while position < size:
        if position + header_size > size:
            raise CorruptZip(f"{path}: truncated central directory", url=path)
        magic, name_length, extra_length, comment_length = lengths(data, position)
        if magic != signature:
            raise CorruptZip(f"{path}: bad central directory entry at {position}", url=path)
        name_start = position + header_size
        name_end = name_start + name_length
        if names is None or data[name_start:name_end] in names:
            spans.append((position, name_end))
        position = name_end + extra_length + comment_length
        count += 1
    if position != size:
        raise CorruptZip(f"{path}: central directory entry runs past its end", url=path)
    return count, spans


def _tiled_entries(data: bytes) -> tuple[Any, Any] | None:
    """(entry starts, name ends) as arrays if every central-directory signature in ``data``
    starts an entry and each entry ends where the next signature (or ``data``) does; else None.

    When that holds the signatures are the entries: the first is at 0, and each one's lengths
    lead exactly to the next. A signature inside a name or an extra field breaks the chain, and
    the caller walks instead; so it does when the signature's first byte is so common that its
    places would outnumber the entries that fit many times over.
    """
    import numpy as np  # here: shard workers never read a directory and do without numpy

    header_size = _CENTRAL_HEADER.size
    size = len(data)
    if size < header_size:
        return None
    octets = np.frombuffer(data, np.uint8)
    # Only where a whole header fits: a signature in the last 45 bytes cannot start an entry.
    first_bytes = octets[: size - header_size + 1] == zipfile.stringCentralDir[0]
    if np.count_nonzero(first_bytes) > 4 * (size // header_size):
        return None
    starts = np.flatnonzero(first_bytes)
    del first_bytes
    for offset in (1, 2, 3):
        starts = starts[octets[starts + offset] == zipfile.stringCentralDir[offset]]
    if not len(starts) or starts[0] != 0:
        return None

    def field(offset: int) -> Any:  # a little-endian 16-bit field of every entry
        low, high = octets[starts + offset], octets[starts + offset + 1]
        return low.astype(np.int64) | high.astype(np.int64) << 8

    name_ends = starts + header_size + field(28)
    ends = name_ends + field(30) + field(32)
    if ends[-1] != size or not np.array_equal(ends[:-1], starts[1:]):
        return None
    return starts, name_ends


def _entries_named(data: bytes, starts: Any, name_ends: Any, names: set[bytes]) -> Any:
    """The indices of the entries whose stored name is one of ``names``, in directory order.

    Each name's first ``_NAME_KEY_BYTES`` bytes, hashed to ``_NAME_TABLE_BITS`` bits for every
    entry at once and looked up in a table of the wanted names' hashes, rule out nearly all
    entries (mask names start with their ImageID); only the rest, and the names shorter than
    that, are compared whole. On a train zip's 168k entries: 6 ms, where ``np.isin`` on the
    keys took 17.
    """
    import numpy as np

    octets = np.frombuffer(data, np.uint8)
    wanted_keys = np.array(
        [int.from_bytes(n[:_NAME_KEY_BYTES], "little") for n in names], np.uint64
    )
    table = np.zeros(1 << _NAME_TABLE_BITS, np.bool_)
    table[_table_slots(wanted_keys)] = True
    found = []
    for first in range(0, len(starts), _NAME_BATCH):
        name_starts = starts[first : first + _NAME_BATCH] + _CENTRAL_HEADER.size
        lengths = name_ends[first : first + _NAME_BATCH] - name_starts
        # Bytes past a short name (or past the data) make a key of their own; those entries
        # are compared whole anyway.
        spots = np.minimum(name_starts[:, None] + np.arange(_NAME_KEY_BYTES), len(data) - 1)
        keys = np.ascontiguousarray(octets[spots]).view("<u8").ravel()
        maybe = table[_table_slots(keys)] | (lengths < _NAME_KEY_BYTES)
        found.append(np.flatnonzero(maybe) + first)
    candidates = np.concatenate(found) if found else np.zeros(0, np.int64)
    spans = zip(
        candidates.tolist(),
        (starts[candidates] + _CENTRAL_HEADER.size).tolist(),
        name_ends[candidates].tolist(),
        strict=True,
    )
    return np.array([i for i, begin, end in spans if data[begin:end] in names], np.int64)


def _table_slots(keys: Any) -> Any:
    """Fibonacci hashing: the top bits of key x 2^64/phi, which spread keys that differ in a
    few bytes (hex digits) over the whole table."""
    import numpy as np

    return (keys * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - _NAME_TABLE_BITS)


def _zip64_extra(
    extra: memoryview, file_size: int, compress_size: int, header_offset: int, path: str
) -> tuple[int, int, int]:
    """Replace the 0xFFFFFFFF fields by their 64-bit values from the Zip64 extra field."""
    position = 0
    while position + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, position)
        body = bytes(extra[position + 4 : position + 4 + length])
        position += 4 + length
        if kind != _ZIP64_EXTRA_ID:
            continue
        try:
            if file_size == 0xFFFFFFFF:
                (file_size,) = struct.unpack_from("<Q", body)
                body = body[8:]
            if compress_size == 0xFFFFFFFF:
                (compress_size,) = struct.unpack_from("<Q", body)
                body = body[8:]
            if header_offset == 0xFFFFFFFF:
                (header_offset,) = struct.unpack_from("<Q", body)
        except struct.error as error:
            raise CorruptZip(f"{path}: corrupt Zip64 extra field", url=path) from error
        return file_size, compress_size, header_offset
    raise CorruptZip(f"{path}: 0xFFFFFFFF field without a Zip64 extra field", url=path)


def _version_tag(info: Mapping[str, Any]) -> str | None:
    """What changes when the object changes: its ETag, or for local files the mtime."""
    for key in ("ETag", "etag", "ETAG"):
        if info.get(key):
            return str(info[key])
    if info.get("mtime") is not None:
        return f"mtime:{info['mtime']}"
    return None


def _cache_url(fs: Any, path: str) -> str:
    url = fs.unstrip_protocol(path)
    endpoint = getattr(fs, "endpoint_url", None)
    return f"{url} @ {endpoint}" if endpoint else url


class CentralDirectoryCache:
    """Central directories on disk, one file per (url, size, ETag): the directory's own bytes.

    Reading a train zip's directory costs ~17 MB of range requests; a rerun (or another
    process of the same run) reads it from here instead. The file holds one JSON header line
    (format, url, size, ETag, entry count, offset shift, length and sha256 of the bytes) and then
    the directory's bytes as the zip holds them, so storing costs a write, not an encoding of
    every entry, and a read parses only the entries asked for (``read_central_directory``).
    Files are written to a temporary name and renamed into place, so concurrent processes never
    see half a file; a file that cannot be read, does not match its key or its digest is treated
    as absent.
    """

    FORMAT = "oistream-central-directory-v2"

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = os.fspath(directory)

    def _file(self, url: str, size: int, etag: str) -> str:
        digest = hashlib.sha256(f"{url}\0{size}\0{etag}".encode()).hexdigest()
        return os.path.join(self.directory, f"{digest}.cd")

    def _mark(self, url: str) -> str:
        """An empty file saying that a directory of ``url`` has been kept (at some version)."""
        digest = hashlib.sha256(url.encode()).hexdigest()
        return os.path.join(self.directory, f"{digest}.url")

    def knows(self, url: str) -> bool:
        """Whether a directory of ``url`` was kept here, at whatever size and ETag: then a
        HEAD is worth its round trip, since it may save reading the directory."""
        return os.path.exists(self._mark(url))

    def _remember(self, url: str) -> None:
        with contextlib.suppress(OSError):
            open(self._mark(url), "ab").close()

    def get(self, url: str, size: int, etag: str) -> tuple[bytes, int, int] | None:
        """``(directory bytes, entries, offset shift)`` as stored by ``put``, or None."""
        try:
            with open(self._file(url, size, etag), "rb") as file:
                header = json.loads(file.readline(64 * 1024))
                data = file.read(int(header["length"]) + 1)
            if (
                header.get("format") != self.FORMAT
                or header.get("url") != url
                or header.get("size") != size
                or header.get("etag") != etag
                or len(data) != header["length"]
                or hashlib.sha256(data).hexdigest() != header.get("sha256")
            ):
                return None
            self._remember(url)  # entries kept before the marks existed get theirs
            return data, int(header["entries"]), int(header["concat"])
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def put(self, url: str, size: int, etag: str, data: bytes, entries: int, concat: int) -> None:
        os.makedirs(self.directory, exist_ok=True)
        header = {
            "format": self.FORMAT,
            "url": url,
            "size": size,
            "etag": etag,
            "entries": entries,
            "concat": concat,
            "length": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(json.dumps(header, separators=(",", ":")).encode() + b"\n")
                file.write(data)
            os.replace(temporary, self._file(url, size, etag))
            self._remember(url)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
