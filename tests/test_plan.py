"""Selection and shard assignment: deterministic, per-class limits, hash order, not ID order."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from oistream.sharding.catalog import OIClass, SegmentationTable
from oistream.sharding.plan import hash_order_key, make_plan

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
    return SegmentationTable(
        rows=pd.DataFrame.from_records(records),
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


def test_max_images_caps_the_union() -> None:
    ids = _ids(30)
    plan = make_plan(_table([(i, PERSON.mid) for i in ids]), [PERSON], "test", max_images=7)
    assert plan.num_samples == 7


def test_samples_per_shard_must_be_positive() -> None:
    with pytest.raises(ValueError):
        make_plan(_table([]), [PERSON], "train", samples_per_shard=0)
