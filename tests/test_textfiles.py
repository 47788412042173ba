"""Blocks of complete lines from a stream of pieces cut anywhere (``textfiles._complete_lines``)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from oistream.errors import OistreamError
from oistream.sharding import textfiles


def _blocks(text: bytes, cuts: list[int], first_read: int) -> list[tuple[int, bytes]]:
    start, rest = text[:first_read], text[first_read:]
    places = sorted({min(c, len(rest)) for c in cuts} | {0, len(rest)})
    pieces = [rest[a:b] for a, b in itertools.pairwise(places) if b > a]
    newline = start.find(b"\n")
    blocks = textfiles._complete_lines(iter(pieces), start, newline, OistreamError)
    return [(offset, bytes(block)) for offset, block in blocks]


lines = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=30)


@settings(max_examples=300, deadline=None)
# The header fits the first read, as in use (that read is MAX_ROW_BYTES).
@given(lines, st.lists(st.integers(0, 1500), max_size=12), st.integers(7, 60))
def test_blocks_are_the_text_after_its_first_line_in_whole_lines(
    rows: list[bytes], cuts: list[int], first_read: int
) -> None:
    text = b"header\n" + b"".join(row + b"\n" for row in rows)
    first_read = min(first_read, len(text))
    blocks = _blocks(text, cuts, first_read)
    after_header = len(b"header\n")
    # Each block starts where it says, holds whole lines, and together they are the text.
    assert b"".join(block for _, block in blocks) == text[after_header:]
    for offset, block in blocks:
        assert block.endswith(b"\n") and text[offset : offset + len(block)] == block
        assert offset == after_header or text[offset - 1 : offset] == b"\n"


def test_a_line_cut_between_two_pieces_is_handed_out_whole_and_alone() -> None:
    text = b"h\n" + b"a" * 10 + b"\n" + b"b" * 10 + b"\n" + b"c" * 5 + b"\n"
    # Pieces cut inside the b line: it comes out on its own, the rest of its piece after it.
    blocks = _blocks(text, cuts=[14], first_read=2)
    assert [block for _, block in blocks] == [
        b"a" * 10 + b"\n",
        b"b" * 10 + b"\n",
        b"c" * 5 + b"\n",
    ]
    assert [offset for offset, _ in blocks] == [2, 13, 24]


def test_a_line_over_the_cap_is_cut_to_a_stub_across_pieces() -> None:
    cap = textfiles.MAX_ROW_BYTES
    text = b"h\n" + b"x" * (cap + 100) + b"\nshort\n"
    blocks = _blocks(text, cuts=[cap // 2, cap + 50], first_read=2)
    stub, rest = blocks[0][1], b"".join(block for _, block in blocks[1:])
    assert len(stub) == cap + 2 and stub.endswith(b"\n")  # one byte over the cap, then "\n"
    assert rest == b"short\n"
