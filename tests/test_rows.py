"""``Rows``, the catalog's pandas-free table, and the catalog's parse of number fields."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oistream.sharding import catalog
from oistream.sharding.rows import Rows, factorize, group_positions, isin


def _rows() -> Rows:
    return Rows(
        {
            "ImageID": np.array(["b", "a", "b", "c", "a"], dtype=object),
            "x": np.array([0.5, 1.5, 2.5, 3.5, 4.5]),
        }
    )


def test_take_select_and_with_columns_make_new_tables() -> None:
    rows = _rows()
    picked = rows.take(np.array([True, False, True, False, False]))
    assert picked["ImageID"].tolist() == ["b", "b"] and picked["x"].tolist() == [0.5, 2.5]
    assert rows.take(np.array([4, 0]))["x"].tolist() == [4.5, 0.5]
    assert rows.select(["x"]).columns == ("x",)
    wider = rows.with_columns(y=np.arange(5))
    assert wider.columns == ("ImageID", "x", "y") and rows.columns == ("ImageID", "x")
    assert len(rows) == 5 and not rows.empty and rows.take(np.zeros(0, np.intp)).empty


def test_columns_of_other_lengths_and_parts_of_other_columns_are_refused() -> None:
    with pytest.raises(ValueError, match="lengths"):
        Rows({"a": np.zeros(2), "b": np.zeros(3)})
    with pytest.raises(ValueError, match="other columns"):
        Rows.concat([_rows(), _rows().select(["x", "ImageID"])])
    both = Rows.concat([_rows(), _rows().take(np.array([1]))])
    assert both["ImageID"].tolist() == ["b", "a", "b", "c", "a", "a"]


def test_groups_and_codes_follow_first_appearance() -> None:
    ids = _rows()["ImageID"]
    codes, distinct = factorize(ids)
    assert distinct == ["b", "a", "c"] and codes.tolist() == [0, 1, 0, 2, 1]
    groups = group_positions(ids)
    assert list(groups) == ["b", "a", "c"]
    assert {k: v.tolist() for k, v in groups.items()} == {"b": [0, 2], "a": [1, 4], "c": [3]}
    assert group_positions(ids[:0]) == {}
    assert isin(ids, ["a", "c"]).tolist() == [False, True, False, True, True]


def test_to_frame_is_the_same_table_for_pandas() -> None:
    frame = _rows().to_frame()
    assert list(frame.columns) == ["ImageID", "x"]
    assert frame["ImageID"].tolist() == ["b", "a", "b", "c", "a"]
    assert frame["x"].dtype == "float64"


# --- number fields: what Python's float() makes of the field's ASCII text ----------------------


def _parsed(fields: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``catalog._parse_numbers`` of each field put in the BoxXMin place of a 10-field line."""
    block = b"".join(b"m,i,l,b," + f + b",0,0,0,,\n" for f in fields)
    lines = catalog._Lines(block)
    k = catalog.COLUMNS.index("BoxXMin")
    return catalog._parse_numbers(lines, np.arange(len(fields)), k)


def _python(field: bytes) -> float | None:
    if b"\0" in field:
        return None
    try:
        return float(field.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None


def _same(a: float, b: float) -> bool:
    """Bit for bit (so 0.0 and -0.0 differ), any NaN equal to any NaN."""
    return (math.isnan(a) and math.isnan(b)) or struct.pack("<d", a) == struct.pack("<d", b)


EDGES = [
    b"0.5",
    b"1",
    b"0",
    b"-0",
    b"+.5",
    b"5.",
    b".",
    b"-",
    b"+",
    b"",
    b" ",
    b" 0.5",
    b"0.5 ",
    b"1e-3",
    b"1E+2",
    b"1_0",
    b"nan",
    b"-inf",
    b"Infinity",
    b"0x10",
    b"1.2.3",
    b"--1",
    b"1-",
    b"0.123456789012345",
    b"0.1234567890123456",
    b"999999999999999",
    b"9999999999999999",
    b"0.5\0",
    b"\0" + b"0.5",
    b"0\x005",
    b"\xc3\xa9",
    b"00000000000000000000000000000001",
]


def test_number_fields_read_as_python_float_reads_them() -> None:
    values, is_number, blank = _parsed(EDGES)
    for field, value, number, empty in zip(EDGES, values, is_number, blank, strict=True):
        expected = _python(field)
        assert number == (expected is not None), field
        if expected is not None:
            assert _same(value, expected), (field, value, expected)
        assert empty == (field.strip() == b"" and b"\0" not in field), field


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False).map(lambda x: repr(x).encode()),
            st.integers(0, 17)
            .flatmap(
                lambda places: st.decimals(allow_nan=False, allow_infinity=False, places=places)
            )
            .map(lambda d: str(d).encode()),
            st.from_regex(rb"\A[-+]?[0-9]{0,16}\.?[0-9]{0,16}\Z"),
            st.binary(max_size=8),
        ).filter(lambda f: len(f) <= 32 and b"," not in f and b"\n" not in f),
        min_size=1,
        max_size=40,
    )
)
def test_any_field_reads_as_python_float_reads_it(fields: list[bytes]) -> None:
    values, is_number, _ = _parsed(fields)
    for field, value, number in zip(fields, values, is_number, strict=True):
        expected = _python(field)
        assert number == (expected is not None), field
        if expected is not None:
            assert _same(value, expected), (field, value, expected)
