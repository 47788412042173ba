"""Evaluation annotations in the shards (from the fake bucket's box and label CSVs and its
hierarchy) and `oistream evaluate SHARDS PREDICTIONS` on them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from oistream import evaluation as ev
from oistream.cli import main
from oistream.sharding.annotations import BOX_HEADER, LABEL_HEADER
from oistream.testing.fakebucket import CAR, PERSON


def _shard(fake_bucket: Path, out: Path, *args: str) -> int:
    return main(
        [
            "shard",
            *args,
            "--out",
            str(out),
            "--images",
            str(fake_bucket / "open-images-dataset"),
            "--metadata",
            str(fake_bucket / "openimages"),
            "--quiet",
        ]
    )


@pytest.fixture(scope="module")
def val_shards(fake_bucket: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("val-shards")
    assert _shard(fake_bucket, out, "--classes", "Person", "Car", "--split", "validation") == 0
    return out


def test_fake_bucket_has_the_evaluation_files_at_the_real_paths(fake_bucket: Path) -> None:
    root = fake_bucket / "openimages"
    for split in ("validation", "test"):
        boxes = (root / "v5" / f"{split}-annotations-bbox.csv").read_text().splitlines()
        assert boxes[0] == BOX_HEADER
        labels = (root / "v5" / f"{split}-annotations-human-imagelabels-boxable.csv").read_text()
        assert labels.splitlines()[0] == LABEL_HEADER
        rows = list(csv.DictReader(labels.splitlines()))
        assert {r["Confidence"] for r in rows} == {"0", "1"}  # negatives too
        box_rows = list(csv.DictReader(boxes))
        assert any(r["IsGroupOf"] == "1" for r in box_rows)
        boxed = {(r["ImageID"], r["LabelName"]) for r in box_rows}
        positives = {(r["ImageID"], r["LabelName"]) for r in rows if r["Confidence"] == "1"}
        assert positives - boxed  # verified present, never boxed
    train = root / "2018_04" / "train" / "train-annotations-bbox.csv"
    assert train.read_text().splitlines()[0] == BOX_HEADER
    tree = json.loads((root / "2018_04" / "bbox_labels_600_hierarchy.json").read_text())
    assert ev.Hierarchy(tree).to_ancestors(CAR) == [CAR, "/m/01prls", "/m/07yv9"]


def test_validation_shards_carry_labels_boxes_and_the_hierarchy(val_shards: Path) -> None:
    manifest = json.loads((val_shards / "manifest.json").read_text())
    assert manifest["hierarchy"]["LabelName"] == "/m/0bl9f"
    truth = ev.load_ground_truth(str(val_shards))
    assert truth.annotated and truth.classes == [(PERSON, "Person"), (CAR, "Car")]
    objects = [o for image in truth.images for o in image.objects]
    assert any(o.rle is None for o in objects)  # boxes without masks reached the shards
    assert any(o.is_group_of for o in objects)
    assert sum(o.rle is not None for o in objects) == manifest["totals"]["instances"]
    assert all(
        o.rle["size"] == [im.height, im.width]
        for im in truth.images
        for o in im.objects
        if o.rle is not None
    )


def test_train_shards_carry_no_annotations_unless_asked(fake_bucket: Path, tmp_path: Path) -> None:
    plain, annotated = tmp_path / "plain", tmp_path / "annotated"
    common = ["--classes", "Car", "--split", "train", "--max-images", "4"]
    assert _shard(fake_bucket, plain, *common) == 0
    assert _shard(fake_bucket, annotated, *common, "--evaluation-annotations") == 0
    assert not ev.load_ground_truth(str(plain)).annotated
    assert ev.load_ground_truth(str(annotated)).annotated


def test_expand_hierarchy_selects_the_segmentable_descendants(
    fake_bucket: Path, tmp_path: Path
) -> None:
    assert (
        _shard(
            fake_bucket,
            tmp_path,
            "--classes",
            "Vehicle",
            "--expand-hierarchy",
            "--split",
            "validation",
        )
        == 0
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    names = [c["name"] for c in manifest["classes"][1:]]
    # Land vehicle's segmentable children in hierarchy order (Vehicle itself has no masks).
    assert names == ["Car", "Bus", "Truck", "Motorcycle", "Bicycle"]


def _perfect_predictions(truth: ev.ShardGroundTruth) -> list[ev.Prediction]:
    preds = []
    for image in truth.images:
        for k, o in enumerate(image.objects):
            if o.rle is not None:
                preds.append(
                    ev.Prediction(
                        image.image_id, o.label, 0.5 + k / 100, o.rle, image.height, image.width
                    )
                )
    return preds


def test_evaluate_scores_the_ground_truth_as_perfect_from_csv_and_json(
    val_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    truth = ev.load_ground_truth(str(val_shards))
    preds = _perfect_predictions(truth)
    csv_path = tmp_path / "predictions.csv"
    with csv_path.open("w") as f:
        ev.write_predictions_csv(preds, f)
    json_path = tmp_path / "predictions.json"
    json_path.write_text(
        json.dumps(
            [
                {
                    "image_id": p.image_id,
                    "label": p.label,
                    "score": p.score,
                    "mask": {"size": [p.height, p.width], "counts": p.rle["counts"].decode()},
                }
                for p in preds
            ]
        )
    )
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(val_shards), str(csv_path), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed == written
    assert written["open_images"]["map"] == 1.0
    assert written["open_images"]["per_class"] == {"Person": 1.0, "Car": 1.0}
    assert written["open_images"]["num_images"] == len(truth.images)
    assert written["coco"]["mask"]["AP"] == pytest.approx(1.0)
    assert main(["evaluate", str(val_shards), str(json_path)]) == 0
    assert json.loads(capsys.readouterr().out) == written


def test_evaluate_bad_predictions_end_in_one_line(
    val_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("ImageID,ImageWidth,ImageHeight,LabelName,Score,Mask\nabc,10,10,/m/0k4j,high,\n")
    assert main(["evaluate", str(val_shards), str(bad)]) != 0
    err = capsys.readouterr().err.strip()
    assert "line 2" in err and "Score" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert main(["evaluate", str(tmp_path), str(bad)]) != 0
    assert "manifest.json" in capsys.readouterr().err


def test_a_shifted_prediction_scores_below_perfect(val_shards: Path) -> None:
    truth = ev.load_ground_truth(str(val_shards))
    preds = _perfect_predictions(truth)
    # Replace the first prediction by a mask in the opposite corner: one miss, one FP.
    first = preds[0]
    m = np.zeros((first.height, first.width), np.uint8)
    m[:2, :2] = 1
    preds[0] = ev.Prediction(
        first.image_id, first.label, 0.99, ev.encode_mask(m), first.height, first.width
    )
    result = ev.evaluate(truth.images, preds, truth.classes, truth.hierarchy)
    assert result["open_images"]["map"] < 1.0


def test_malformed_annotation_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    import pandas as pd

    from oistream.sharding.annotations import read_annotations

    v5 = tmp_path / "v5"
    v5.mkdir()
    image = "0123456789abcdef"
    (v5 / "validation-annotations-bbox.csv").write_bytes(
        (
            BOX_HEADER + "\n"
            f"{image},xclick,{CAR},1,0.1,0.5,0.2,0.6,0,0,1,0,0\n"
            f"{image},xclick,{CAR},1,0.9,0.5,0.2,0.6,0,0,0,0,0\n"  # xmin > xmax
            f"{image},xclick,{CAR},1,zero,0.5,0.2,0.6,0,0,0,0,0\n"
            f"{image},xclick,{CAR},1,0.1,0.5\n"  # too few fields
            f"{image},xclick,{CAR},1,0.1,\xff\xfe,0.2,0.6,0,0,0,0,0\n"
            f"ffffffffffffffff,xclick,{CAR},1,0.1,0.5,0.2,0.6,0,0,0,0,0\n"
        ).encode("latin-1")
    )
    (v5 / "validation-annotations-human-imagelabels-boxable.csv").write_text(
        LABEL_HEADER + f"\n{image},verification,{CAR},1\n{image},verification,{PERSON},0\n"
        f"{image},verification,{PERSON},maybe\n"
    )
    empty = pd.DataFrame(
        columns=["ImageID", "LabelName", "BoxXMin", "BoxYMin", "BoxXMax", "BoxYMax"]
    )
    found = read_annotations(str(tmp_path), "validation", [image], {CAR, PERSON}, empty)
    fields = found.per_image[image]
    assert fields["boxes"] == [
        {"label": CAR, "box": [0.1, 0.2, 0.5, 0.6], "is_group_of": True, "has_mask": False}
    ]
    assert fields["image_labels"] == {"positive": [CAR], "negative": [PERSON]}
    assert found.malformed_rows == 5
