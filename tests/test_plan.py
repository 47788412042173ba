"""Selection and shard assignment: deterministic, per-class limits, hash order, not ID order."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oistream.errors import OistreamError
from oistream.sharding import catalog
from oistream.sharding.catalog import SegmentationTable, Selection, read_segmentations
from oistream.sharding.classes import OIClass
from oistream.sharding.plan import hash_order_key, make_plan
from oistream.sharding.rows import Rows, isin

PERSON = OIClass("/m/01g317", "Person")
CAR = OIClass("/m/0k4j", "Car")


def _table(rows: list[tuple[str, str]]) -> SegmentationTable:
    """rows: (ImageID, MID) in CSV order."""
    records = []
    for k, (image_id, mid) in enumerate(rows):
        box_id = f"{k:08x}"
        records.append(
            {
                "MaskPath": f"{image_id}_{mid.replace('/', '')}_{box_id}.png",
                "ImageID": image_id,
                "LabelName": mid,
                "BoxID": box_id,
                "BoxXMin": 0.1,
                "BoxXMax": 0.5,
                "BoxYMin": 0.2,
                "BoxYMax": 0.6,
                "PredictedIoU": float("nan") if k % 3 == 0 else 0.75,
                "Clicks": "0.2 0.3 1;0.4 0.5 0",
            }
        )
    numbers = ("BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax", "PredictedIoU")
    columns = {
        c: np.array([r[c] for r in records], dtype=float if c in numbers else object)
        for c in catalog.COLUMNS
    }
    return SegmentationTable(
        rows=Rows(columns),
        total_rows=len(records),
        malformed=0,
        malformed_examples=[],
    )


def _ids(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(64):016x}" for _ in range(n)]


def test_per_class_takes_first_n_in_seeded_hash_order() -> None:
    people, cars = _ids(40, 1), _ids(30, 2)
    table = _table([(i, PERSON.mid) for i in people] + [(i, CAR.mid) for i in cars])
    plan = make_plan(table, [PERSON, CAR], "train", per_class=5, samples_per_shard=4, seed=7)
    chosen = plan.image_ids()
    expected_people = sorted(people, key=lambda i: hash_order_key(i, 7))[:5]
    expected_cars = sorted(cars, key=lambda i: hash_order_key(i, 7))[:5]
    assert set(chosen) == set(expected_people) | set(expected_cars)
    # the union is in hash order and cut into shards of 4, named by split and index
    assert chosen == sorted(chosen, key=lambda i: hash_order_key(i, 7))
    assert [len(ids) for ids in plan.shard_ids] == [4, 4, 2]
    assert plan.shard_names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]


def test_order_is_not_id_order_and_seed_changes_it() -> None:
    ids = _ids(200)
    table = _table([(i, PERSON.mid) for i in ids])
    first = make_plan(table, [PERSON], "train", per_class=20, seed=0)
    other = make_plan(table, [PERSON], "train", per_class=20, seed=1)
    chosen = first.shard_ids[0]
    assert chosen != sorted(chosen)
    assert set(chosen) != set(other.shard_ids[0])
    assert first.plan_hash != other.plan_hash


def test_same_arguments_same_plan_and_hash() -> None:
    ids = _ids(50)
    table = _table([(i, PERSON.mid) for i in ids] + [(i, CAR.mid) for i in ids[::3]])
    a = make_plan(table, [PERSON, CAR], "validation", per_class=10, samples_per_shard=3)
    b = make_plan(table, [PERSON, CAR], "validation", per_class=10, samples_per_shard=3)
    assert a.plan_hash == b.plan_hash
    assert [x.samples for x in a.shards()] == [x.samples for x in b.shards()]
    c = make_plan(table, [PERSON, CAR], "validation", per_class=10, samples_per_shard=4)
    assert c.plan_hash != a.plan_hash


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("BoxXMin", 0.11),
        ("BoxYMax", 0.61),
        ("PredictedIoU", 0.5),
        ("PredictedIoU", float("nan")),
        ("Clicks", "0.2 0.3 1"),
        ("BoxID", "ffffffff"),
    ],
)
def test_the_hash_follows_every_value_a_sample_record_holds(column: str, value: Any) -> None:
    ids = _ids(30)
    table = _table([(i, PERSON.mid) for i in ids] + [(i, CAR.mid) for i in ids[::2]])
    plan = make_plan(table, [PERSON, CAR], "train", per_class=6, samples_per_shard=4)
    chosen, left_out = set(plan.image_ids()), set(ids) - set(plan.image_ids())
    rows = table.rows
    for images, changes in ((chosen, True), (left_out, False)):
        target = np.flatnonzero(isin(rows["ImageID"], images))[-1]
        if rows[column][target] == value or (pd.isna(rows[column][target]) and value != value):
            target = np.flatnonzero(isin(rows["ImageID"], images))[-2]
        values = rows[column].copy()
        values[target] = value
        changed = rows.with_columns(**{column: values})
        other = make_plan(
            SegmentationTable(changed, len(changed), 0, []),
            [PERSON, CAR],
            "train",
            per_class=6,
            samples_per_shard=4,
        )
        assert other.shard_ids == plan.shard_ids
        # A value of a sample's record changes the hash; a row of an image left out does not.
        assert (other.plan_hash != plan.plan_hash) is changes
        if changes:
            records = [s.samples for s in other.shards()]
            assert records != [s.samples for s in plan.shards()]


def test_sample_holds_every_selected_instance_of_its_image_in_csv_order() -> None:
    image = _ids(1)[0]
    rows = [(image, CAR.mid), (image, PERSON.mid), (image, CAR.mid)]
    plan = make_plan(_table(rows), [PERSON, CAR], "train", per_class=1)
    (sample,) = plan.shard(0).samples
    assert [x["label"] for x in sample.instances] == [CAR.mid, PERSON.mid, CAR.mid]
    assert [x["class_index"] for x in sample.instances] == [2, 1, 2]
    assert [x["mask"] for x in sample.instances] == [
        "000.mask.png",
        "001.mask.png",
        "002.mask.png",
    ]
    first = sample.instances[0]
    assert first["box"] == [0.1, 0.2, 0.5, 0.6]  # xmin, ymin, xmax, ymax
    assert first["predicted_iou"] is None
    assert first["clicks"] == [[0.2, 0.3, 1], [0.4, 0.5, 0]]
    assert plan.manifest_classes()[0] == {"index": 0, "mid": None, "name": "background"}
    assert plan.manifest_classes()[2] == {"index": 2, "mid": CAR.mid, "name": "Car"}


def test_sample_json_holds_the_record_in_design_order_with_the_extra_fields_last() -> None:
    image = _ids(1)[0]
    plan = make_plan(_table([(image, CAR.mid), (image, PERSON.mid)]), [PERSON, CAR], "train")
    (sample,) = plan.shard(0).samples
    assert sample.masks == [
        ("000.mask.png", sample.instances[0]["mask_path"]),
        ("001.mask.png", sample.instances[1]["mask_path"]),
    ]
    record = json.loads(sample.record_json("train", 640, 480))
    assert list(record) == ["image_id", "split", "width", "height", "instances"]
    assert record == {
        "image_id": image,
        "split": "train",
        "width": 640,
        "height": 480,
        "instances": sample.instances,
    }
    assert list(record["instances"][0]) == [
        "mask",
        "mask_path",
        "label",
        "class_index",
        "box_id",
        "box",
        "predicted_iou",
        "clicks",
    ]
    extra = {"image_labels": [{"label": CAR.mid, "confidence": 1}], "boxes": []}
    plan.attach_annotations({image: extra})
    (sample,) = plan.shard(0).samples
    record = json.loads(sample.record_json("train", 640, 480))
    assert list(record)[5:] == ["image_labels", "boxes"]
    assert {k: record[k] for k in extra} == extra


def test_max_images_caps_the_union() -> None:
    ids = _ids(30)
    plan = make_plan(_table([(i, PERSON.mid) for i in ids]), [PERSON], "test", max_images=7)
    assert plan.num_samples == 7


def test_samples_per_shard_must_be_positive() -> None:
    with pytest.raises(ValueError):
        make_plan(_table([]), [PERSON], "train", samples_per_shard=0)


# --- the bounded catalog: rows kept while reading follow the selection, the plan does not change --

TRAFFIC_SIGN = OIClass("/m/01mqdt", "Traffic sign")
HEADER = "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks"


def _csv_line(image_id: str, mid: str, k: int) -> str:
    box_id = f"{k:08x}"
    clicks = ";".join(f"0.{k % 7 + 1} 0.{j + 1} {j % 2}" for j in range(k % 4 + 1))
    iou = "" if k % 5 == 0 else f"0.{k % 9 + 1}"
    mask_path = f"{image_id}_{mid.replace('/', '')}_{box_id}.png"
    return f"{mask_path},{image_id},{mid},{box_id},0.1,0.5,0.2,0.6,{iou},{clicks}"


def _plans_agree(
    path: Path,
    classes: list[OIClass],
    chunksize: int,
    shape_errors: int,
    **selection: Any,
) -> None:
    mids = [c.mid for c in classes]
    whole = read_segmentations(str(path), mids, chunksize=chunksize)
    bounded = read_segmentations(
        str(path), mids, chunksize=chunksize, selection=Selection(**selection)
    )
    arguments = {"per_class": selection.get("per_class"), "max_images": selection.get("max_images")}
    seed = selection.get("seed", 0)
    expected = make_plan(whole, classes, "train", samples_per_shard=3, seed=seed, **arguments)
    plan = make_plan(bounded, classes, "train", samples_per_shard=3, seed=seed, **arguments)
    assert plan.shard_ids == expected.shard_ids
    assert plan.plan_hash == expected.plan_hash
    # What the bounded catalog keeps is exactly the rows of the images the plan may take (with
    # max_images and per_class both, the cut comes later), in CSV order; the counts are the same.
    rows = whole.rows
    assert set(bounded.rows["ImageID"]) >= set(expected.image_ids())
    candidates = make_plan(whole, classes, "train", seed=seed, per_class=arguments["per_class"])
    if arguments["per_class"] is None:
        candidates = expected
    keep = isin(rows["ImageID"], set(candidates.image_ids()))
    pd.testing.assert_frame_equal(bounded.rows.to_frame(), rows.take(keep).to_frame())
    assert bounded.total_rows == whole.total_rows
    # Field counts are checked on every row; identifiers and values only on the rows of images
    # the selection could still take, so fewer bad rows may be seen, never more.
    assert shape_errors <= bounded.malformed <= whole.malformed


@settings(max_examples=12, deadline=None)
@given(
    data=st.data(),
    grouped=st.booleans(),
    chunksize=st.integers(4, 60),
    prune_slack=st.sampled_from([0, 10, 65_536]),
    batch_lines=st.sampled_from([1, 5, 4096]),
    per_class=st.one_of(st.none(), st.integers(0, 12)),
    max_images=st.one_of(st.none(), st.integers(0, 20)),
    seed=st.integers(0, 3),
    value_errors=st.booleans(),
)
def test_bounded_catalog_gives_the_plan_of_the_whole_table(
    data: st.DataObject,
    grouped: bool,
    chunksize: int,
    prune_slack: int,
    batch_lines: int,
    per_class: int | None,
    max_images: int | None,
    seed: int,
    value_errors: bool,
) -> None:
    # Person common, Car less so, Traffic sign rare: the rare class leaves every threshold open,
    # and rows of one image scattered over the file send some lines to be read again.
    images = _ids(40, data.draw(st.integers(0, 1000)))
    weights = {PERSON.mid: 0.9, CAR.mid: 0.5, TRAFFIC_SIGN.mid: 0.08, "/m/07j7r": 0.4}
    rng = random.Random(data.draw(st.integers(0, 1000)))
    pairs = [
        (image_id, mid)
        for image_id in images
        for mid, p in weights.items()
        for _ in range(rng.choice([1, 1, 2, 3]))
        if rng.random() < p
    ]
    if not grouped:
        rng.shuffle(pairs)
    lines = [_csv_line(i, mid, k) for k, (i, mid) in enumerate(pairs)]
    # Malformed rows now and then: a bad MaskPath, and with value_errors a bad value (a click
    # flag of 2) and a field too few.
    for k in range(0, len(lines), 17):
        lines.insert(k, lines[k].replace(".png", ".jpg"))
    if value_errors:
        lines[5::11] = [line[:-1] + "2" for line in lines[5::11]]
        lines[7::13] = [line.partition(",")[2] for line in lines[7::13]]
    shape_errors = sum(line.count(",") != 9 for line in lines)
    selection = {"per_class": per_class, "max_images": max_images, "seed": seed}
    # A folder per example (hypothesis runs many within one test), removed with it.
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seg.csv"
        path.write_text("\n".join([HEADER, *lines, ""]))
        # Pruning often (slack 0) moves rows out and back in; rarely, keeps them until the end.
        # Rows are checked and offered after every block (1), every few lines, or at the end.
        with (
            mock.patch.object(catalog._SelectionBound, "_PRUNE_SLACK", prune_slack),
            mock.patch.object(catalog._PendingRows, "_BATCH_LINES", batch_lines),
        ):
            _plans_agree(path, [PERSON, CAR, TRAFFIC_SIGN], chunksize, shape_errors, **selection)


@pytest.mark.parametrize("junk", [[], ["x" * 20_000], ["y," * 9_000, "z" * 9_000]])
def test_a_row_seen_before_its_image_is_chosen_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, junk: list[str]
) -> None:
    # Over-long lines before it are cut to stubs while reading: the line's place must not move.
    monkeypatch.setattr(catalog._SelectionBound, "_PRUNE_SLACK", 0)  # prune after every block
    monkeypatch.setattr(catalog._PendingRows, "_BATCH_LINES", 1)  # offer after every block
    read_again = []
    original = catalog._read_spans
    monkeypatch.setattr(catalog, "_read_spans", lambda *a: read_again.append(a) or original(*a))
    # The image's Person row comes first, while Person's best 2 are others; the image is chosen
    # only later, as the one Traffic sign image. Its Person row must then be read back.
    people = sorted(_ids(120, 5), key=lambda i: hash_order_key(i, 0))  # > 8 KiB, the first read
    late = people[-1]  # ranked last among Person images: never in Person's best 2
    lines = [*junk, _csv_line(late, PERSON.mid, 0), *junk]
    lines += [_csv_line(i, PERSON.mid, k) for k, i in enumerate(people[:-1], start=1)]
    lines += [_csv_line(late, TRAFFIC_SIGN.mid, 99)]
    path = tmp_path / "seg.csv"
    path.write_text("\n".join([HEADER, *lines, ""]))
    table = read_segmentations(
        str(path), [PERSON.mid, TRAFFIC_SIGN.mid], chunksize=16, selection=Selection(per_class=2)
    )
    assert set(table.rows["ImageID"]) == {late, *people[:2]}
    assert table.rows["LabelName"][table.rows["ImageID"] == late].tolist() == [
        PERSON.mid,
        TRAFFIC_SIGN.mid,
    ]
    assert len(read_again) == 1 and len(read_again[0][2]) == 1  # one line, in one read
    _plans_agree(path, [PERSON, TRAFFIC_SIGN], 16, 0, per_class=2)


def test_a_file_that_changes_between_reads_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    people = sorted(_ids(120, 5), key=lambda i: hash_order_key(i, 0))  # > 8 KiB, the first read
    lines = [_csv_line(people[-1], PERSON.mid, 0)]
    lines += [_csv_line(i, PERSON.mid, k) for k, i in enumerate(people[:-1], start=1)]
    lines += [_csv_line(people[-1], TRAFFIC_SIGN.mid, 99)]
    path = tmp_path / "seg.csv"
    path.write_text("\n".join([HEADER, *lines, ""]))
    monkeypatch.setattr(catalog._SelectionBound, "_PRUNE_SLACK", 0)
    monkeypatch.setattr(catalog._PendingRows, "_BATCH_LINES", 1)  # offer after every block
    original = catalog._read_spans

    def rewritten(*args: Any) -> bytes:  # the first line read again now holds another image
        return original(*args).replace(people[-1].encode(), people[0].encode())

    monkeypatch.setattr(catalog, "_read_spans", rewritten)
    with pytest.raises(OistreamError, match="changed while it was read") as error:
        read_segmentations(
            str(path),
            [PERSON.mid, TRAFFIC_SIGN.mid],
            chunksize=16,
            selection=Selection(per_class=2),
        )
    assert "\n" not in str(error.value)


def test_bounded_catalog_ranks_only_the_images_listed(tmp_path: Path) -> None:
    # --image-ids narrows the images first: the best N of those, not of all, are kept.
    images = _ids(80, 3)
    lines = [_csv_line(i, PERSON.mid, k) for k, i in enumerate(images)]
    lines += [_csv_line(i, CAR.mid, 100 + k) for k, i in enumerate(images[::2])]
    path = tmp_path / "seg.csv"
    path.write_text("\n".join([HEADER, *lines, ""]))
    listed = set(images[::3])
    mids = [PERSON.mid, CAR.mid]
    whole = read_segmentations(str(path), mids, chunksize=64)
    whole.rows = whole.rows.take(isin(whole.rows["ImageID"], listed))
    selection = Selection(per_class=4, seed=2, image_ids=listed)
    bounded = read_segmentations(str(path), mids, chunksize=64, selection=selection)
    expected = make_plan(whole, [PERSON, CAR], "train", per_class=4, seed=2)
    plan = make_plan(bounded, [PERSON, CAR], "train", per_class=4, seed=2)
    assert plan.num_samples >= 4 and set(plan.image_ids()) <= listed
    assert (plan.shard_ids, plan.plan_hash) == (expected.shard_ids, expected.plan_hash)


def test_a_block_is_ranked_in_slices_so_its_tail_is_not_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One block of 2,000 images, --max-images 10: once the first slice has been offered the
    # bound holds its 10 and most of the block ranks past it, so only a few slices' worth of
    # rows are parsed. Ranked as one, every row of the block was parsed (none had a bound yet).
    monkeypatch.setattr(catalog._PendingRows, "_BATCH_LINES", 100)
    parsed: list[int] = []
    original = catalog._parse_and_check_values
    monkeypatch.setattr(
        catalog,
        "_parse_and_check_values",
        lambda lines, candidates: parsed.append(len(candidates)) or original(lines, candidates),
    )
    images = _ids(2_000, 7)
    path = tmp_path / "seg.csv"
    lines = [_csv_line(i, PERSON.mid, k) for k, i in enumerate(images)]
    path.write_text("\n".join([HEADER, *lines, ""]))
    mids = [PERSON.mid]
    bounded = read_segmentations(str(path), mids, selection=Selection(max_images=10, seed=4))
    rows_parsed = sum(parsed)
    assert len(path.read_bytes()) < catalog._BLOCK_BYTES_PER_ROW * 250_000  # one block
    whole = read_segmentations(str(path), mids)
    expected = make_plan(whole, [PERSON], "train", max_images=10, seed=4)
    plan = make_plan(bounded, [PERSON], "train", max_images=10, seed=4)
    assert (plan.shard_ids, plan.plan_hash) == (expected.shard_ids, expected.plan_hash)
    # The first slice whole (100), then rows ranking within the falling bound: ~10 ln(2000/100).
    assert rows_parsed < 400, parsed


def test_a_row_left_unparsed_and_wanted_later_is_checked_when_read_again(tmp_path: Path) -> None:
    """Person's threshold falls first; X's Person row ranks past it and is left unparsed. X's
    Car row then makes Car take X, so the Person row is read again: bad there, it is counted
    as malformed (not taken for a file that changed), and the plan is the whole table's."""
    ids = [f"{n:016x}" for n in range(1, 400)]
    by_key = sorted(ids, key=lambda i: hash_order_key(i, 0))
    best, x, worse = by_key[0], by_key[10], by_key[20]
    bad_person_row = _csv_line(x, PERSON.mid, 1)[:-1] + "2"  # a click flag of 2
    # Rows of a class not asked for fill the first read (8 kB), so X's row is in a later block.
    filler = [_csv_line(f"{n:016x}", "/m/0unasked", n) for n in range(1000, 1100)]
    lines = [
        _csv_line(best, PERSON.mid, 0),
        *filler,
        bad_person_row,
        _csv_line(worse, CAR.mid, 2),
        _csv_line(x, CAR.mid, 3),
    ]
    path = tmp_path / "seg.csv"
    path.write_text("\n".join([HEADER, *lines, ""]))
    deferred: list[int] = []
    defer = catalog._SelectionBound.defer

    def counting_defer(self, starts, stops, keys) -> None:  # type: ignore[no-untyped-def]
        deferred.append(len(keys))
        defer(self, starts, stops, keys)

    with (
        mock.patch.object(catalog._SelectionBound, "defer", counting_defer),
        mock.patch.object(catalog._PendingRows, "_BATCH_LINES", 1),  # offer after every block
    ):
        # chunksize 1: a block per line after the first read, so Person is full before X's
        # Person row is scanned.
        bounded = read_segmentations(str(path), [PERSON.mid, CAR.mid], chunksize=1,
                                     selection=Selection(per_class=1))  # fmt: skip
    assert sum(deferred) == 1
    whole = read_segmentations(str(path), [PERSON.mid, CAR.mid], chunksize=1)
    assert bounded.malformed == whole.malformed == 1
    assert bounded.malformed_examples[0].startswith("at byte ")
    assert "Clicks" in bounded.malformed_examples[0]
    plan = make_plan(bounded, [PERSON, CAR], "train", per_class=1)
    assert plan.image_ids() == make_plan(whole, [PERSON, CAR], "train", per_class=1).image_ids()
    assert set(plan.image_ids()) == {best, x}
