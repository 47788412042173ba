"""Hostile segmentation CSVs: crafted Clicks, oversized fields and rows, repeated rows."""

from __future__ import annotations

import io
import random
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from test_catalog import PERSON, csv_row, write_csv

from oistream.errors import OistreamError
from oistream.sharding import catalog
from oistream.sharding.catalog import read_segmentations
from oistream.testing.hostile import crafted_clicks

# The pattern main shipped before: exponential on a few crafted clicks. Kept here only as the
# reference the linear one must agree with.
_OLD_NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_OLD_CLICK = rf"{_OLD_NUMBER}[ \t]+{_OLD_NUMBER}[ \t]+[01]"
_OLD = re.compile(rf"[ \t\r\n]*(?:{_OLD_CLICK}(?:[ \t]*;[ \t]*{_OLD_CLICK})*)?[ \t\r\n]*")


def test_crafted_clicks_are_rejected_in_a_child_that_must_finish(tmp_path: Path) -> None:
    # 200 crafted clicks (4 kB): the old pattern needed 10 s for 4 and doubled per click. The
    # child's time-out is only a guard so a regression fails instead of hanging the suite.
    rows = [csv_row(1, PERSON, 1, clicks=crafted_clicks(n)) for n in (4, 8, 10, 150)]
    rows.append(csv_row(2, PERSON, 2))
    path = write_csv(tmp_path / "seg.csv", rows)
    script = textwrap.dedent(
        f"""
        from oistream.sharding.catalog import read_segmentations
        table = read_segmentations({path!r}, [{PERSON!r}])
        print(table.malformed, len(table.rows))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["4", "1"]


def test_the_linear_pattern_accepts_exactly_what_the_old_one_did() -> None:
    rng = random.Random(0)
    pieces = ["0", "1", "12", ".5", "3.", "1e5", "-2", "+.1e-3", " ", "\t", ";", "x", "e", "."]
    linear = re.compile(catalog._CLICKS_PATTERN)
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert bool(linear.fullmatch(text)) == bool(_OLD.fullmatch(text)), repr(text)
    for text in ("0.95498 0.65197 1;0.89370 0.56579 1", " 1 2 0 ", "", "1e5 .5 1; 2. 3 0"):
        assert linear.fullmatch(text) and _OLD.fullmatch(text)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (csv_row(1, PERSON, 1, clicks="0.5 0.5 1;" * 500 + "0.5 0.5 1"), "Clicks longer than"),
        (csv_row(1, PERSON, 1, iou="0." + "9" * 40), "PredictedIoU longer than"),
        (csv_row(1, PERSON, 1, clicks="0.5 0.5 1;" * 1000 + "0.5 0.5 1"), "row longer than"),
    ],
)
def test_oversized_fields_and_rows_are_malformed_and_counted(
    tmp_path: Path, row: str, reason: str
) -> None:
    path = write_csv(tmp_path / "seg.csv", [row, csv_row(2, PERSON, 2)])
    table = read_segmentations(path, [PERSON])
    assert table.malformed == 1
    assert len(table.rows) == 1 and table.rows["ImageID"][0] == f"{2:016x}"
    assert reason in table.malformed_examples[0]


def test_a_ten_megabyte_line_is_one_malformed_row_in_bounded_memory(tmp_path: Path) -> None:
    # No newline for 10 MB, read in small blocks: the line is cut to a stub, counted once.
    huge = csv_row(1, PERSON, 1, clicks="0.5 0.5 1;" * 1_000_000 + "0.5 0.5 1")
    path = write_csv(tmp_path / "seg.csv", [csv_row(3, PERSON, 3), huge, csv_row(2, PERSON, 2)])
    table = read_segmentations(path, [PERSON], chunksize=1000)
    assert (table.total_rows, table.malformed, len(table.rows)) == (3, 1, 2)
    assert "row longer than" in table.malformed_examples[0]


def test_repeated_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    row = csv_row(1, PERSON, 1)
    other = csv_row(1, PERSON, 2)
    path = write_csv(tmp_path / "seg.csv", [row, row, other, row, row])
    table = read_segmentations(path, [PERSON], chunksize=1)  # repeats across blocks too
    assert table.duplicates == 3
    assert table.rows["BoxID"].tolist() == [f"{1:08x}", f"{2:08x}"]


class _FailingFile(io.BytesIO):
    """A CSV whose storage fails after ``good`` bytes, as a dropped transfer would."""

    def __init__(self, data: bytes, good: int) -> None:
        super().__init__(data)
        self.good = good

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self.good:
            raise ConnectionResetError("the server closed the connection")
        return super().read(size)


def test_a_read_failing_ahead_of_the_parser_is_one_line_at_its_place(tmp_path: Path) -> None:
    lines = [catalog.HEADER] + [
        csv_row(i, PERSON, i, clicks="0.10000 0.20000 1") for i in range(3000)
    ]
    data = ("\n".join(lines) + "\n").encode()
    opened = []

    def opener() -> _FailingFile:
        opened.append(_FailingFile(data, good=len(data) // 2))
        return opened[-1]

    with pytest.raises(OistreamError) as failure:
        catalog.read_segmentations("s3://b/seg.csv", ["/m/01g317"], chunksize=64, opener=opener)
    assert str(failure.value) == (
        "cannot read s3://b/seg.csv: ConnectionResetError: the server closed the connection"
    )
    assert opened[0].closed
    assert not [t for t in threading.enumerate() if t.name == "csv-read-ahead"]


def test_leaving_the_blocks_early_stops_the_read_ahead_before_the_file_closes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "seg.csv"
    path.write_bytes(b"header\n" + b"x,y\n" * 200_000)
    blocks = catalog._read_line_blocks(str(path), None, block_bytes=4096)
    assert bytes(next(blocks)[1]) == b"header\n"
    offset, block = next(blocks)
    assert (offset, bytes(block[:4])) == (7, b"x,y\n")
    blocks.close()
    assert not [t for t in threading.enumerate() if t.name == "csv-read-ahead"]
