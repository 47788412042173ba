"""``oistream predict``: a checkpoint on a folder of JPEGs and on shards writes one JSON per
image, the challenge CSV and pictures; the CSV is proven right by predicting the ground truth.
"""

from __future__ import annotations

import base64
import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from shardfactory import classes_table, encode_jpeg, random_samples, write_shards

import oistream
from oistream import evaluation
from oistream.cli import main as oistream_main
from train import checkpoint as ckpt
from train.model import build_model, layout_for
from train.predict import PredictionWriter, predict, read_inputs

SIZE = (48, 64)  # height, width


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    samples = random_samples(5, seed=7, size=SIZE, max_instances=3, num_classes=2)
    write_shards(root / "shards", samples, samples_per_shard=2, split="validation", num_classes=2)
    (root / "jpegs").mkdir()
    for sample in samples[:3]:
        (root / "jpegs" / f"{sample.key}.jpg").write_bytes(encode_jpeg(sample.image))
    (root / "jpegs" / "notes.txt").write_text("not an image")
    layout = layout_for("v1", "none", None, "mobilenet_v3_large", channels=64)
    torch.manual_seed(0)
    model = build_model(layout, 2, min_size=64, max_size=64)
    state = {
        "model": model.state_dict(),
        "layout": layout.to_dict(),
        "classes": classes_table(2),
        "args": {"min_size": [64], "max_size": 64, "test_proposals": 100},
    }
    ckpt.save_checkpoint(state, root / "model.pt")
    return {"root": root, "shards": root / "shards", "jpegs": root / "jpegs"}


def decode_csv_mask(field: str, height: int, width: int) -> np.ndarray:
    counts = zlib.decompress(base64.b64decode(field))
    return mask_utils.decode({"size": [height, width], "counts": counts})


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    return rows


def check_outputs(out: Path, keys: list[str], pictures: int) -> list[dict[str, str]]:
    """JSON per image, CSV rows = JSON detections with the same masks, N pictures."""
    assert sorted(p.stem for p in (out / "json").glob("*.json")) == sorted(keys)
    rows = read_csv(out / "predictions.csv")
    assert (out / "predictions.csv").read_text().splitlines()[0] == (
        "ImageID,ImageWidth,ImageHeight,LabelName,Score,Mask"
    )
    detections = 0
    for key in keys:
        record = json.loads((out / "json" / f"{key}.json").read_text())
        assert (record["image_id"], record["height"], record["width"]) == (key, *SIZE)
        mine = [r for r in rows if r["ImageID"] == key]
        assert len(mine) == len(record["detections"])
        for row, det in zip(mine, record["detections"], strict=True):
            assert row["LabelName"] == det["label"] and det["name"] in ("Person", "Car")
            assert abs(float(row["Score"]) - det["score"]) < 1e-5
            rle = dict(det["mask"], counts=det["mask"]["counts"].encode())
            json_mask = mask_utils.decode(rle)
            if row["Mask"]:
                assert np.array_equal(decode_csv_mask(row["Mask"], *SIZE), json_mask)
            else:
                assert not json_mask.any()
        detections += len(record["detections"])
    assert len(rows) == detections
    drawn = sorted((out / "pictures").glob("*.png")) if (out / "pictures").exists() else []
    assert len(drawn) == pictures and all(p.stat().st_size > 0 for p in drawn)
    return rows


def test_predict_on_a_folder_of_jpegs(data: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    status = oistream_main(
        [
            "predict",
            "--checkpoint",
            str(data["root"] / "model.pt"),
            "--input",
            str(data["jpegs"]),
            "--out",
            str(out),
            "--pictures",
            "2",
            "--score-threshold",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert status == 0, capsys.readouterr().err
    keys = sorted(p.stem for p in data["jpegs"].glob("*.jpg"))
    rows = check_outputs(out, keys, pictures=2)
    assert rows, "with no score threshold a random model still detects something"


def test_predict_on_shards_and_on_one_image(data: dict[str, Path], tmp_path: Path) -> None:
    from train.predict import main

    model = str(data["root"] / "model.pt")
    out = tmp_path / "shards-out"
    assert main(["--checkpoint", model, "--input", str(data["shards"]), "--out", str(out)]) == 0
    keys = [target["image_key"] for _, target in oistream.ShardDataset(data["shards"], shuffle=0)]
    check_outputs(out, keys, pictures=4)
    single = next(data["jpegs"].glob("*.jpg"))
    out = tmp_path / "one"
    assert main(["--checkpoint", model, "--input", str(single), "--out", str(out)]) == 0
    check_outputs(out, [single.stem], pictures=1)


def test_the_csv_of_the_ground_truth_scores_one(data: dict[str, Path], tmp_path: Path) -> None:
    """Replace the model by the ground truth: the CSV's masks decode to the ground truth's,
    and scoring them gives mask mAP@0.5 1.0."""
    dataset = oistream.ShardDataset(data["shards"], shuffle=0, train=False, resolve_occlusion=False)
    truth = [target for _, target in dataset]
    queue = list(truth)

    def ground_truth(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            target = queue.pop(0)
            assert tuple(image.shape[-2:]) == tuple(target["masks"].shape[-2:])
            count = len(target["labels"])
            outputs.append(
                {
                    "boxes": target["boxes"],
                    "labels": target["labels"],
                    "scores": torch.linspace(1.0, 0.5, count) if count else torch.zeros(0),
                    "masks": target["masks"][:, None].float(),
                }
            )
        return outputs

    classes = classes_table(2)
    writer = PredictionWriter(str(tmp_path / "gt"), classes, pictures=1)
    predict(ground_truth, read_inputs(str(data["shards"]), {}), writer, batch_size=2)
    writer.close()
    assert not queue
    rows = read_csv(tmp_path / "gt" / "predictions.csv")
    for target in truth:
        key = target["image_key"]
        mine = [r for r in rows if r["ImageID"] == key]
        masks = np.stack([decode_csv_mask(r["Mask"], *SIZE) for r in mine]) if mine else None
        expected = target["masks"].numpy()
        assert len(mine) == len(expected)
        if mine:
            assert np.array_equal(masks, expected)
            assert {int(r["ImageWidth"]) for r in mine} == {SIZE[1]}
    assert sum(len(t["labels"]) for t in truth) > 3
    # The CSV as `oistream evaluate` reads it: the challenge metric of the ground truth is 1.
    shards = evaluation.load_ground_truth(str(data["shards"]))
    predictions = evaluation.read_predictions(str(tmp_path / "gt" / "predictions.csv"))
    result = evaluation.evaluate(shards.images, predictions, shards.classes, shards.hierarchy)
    assert result["open_images"]["map"] == 1.0


def test_bad_inputs_end_in_one_line(data: dict[str, Path], tmp_path: Path, capsys) -> None:
    model = str(data["root"] / "model.pt")
    cases = [
        ["--checkpoint", str(tmp_path / "missing.pt"), "--input", str(data["jpegs"])],
        ["--checkpoint", model, "--input", str(tmp_path / "nowhere")],
        ["--checkpoint", model, "--input", str(data["root"] / "model.pt")],  # not an image
    ]
    (tmp_path / "empty").mkdir()
    cases.append(["--checkpoint", model, "--input", str(tmp_path / "empty")])
    for argv in cases:
        assert oistream_main(["predict", *argv, "--out", str(tmp_path / "o")]) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert lines[-1].startswith("oistream predict: error: "), lines
        assert not any("Traceback" in line for line in lines)
