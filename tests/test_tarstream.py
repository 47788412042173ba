"""The loader's tar reader gives exactly the regular-file members tarfile gives, on tars that
tarfile writes in every format (with the headers our fast path hands back to it), and refuses
damaged ones with TarReadError."""

from __future__ import annotations

import io
import tarfile

import pytest

from oistream.sharding.writer import tar_header
from oistream.tarstream import BLOCK, PrefixedStream, TarReadError, iter_members


class _Trickle(io.RawIOBase):
    """A stream that returns at most ``step`` bytes a read, as a network stream may."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.position, self.step = data, 0, step

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self.step if size is None or size < 0 else min(size, self.step)
        chunk = self.data[self.position : self.position + size]
        self.position += len(chunk)
        return chunk


def _tar(members: list[tuple[str, bytes | None, bytes]], fmt: int) -> bytes:
    """members: (name, data or None, tar type)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "a.jpg"
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    found = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as archive:
        for info in archive:
            if info.isreg():
                found.append((info.name, archive.extractfile(info).read()))
    return found


def _ours(data: bytes, step: int | None = None) -> list[tuple[str, bytes]]:
    stream = io.BytesIO(data) if step is None else _Trickle(data, step)
    return list(iter_members(stream, lambda name: True))


MEMBERS = [
    ("a.jpg", b"\xff\xd8" + bytes(range(256)) * 3, tarfile.REGTYPE),
    ("dir", None, tarfile.DIRTYPE),
    ("a.json", b"{}", tarfile.REGTYPE),
    ("empty.txt", b"", tarfile.REGTYPE),
    ("exact.bin", b"x" * BLOCK, tarfile.REGTYPE),
    ("link", None, tarfile.SYMTYPE),
    ("deep/" * 30 + "long.000.mask.png", b"png" * 100, tarfile.REGTYPE),  # > 100 characters
    ("b.001.mask.png", b"\x89PNG", tarfile.REGTYPE),
    ("caf\u00e9.json", b"[]", tarfile.REGTYPE),  # non-ASCII: a pax header in PAX format
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("step", [None, 100, 7])
def test_members_match_tarfile_in_every_format(fmt: int, step: int | None) -> None:
    data = _tar(MEMBERS, fmt)
    expected = _tarfile_members(data)
    assert len(expected) == 7
    assert _ours(data, step) == expected


def test_our_shard_writers_headers_read_back() -> None:
    members = [("0001.jpg", b"j" * 1000), ("0001.json", b"{}"), ("0002.jpg", b"k" * 513)]
    data = b"".join(
        tar_header(name, len(body)) + body + bytes(-len(body) % BLOCK) for name, body in members
    ) + bytes(2 * BLOCK)
    assert _ours(data) == _tarfile_members(data) == members


def test_unwanted_members_are_read_past_not_returned() -> None:
    data = _tar(MEMBERS, tarfile.PAX_FORMAT)
    asked: list[str] = []

    def wanted(name: str) -> bool:
        asked.append(name)
        return name.endswith(".json")

    got = list(iter_members(io.BytesIO(data), wanted))
    assert got == [("a.json", b"{}"), ("caf\u00e9.json", b"[]")]
    assert "a.jpg" in asked and "dir" not in asked and "link" not in asked


def test_the_stream_may_end_without_the_end_of_archive_blocks() -> None:
    data = _tar(MEMBERS[:3], tarfile.USTAR_FORMAT)
    members_end = data.rstrip(b"\0")
    cut = len(members_end) + (-len(members_end) % BLOCK)
    assert _ours(data[:cut]) == _tarfile_members(data)


def test_damage_is_an_error_not_a_short_shard() -> None:
    data = _tar(MEMBERS[:3], tarfile.USTAR_FORMAT)
    with pytest.raises(TarReadError, match="empty"):
        _ours(b"")
    with pytest.raises(TarReadError, match="ends inside"):
        _ours(data[: BLOCK + 100])  # inside the first member's data
    with pytest.raises(TarReadError, match="ends inside"):
        _ours(data[: BLOCK * 2 + 30])  # inside the first member's padding
    second = BLOCK + 2 * BLOCK  # a.jpg: header + 770 bytes of data padded to 2 blocks
    damaged = bytearray(data)
    damaged[second + 10] ^= 0xFF  # a byte of the second header's name: checksum fails
    with pytest.raises(TarReadError, match="checksum"):
        _ours(bytes(damaged))
    with pytest.raises(TarReadError):
        _ours(b"not a tar at all".ljust(BLOCK, b"!"))


def test_a_lying_size_is_read_in_pieces_and_fails_at_the_end() -> None:
    data = bytearray(_tar([("a.txt", b"abc", tarfile.REGTYPE)], tarfile.USTAR_FORMAT))
    # Claim 8 GiB - 1 of data (octal 77777777777), checksum fixed up.
    data[124:136] = b"77777777777\0"
    data[148:156] = b"        "
    data[148:156] = b"%06o\0 " % sum(data[:BLOCK])
    with pytest.raises(TarReadError, match="ends inside"):
        list(iter_members(io.BytesIO(bytes(data)), lambda name: False))
    with pytest.raises(TarReadError, match="ends inside"):
        list(iter_members(io.BytesIO(bytes(data)), lambda name: True))


def test_prefixed_stream_hands_back_the_head_first() -> None:
    stream = PrefixedStream(b"abc", io.BytesIO(b"defgh"))
    assert stream.read(2) == b"ab"
    assert stream.read(3) == b"cde"
    assert stream.read() == b"fgh"


def test_a_signed_checksum_is_accepted_and_a_wrong_one_in_both_senses_is_not() -> None:
    # A name with bytes >= 128 makes the signed and unsigned sums differ (Sun's and NeXT's
    # tars wrote the signed one; tarfile takes both).
    name = "\u00e9t\u00e9.txt"
    data = bytearray(_tar([(name, b"abc", tarfile.REGTYPE)], tarfile.USTAR_FORMAT))
    data[148:156] = b"        "
    signed = sum(b - 256 if b >= 128 else b for b in data[:BLOCK])
    assert signed != sum(data[:BLOCK])
    data[148:156] = b"%06o\0 " % signed
    members = list(iter_members(io.BytesIO(bytes(data)), lambda n: True))
    assert members == [(name, b"abc")]
    data[148:156] = b"%06o\0 " % (signed + 1)
    with pytest.raises(TarReadError, match="checksum"):
        list(iter_members(io.BytesIO(bytes(data)), lambda n: True))
