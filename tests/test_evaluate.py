"""The trainer's evaluation records: what the model predicts becomes challenge predictions."""

from __future__ import annotations

import io

import numpy as np
import torch

from oistream import evaluation as ev
from train.evaluate import EvalRecords, score_records

MIDS = [None, "/m/01g317", "/m/0k4j"]


def _rect(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    m = np.zeros((6, 8), np.float32)
    m[y0:y1, x0:x1] = 0.9
    return m


def test_records_binarise_drop_empty_masks_and_name_classes_by_mid() -> None:
    probabilities = np.stack([_rect(0, 0, 3, 3), np.full((6, 8), 0.2, np.float32)])
    prediction = {
        "masks": torch.from_numpy(probabilities)[:, None],
        "labels": torch.tensor([2, 1]),
        "scores": torch.tensor([0.75, 0.5]),
    }
    records = EvalRecords()
    records.add("abc", prediction, MIDS)
    first, second = records.predictions
    assert (first.label, first.score, first.height, first.width) == ("/m/0k4j", 0.75, 6, 8)
    decoded = ev._mask_api().decode(first.rle)
    assert decoded.sum() == 9 and decoded[:3, :3].all()
    assert second.label == "/m/01g317" and second.rle is None  # below 0.5 everywhere: empty
    stream = io.StringIO()
    ev.write_predictions_csv(records.predictions, stream)
    assert ev.parse_predictions_csv(stream.getvalue().encode()) == records.predictions


def test_an_image_without_detections_is_recorded_with_no_predictions() -> None:
    # A model early in training can return nothing for an image: masks of shape (0, 1, H, W).
    prediction = {
        "masks": torch.zeros((0, 1, 6, 8)),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
    }
    records = EvalRecords()
    records.add("nothing", prediction, MIDS)
    assert records.keys == ["nothing"] and records.predictions == []


def test_scores_count_only_the_images_evaluated(tmp_path) -> None:
    gt_mask = (_rect(0, 0, 3, 3) > 0).astype(np.uint8)
    obj = ev.GroundTruthObject("/m/0k4j", (0, 0, 3 / 8, 0.5), False, ev.encode_mask(gt_mask))
    images = [ev.GroundTruthImage(key, 8, 6, [obj], ["/m/0k4j"], []) for key in ("a", "b")]
    truth = ev.ShardGroundTruth(
        images, [("/m/01g317", "Person"), ("/m/0k4j", "Car")], ev.Hierarchy(None), True
    )
    records = EvalRecords()
    prediction = {
        "masks": torch.from_numpy(_rect(0, 0, 3, 3))[None, None],
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.6]),
    }
    records.add("a", prediction, MIDS)  # image "b" was not evaluated (e.g. --max-val-images)
    published: list[bytes] = []
    result = score_records(records, truth, published.append)
    assert result["images"] == 1 and result["open_images"]["map"] == 1.0
    assert ev.parse_predictions_csv(published[0]) == records.predictions
