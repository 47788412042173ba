"""The catalog: class files in both formats, class lookup, and the streamed segmentation CSV."""

from __future__ import annotations

import csv
import json
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oistream import sources
from oistream.errors import OistreamError
from oistream.sharding import catalog
from oistream.sharding.catalog import (
    SegmentationTable,
    iter_image_instances,
    parse_clicks,
    read_segmentations,
)
from oistream.sharding.classes import OIClass, load_classes, resolve_classes, search_classes

HEADER = "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks"
PERSON, CAR, TREE = "/m/01g317", "/m/0k4j", "/m/07j7r"

CLASSES = [
    OIClass(PERSON, "Person"),
    OIClass(CAR, "Car"),
    OIClass("/m/015qff", "Traffic light"),
    OIClass("/m/01mqdt", "Traffic sign"),
    OIClass("/m/0h2r6", "Personal care"),
    OIClass(TREE, "Tree"),
]


def csv_row(
    image: int,
    mid: str,
    box_id: int,
    box: tuple[object, object, object, object] = (0.1, 0.5, 0.2, 0.6),
    iou: str = "0.9",
    clicks: str = "0.2 0.3 1;0.4 0.5 0",
) -> str:
    """One well-formed row; ``box`` in the CSV's column order XMin, XMax, YMin, YMax."""
    image_id, box_hex = f"{image:016x}", f"{box_id:08x}"
    mask_path = f"{image_id}_{mid.replace('/', '')}_{box_hex}.png"
    return ",".join([mask_path, image_id, mid, box_hex, *map(str, box), iou, clicks])


def write_csv(path: Path, rows: list[str], header: str = HEADER, newline: str = "\n") -> str:
    path.write_bytes(newline.join([header, *rows, ""]).encode())
    return str(path)


def mask_paths(table: SegmentationTable) -> list[str]:
    return table.rows["MaskPath"].tolist()


# --- classes -----------------------------------------------------------------------------------


def make_metadata_root(root: Path, v7: bool = True, v5: bool = False) -> Path:
    """Class files of a metadata root; display names with commas are quoted, as csv writes them."""
    (root / "v5").mkdir(parents=True)
    (root / "v5" / "classes-segmentation.txt").write_text(f"{PERSON}\n{CAR}\n/m/0xyz\n\n")
    names = [(PERSON, "Person"), (CAR, "Car"), (TREE, "Tree"), ("/m/0xyz", "Hat, with brim")]
    if v7:
        (root / "v7").mkdir()
        with open(root / "v7" / "oidv7-class-descriptions-boxable.csv", "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([("LabelName", "DisplayName"), *names])
    if v5:
        with open(root / "v5" / "class-descriptions-boxable.csv", "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(names)
    return root


EXPECTED_CLASSES = [
    OIClass(PERSON, "Person"),
    OIClass(CAR, "Car"),
    OIClass("/m/0xyz", "Hat, with brim"),
]


def test_load_classes_reads_segmentable_mids_with_v7_names(tmp_path: Path) -> None:
    root = make_metadata_root(tmp_path / "meta")
    assert load_classes(str(root)) == EXPECTED_CLASSES


def test_load_classes_falls_back_to_headerless_v5_names(tmp_path: Path) -> None:
    root = make_metadata_root(tmp_path / "meta", v7=False, v5=True)
    assert load_classes(str(root)) == EXPECTED_CLASSES


def test_load_classes_without_any_descriptions_names_both_files(tmp_path: Path) -> None:
    root = make_metadata_root(tmp_path / "meta", v7=False, v5=False)
    with pytest.raises(OistreamError) as error:
        load_classes(str(root))
    assert sources.class_descriptions_url(str(root)) in str(error.value)
    assert sources.v5_class_descriptions_url(str(root)) in str(error.value)


def test_load_classes_from_a_missing_root_is_one_clear_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    with pytest.raises(OistreamError) as error:
        load_classes(missing)
    message = str(error.value)
    assert "\n" not in message
    assert sources.segmentable_classes_url(missing) in message


def test_search_classes_matches_names_and_mids_case_insensitively() -> None:
    assert search_classes(None, CLASSES) == CLASSES
    assert search_classes("", CLASSES) == CLASSES
    assert [c.name for c in search_classes("TRAFFIC", CLASSES)] == ["Traffic light", "Traffic sign"]
    assert [c.name for c in search_classes("person", CLASSES)] == ["Person", "Personal care"]
    assert search_classes("0K4J", CLASSES) == [OIClass(CAR, "Car")]
    assert search_classes("zebra", CLASSES) == []


def test_resolve_classes_by_name_or_mid_keeps_order_and_drops_repeats() -> None:
    resolved = resolve_classes(["traffic LIGHT", CAR, "person", "Car", " Person "], CLASSES)
    assert [c.name for c in resolved] == ["Traffic light", "Car", "Person"]


def test_unknown_class_lists_the_closest_names_on_one_line() -> None:
    with pytest.raises(OistreamError) as error:
        resolve_classes(["Person", "persn"], CLASSES)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("unknown class 'persn'; closest: Person")
    assert "Personal care" in message


def test_unknown_class_with_nothing_close_points_to_the_listing() -> None:
    with pytest.raises(OistreamError, match=r"unknown class 'qqqqq'.*oistream classes"):
        resolve_classes(["qqqqq"], CLASSES)


def test_ambiguous_display_name_asks_for_the_mid() -> None:
    twins = [OIClass("/m/01", "Seal"), OIClass("/m/02", "Seal")]
    with pytest.raises(OistreamError, match=r"ambiguous.*/m/01, /m/02"):
        resolve_classes(["seal"], twins)
    assert resolve_classes(["/m/02"], twins) == [twins[1]]


# --- segmentation rows --------------------------------------------------------------------------


def interleaved_rows() -> list[str]:
    return [
        csv_row(1, PERSON, 1),
        csv_row(1, TREE, 2),
        csv_row(2, CAR, 3),
        csv_row(3, TREE, 4),
        csv_row(1, CAR, 5),
        csv_row(4, PERSON, 6, iou=""),
        csv_row(2, PERSON, 7),
    ]


def test_filter_keeps_only_selected_classes_in_csv_order(tmp_path: Path) -> None:
    rows = interleaved_rows()
    table = read_segmentations(write_csv(tmp_path / "seg.csv", rows), [CAR, PERSON])
    wanted = [r.split(",")[0] for r in rows if TREE not in r]
    assert mask_paths(table) == wanted
    assert (table.total_rows, table.malformed, table.malformed_examples) == (7, 0, [])
    assert tuple(table.rows.columns) == tuple(HEADER.split(","))
    for column in ("MaskPath", "ImageID", "LabelName", "BoxID", "Clicks"):
        values = table.rows[column]
        assert values.dtype == object and all(type(v) is str for v in values), column
    for column in ("BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax", "PredictedIoU"):
        assert table.rows[column].dtype == "float64", column
    assert table.rows["Clicks"][0] == "0.2 0.3 1;0.4 0.5 0"  # unparsed
    assert math.isnan(table.rows["PredictedIoU"][3])
    assert table.rows["BoxXMax"][0] == float(rows[0].split(",")[5])


def test_no_selected_class_gives_an_empty_table_with_the_columns(tmp_path: Path) -> None:
    table = read_segmentations(write_csv(tmp_path / "seg.csv", interleaved_rows()), ["/m/0zzz"])
    assert table.rows.empty and table.total_rows == 7
    assert tuple(table.rows.columns) == tuple(HEADER.split(","))
    assert list(iter_image_instances(table)) == []


@pytest.mark.parametrize("chunksize", [1, 2, 3, 7])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_chunk_boundaries_and_line_ends_do_not_change_the_result(
    tmp_path: Path, chunksize: int, newline: str
) -> None:
    rows = interleaved_rows() * 5 + ["", csv_row(9, CAR, 9, clicks="")]
    path = write_csv(tmp_path / "seg.csv", rows, newline=newline)
    reference = read_segmentations(write_csv(tmp_path / "ref.csv", rows), [PERSON, CAR])
    table = read_segmentations(path, [PERSON, CAR], chunksize=chunksize)
    pd.testing.assert_frame_equal(table.rows.to_frame(), reference.rows.to_frame())
    assert (table.total_rows, table.malformed) == (36, 0)  # the blank line is not a row
    assert table.rows["Clicks"][-1] == ""


def test_a_last_line_without_newline_is_read(tmp_path: Path) -> None:
    path = tmp_path / "seg.csv"
    path.write_text(f"{HEADER}\n{csv_row(1, CAR, 1)}\n{csv_row(2, CAR, 2)}")
    table = read_segmentations(str(path), [CAR], chunksize=2)
    assert table.rows["ImageID"].tolist() == [f"{1:016x}", f"{2:016x}"]


MALFORMED = {
    "too many fields": csv_row(10, CAR, 10) + ",extra",
    "too few fields": csv_row(11, CAR, 11).rsplit(",", 1)[0],
    "too few, other class": csv_row(12, TREE, 12).rsplit(",", 1)[0],
    "short ImageID": csv_row(13, CAR, 13).replace(f"{13:016x}", "abc"),
    "uppercase ImageID": csv_row(0xABC, CAR, 14).replace(f"{0xABC:016x}", f"{0xABC:016X}"),
    "non-hex BoxID": csv_row(15, CAR, 15).replace(f"{15:08x}", "0000000g"),
    "MaskPath of another class": csv_row(16, CAR, 16).replace("m0k4j", "m07j7r", 1),
    "box above 1": csv_row(17, CAR, 17, box=(0.1, 1.5, 0.2, 0.6)),
    "box below 0": csv_row(18, CAR, 18, box=(-0.1, 0.5, 0.2, 0.6)),
    "box min > max": csv_row(19, CAR, 19, box=(0.1, 0.5, 0.7, 0.6)),
    "non-float box": csv_row(20, CAR, 20, box=("abc", 0.5, 0.2, 0.6)),
    "empty box value": csv_row(21, CAR, 21, box=("", 0.5, 0.2, 0.6)),
    "infinite box": csv_row(22, CAR, 22, box=(0.1, "inf", 0.2, 0.6)),
    "non-float PredictedIoU": csv_row(23, CAR, 23, iou="high"),
    "clicks without t": csv_row(24, CAR, 24, clicks="0.2 0.3"),
    "clicks t not 0/1": csv_row(25, CAR, 25, clicks="0.2 0.3 2"),
}


def test_malformed_rows_are_counted_and_skipped_not_fatal(tmp_path: Path) -> None:
    good = [csv_row(1, CAR, 1), csv_row(2, CAR, 2), csv_row(3, TREE, 3)]
    rows = [good[0], *MALFORMED.values(), good[1], good[2]]
    table = read_segmentations(write_csv(tmp_path / "seg.csv", rows), [CAR, PERSON])
    assert mask_paths(table) == [good[0].split(",")[0], good[1].split(",")[0]]
    assert table.total_rows == len(rows)
    assert table.malformed == len(MALFORMED)
    # The first five, by line number; the header is line 1 and good[0] line 2.
    assert table.malformed_examples == [
        "line 3: 11 fields, expected 10",
        "line 4: 9 fields, expected 10",
        "line 5: 9 fields, expected 10",
        "line 6: ImageID 'abc' is not 16 lowercase hex",
        f"line 7: ImageID '{0xABC:016X}' is not 16 lowercase hex",
    ]


@pytest.mark.parametrize("name", list(MALFORMED))
def test_each_malformed_row_is_reported_with_its_line_and_reason(tmp_path: Path, name: str) -> None:
    table = read_segmentations(
        write_csv(tmp_path / "seg.csv", [csv_row(1, CAR, 1), MALFORMED[name]]), [CAR], chunksize=2
    )
    assert (len(table.rows), table.malformed) == (1, 1)
    assert len(table.malformed_examples) == 1
    assert table.malformed_examples[0].startswith("line 3: ")


def test_malformed_counts_do_not_depend_on_chunk_size(tmp_path: Path) -> None:
    rows = [csv_row(1, CAR, 1), *MALFORMED.values()] * 3
    path = write_csv(tmp_path / "seg.csv", rows)
    results = {
        chunksize: read_segmentations(path, [CAR], chunksize=chunksize)
        for chunksize in (1, 5, 10**6)
    }
    assert {(t.malformed, tuple(t.malformed_examples)) for t in results.values()} == {
        (3 * len(MALFORMED), tuple(results[1].malformed_examples))
    }


def test_a_wrong_header_names_the_file_and_the_header_found(tmp_path: Path) -> None:
    header = HEADER.replace("BoxXMin,BoxXMax,BoxYMin,BoxYMax", "XMin,XMax,YMin,YMax")
    path = write_csv(tmp_path / "seg.csv", [csv_row(1, CAR, 1)], header=header)
    with pytest.raises(OistreamError) as error:
        read_segmentations(path, [CAR])
    assert path in str(error.value) and header in str(error.value)


def test_an_empty_file_has_a_wrong_header(tmp_path: Path) -> None:
    (tmp_path / "seg.csv").write_bytes(b"")
    with pytest.raises(OistreamError, match="unexpected header ''"):
        read_segmentations(str(tmp_path / "seg.csv"), [CAR])


def test_a_missing_csv_is_one_clear_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "v5" / "train-annotations-object-segmentation.csv")
    with pytest.raises(OistreamError) as error:
        read_segmentations(missing, [CAR])
    assert str(error.value) == f"cannot read {missing}: not found"


def test_a_label_longer_than_every_selected_mid_is_not_a_prefix_match(tmp_path: Path) -> None:
    # A NUL byte after the MID must not hide behind numpy's stripping of trailing NULs.
    nul_label = csv_row(4, CAR, 4).replace(f",{CAR},", f",{CAR}\0,")
    rows = [csv_row(1, CAR, 1), csv_row(2, CAR + "x", 2), csv_row(3, CAR[:-1], 3), nul_label]
    table = read_segmentations(write_csv(tmp_path / "seg.csv", rows), [CAR])
    assert table.rows["ImageID"].tolist() == [f"{1:016x}"]
    assert table.malformed == 0


# --- instances -----------------------------------------------------------------------------------


def test_instances_per_image_with_xyxy_boxes_parsed_clicks_and_none_for_empty_iou(
    tmp_path: Path,
) -> None:
    rows = [
        csv_row(1, PERSON, 1, box=(0.1, 0.5, 0.2, 0.6), iou="0.75", clicks="0.2 0.3 1;0.4 0.5 0"),
        csv_row(2, CAR, 2),
        csv_row(1, CAR, 3, box=(0.0, 1.0, 0.25, 0.5), iou="", clicks=""),
    ]
    table = read_segmentations(write_csv(tmp_path / "seg.csv", rows), [PERSON, CAR])
    images = list(iter_image_instances(table))
    assert [image_id for image_id, _ in images] == [f"{1:016x}", f"{2:016x}"]
    first, second = images[0][1]
    assert first == {
        "mask_path": f"{1:016x}_m01g317_{1:08x}.png",
        "label": PERSON,
        "box_id": f"{1:08x}",
        "box": [0.1, 0.2, 0.5, 0.6],  # xmin, ymin, xmax, ymax
        "predicted_iou": 0.75,
        "clicks": [[0.2, 0.3, 1], [0.4, 0.5, 0]],
    }
    assert second["box"] == [0.0, 0.25, 1.0, 0.5]
    assert second["predicted_iou"] is None and second["clicks"] == []
    assert all(type(t) is int for _, _, t in first["clicks"])


def test_instances_in_the_order_of_the_ids_given(tmp_path: Path) -> None:
    rows = [csv_row(1, CAR, 1), csv_row(2, CAR, 2), csv_row(1, CAR, 3)]
    table = read_segmentations(write_csv(tmp_path / "seg.csv", rows), [CAR])
    order = [f"{2:016x}", f"{1:016x}"]
    result = list(iter_image_instances(table, order))
    assert [image_id for image_id, _ in result] == order
    assert [x["box_id"] for x in result[1][1]] == [f"{1:08x}", f"{3:08x}"]
    with pytest.raises(KeyError):
        list(iter_image_instances(table, [f"{9:016x}"]))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.86864 0.95498 1;0.89370 0.56579 1", [[0.86864, 0.95498, 1], [0.8937, 0.56579, 1]]),
        ("  0.5 0.25 0 \n", [[0.5, 0.25, 0]]),
        ("1 0 1 ; .5 2e-1 0", [[1.0, 0.0, 1], [0.5, 0.2, 0]]),
        ("", []),
        ("   ", []),
    ],
)
def test_parse_clicks(text: str, expected: list[list[float]]) -> None:
    assert parse_clicks(text) == expected


@pytest.mark.parametrize(
    "text",
    ["0.5 0.5", "0.5 0.5 2", "0.5 0.5 1;", ";0.5 0.5 1", "a b 1", "0.5 0.5 1 1", "0.5,0.5,1"],
)
def test_parse_clicks_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_clicks(text)


@pytest.mark.parametrize(
    "text",
    [
        "0.86864 0.95498 1;0.89370 0.56579 0",  # published form: rewritten as text
        "0.50000 1.00000 0",
        "  0.5 0.25 0 \n",  # other valid forms: parsed, then encoded
        "1 0 1 ; .5 2e-1 0",
        "",
    ],
)
def test_clicks_json_parses_to_what_parse_clicks_gives(text: str) -> None:
    parsed = json.loads(catalog.clicks_json(text))
    assert parsed == parse_clicks(text)
    assert [type(v) for triple in parsed for v in triple] == [
        type(v) for triple in parse_clicks(text) for v in triple
    ]


@given(
    st.lists(
        st.tuples(st.integers(0, 199_999), st.integers(0, 199_999), st.integers(0, 1)),
        min_size=1,
        max_size=20,
    ),
    st.sampled_from(["", " ", ";", "x", "e", "0", "-"]),
    st.integers(0, 400),
)
def test_clicks_json_agrees_with_parse_clicks_on_published_text_and_its_damage(
    triples: list[tuple[int, int, int]], replacement: str, at: int
) -> None:
    text = ";".join(f"{x / 100_000:.5f} {y / 100_000:.5f} {t}" for x, y, t in triples)
    at = at % (len(text) + 1)
    text = text[:at] + replacement + text[at + 1 :]
    try:
        expected = parse_clicks(text)
    except ValueError:
        with pytest.raises(ValueError):
            catalog.clicks_json(text)
        return
    assert json.loads(catalog.clicks_json(text)) == expected


# --- property: the numpy scan agrees with a plain csv-module reading -----------------------------


def reference_filter(text: str, mids: set[str]) -> tuple[list[str], int]:
    """What read_segmentations should keep and count, written the slow, obvious way."""
    kept, malformed = [], 0
    for line in text.split("\n")[1:]:
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split(",")
        if len(fields) != 10:
            malformed += 1
            continue
        mask_path, image_id, label, box_id, *box, iou, clicks = fields
        if label not in mids:
            continue
        try:
            xmin, xmax, ymin, ymax = map(float, box)
            valid = (
                re.fullmatch("[0-9a-f]{16}", image_id) is not None
                and re.fullmatch("[0-9a-f]{8}", box_id) is not None
                and mask_path == f"{image_id}_{label.replace('/', '')}_{box_id}.png"
                and 0 <= xmin <= xmax <= 1
                and 0 <= ymin <= ymax <= 1
                and (iou.strip() == "" or math.isfinite(float(iou)))
            )
            parse_clicks(clicks)
        except ValueError:
            valid = False
        if valid:
            if mask_path not in kept:  # a repeated MaskPath is the same instance: the first wins
                kept.append(mask_path)
        else:
            malformed += 1
    # A repeated MaskPath is the same instance again: the first valid row wins.
    return list(dict.fromkeys(kept)), malformed


def damaged(row: str, how: int) -> str:
    return [
        row,
        row + ",",
        row.rsplit(",", 1)[0],
        row.replace(",", ",,", 1),
        row.replace("0.", "O.", 1),
        row.replace("_", "-", 1),
        row.replace(".png", ".jpg"),
        row + " 1",
    ][how]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(
            st.integers(0, 40),
            st.sampled_from([PERSON, CAR, TREE, "/m/0k4", "/g/11bc6xq"]),
            st.integers(0, 7),
            st.sampled_from(["", "0.5", "nan", "1e-3"]),
        ),
        max_size=30,
    ),
    chunksize=st.integers(1, 40),
    newline=st.sampled_from(["\n", "\r\n"]),
)
def test_scan_agrees_with_a_plain_reading(
    tmp_path: Path, rows: list[tuple[int, str, int, str]], chunksize: int, newline: str
) -> None:
    lines = [damaged(csv_row(i, mid, i, iou=iou), how) for i, mid, how, iou in rows]
    text = newline.join([HEADER, *lines, ""])
    path = tmp_path / "seg.csv"
    path.write_text(text, newline="")
    mids = {PERSON, CAR, "/g/11bc6xq"}
    table = read_segmentations(str(path), mids, chunksize=chunksize)
    assert (mask_paths(table), table.malformed) == reference_filter(text, mids)
    assert table.total_rows == len(lines)


# --- through the local S3 endpoint ---------------------------------------------------------------


@pytest.mark.parametrize("read_timeout", [None, 5.0])
def test_classes_and_rows_read_through_s3_match_the_local_files(
    s3, fake_bucket: Path, read_timeout: float | None
) -> None:
    options = s3.storage_options()
    if read_timeout is not None:  # as the shard command's parent reads: botocore time-outs added
        options = sources.with_read_timeout(s3.metadata_url, options, read_timeout)
        assert options["config_kwargs"]["read_timeout"] == read_timeout
        assert options["config_kwargs"].items() >= s3.storage_options()["config_kwargs"].items()
    classes = load_classes(s3.metadata_url, options)
    assert classes == load_classes(str(fake_bucket / "openimages"))
    wanted = resolve_classes(["Person", "Car", "Traffic light", "Traffic sign"], classes)
    assert [c.mid for c in wanted] == [PERSON, CAR, "/m/015qff", "/m/01mqdt"]

    mids = [c.mid for c in wanted]
    remote = read_segmentations(
        sources.segmentation_csv_url(s3.metadata_url, "validation"), mids, options
    )
    local_csv = sources.segmentation_csv_url(str(fake_bucket / "openimages"), "validation")
    local = read_segmentations(local_csv, mids, chunksize=3)
    assert len(remote.rows) > 0 and remote.malformed == 0
    pd.testing.assert_frame_equal(remote.rows.to_frame(), local.rows.to_frame())
    other_classes = remote.total_rows - len(remote.rows)
    assert other_classes > 0  # the fake bucket carries classes a filter must drop


def test_unreachable_s3_endpoint_is_one_clear_line() -> None:
    options = {
        "anon": True,
        "endpoint_url": "http://127.0.0.1:9",
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    url = "s3://openimages/v5/validation-annotations-object-segmentation.csv"
    with pytest.raises(OistreamError) as error:
        read_segmentations(url, [CAR], options)
    assert str(error.value).startswith(f"cannot read {url}: ")
    assert "\n" not in str(error.value)


def test_block_size_follows_chunksize() -> None:
    # The contract the chunk-boundary tests rely on: small chunksizes give tiny blocks.
    assert len(csv_row(1, CAR, 1)) > catalog._BLOCK_BYTES_PER_ROW * 2


@settings(max_examples=30, deadline=None)
@given(
    clicks=st.lists(
        st.tuples(
            st.lists(
                st.tuples(st.integers(0, 100_000), st.integers(0, 100_000), st.integers(0, 1)),
                min_size=1,
                max_size=20,
            ),
            st.integers(0, 400),
            st.sampled_from(["", "0", "9", " ", ".", ";", "\t", "2", "-", "e", "x", ";;", "00"]),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_clicks_in_the_published_form_are_checked_as_the_pattern_checks_them(
    clicks: list[tuple[list[tuple[int, int, int]], int, str]],
) -> None:
    # The published form ("0.95498 0.65197 1;...") takes a vectorised path; one byte replaced,
    # dropped or doubled anywhere must still be judged as the clicks pattern judges it.
    rows = []
    for i, (triples, at, replacement) in enumerate(clicks):
        text = ";".join(f"{x / 100_000:.5f} {y / 100_000:.5f} {t}" for x, y, t in triples)
        at = at % (len(text) + 1)
        text = text[:at] + replacement + text[at + 1 :]
        rows.append(csv_row(i, PERSON, i, clicks=text))
    text = "\n".join([HEADER, *rows, ""])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seg.csv"
        path.write_text(text)
        table = read_segmentations(str(path), {PERSON})
    assert (mask_paths(table), table.malformed) == reference_filter(text, {PERSON})


@given(st.lists(st.integers(0, 5), max_size=40), st.integers(0, 3))
def test_order_keys_of_rows_equal_the_keys_of_their_ids(picks: list[int], seed: int) -> None:
    # Rows of one image together or apart, as bytes the scan cut out: the same keys as the IDs'.
    ids = [f"{0xABC0 + k:016x}" for k in picks]
    keys = catalog._hash_keys_of_rows(np.array([i.encode() for i in ids], dtype="S16"), seed)
    assert keys.dtype == np.uint64
    assert keys.tolist() == catalog.hash_order_keys(ids, seed).tolist()
