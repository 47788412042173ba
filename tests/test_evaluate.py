"""Evaluation: Open Images-style mask mAP@0.5 and COCO AP against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from train.evaluate import (
    EvalRecords,
    average_precision,
    encode_masks,
    match_open_images,
    score_records,
)

CLASSES = [
    {"index": 0, "mid": None, "name": "background"},
    {"index": 1, "mid": "/m/01g317", "name": "Person"},
    {"index": 2, "mid": "/m/0k4j", "name": "Car"},
]


def rect(y0: int, x0: int, y1: int, x1: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def target(masks: list[np.ndarray], labels: list[int]) -> dict:
    stacked = np.stack(masks).astype(np.uint8)
    boxes = []
    for m in stacked:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return {
        "masks": torch.from_numpy(stacked),
        "labels": torch.tensor(labels),
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "area": torch.from_numpy(stacked.reshape(len(stacked), -1).sum(1).astype(np.float32)),
    }


def prediction(masks: list[np.ndarray], labels: list[int], scores: list[float]) -> dict:
    """Model-shaped output: float mask probabilities [N, 1, H, W]."""
    t = target(masks, labels)
    return {
        "masks": t["masks"].float()[:, None],
        "labels": t["labels"],
        "boxes": t["boxes"],
        "scores": torch.tensor(scores),
    }


def scored(*images: tuple[dict, dict]) -> dict:
    records = EvalRecords()
    for i, (gt, pred) in enumerate(images):
        records.add(f"img{i}", gt, pred)
    return score_records(records, CLASSES)


def test_all_point_ap_of_a_hand_computed_ranking() -> None:
    # Ranked TP, FP, TP with 2 objects: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    # Envelope: 1 up to recall 1/2, then 2/3: AP = 0.5 * 1 + 0.5 * 2/3.
    ap = average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1]), num_gt=2)
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)
    # Order comes from the scores, not the input order.
    shuffled = average_precision(np.array([0.7, 0.9, 0.8]), np.array([1, 1, 0]), num_gt=2)
    assert shuffled == pytest.approx(ap)
    assert average_precision(np.array([0.5]), np.array([1]), num_gt=4) == pytest.approx(0.25)
    assert average_precision(np.array([]), np.array([]), num_gt=3) == 0.0
    assert np.isnan(average_precision(np.array([0.5]), np.array([0]), num_gt=0))


def test_matching_takes_the_best_overlap_and_counts_duplicates_as_false() -> None:
    iou = np.array(
        [
            [0.9, 0.6],  # takes object 0
            [0.8, 0.55],  # best is object 0, already taken: false positive (Open Images rule)
            [0.1, 0.7],  # takes object 1
            [0.3, 0.4],  # below 0.5
        ]
    )
    assert match_open_images(iou).tolist() == [True, False, True, False]
    assert match_open_images(np.zeros((2, 0))).tolist() == [False, False]


def test_rle_encoding_round_trips_with_str_counts() -> None:
    masks = np.stack([rect(2, 3, 10, 20), rect(0, 0, 48, 1)])
    rles = encode_masks(masks)
    assert all(isinstance(r["counts"], str) for r in rles)
    decoded = mask_utils.decode([{**r, "counts": r["counts"].encode()} for r in rles])
    assert np.array_equal(decoded.transpose(2, 0, 1), masks)


def test_predictions_equal_to_ground_truth_score_one() -> None:
    a, b, c = rect(2, 2, 20, 30), rect(25, 30, 45, 60), rect(5, 40, 18, 62)
    d = rect(10, 5, 40, 25)
    result = scored(
        (target([a, b, c], [1, 1, 2]), prediction([a, b, c], [1, 1, 2], [0.9, 0.8, 0.7])),
        (target([d], [2]), prediction([d], [2], [0.95])),
    )
    assert result["open_images"]["mAP@0.5"] == pytest.approx(1.0)
    assert result["open_images"]["per_class"] == {"Person": 1.0, "Car": 1.0}
    assert result["coco"]["segm"]["AP"] == pytest.approx(1.0)
    assert result["coco"]["bbox"]["AP"] == pytest.approx(1.0)
    assert result["images"] == 2 and result["instances"] == 4


def test_perturbed_predictions_score_lower() -> None:
    a, b = rect(4, 4, 24, 34), rect(20, 30, 44, 60)
    gt = target([a, b], [1, 2])
    slightly = prediction([np.roll(a, 3, axis=1), np.roll(b, 3, axis=0)], [1, 2], [0.9, 0.8])
    result = scored((gt, slightly))
    # IoU about 0.85: still a match at 0.5, but not at COCO's stricter thresholds.
    assert result["open_images"]["mAP@0.5"] == pytest.approx(1.0)
    assert result["coco"]["segm"]["AP"] < 0.9
    far = prediction([np.roll(a, 15, axis=1), b], [1, 2], [0.9, 0.8])
    far_result = scored((gt, far))
    assert far_result["open_images"]["per_class"]["Person"] == 0.0
    assert far_result["open_images"]["mAP@0.5"] == pytest.approx(0.5)
    wrong_class = scored((gt, prediction([a, b], [2, 1], [0.9, 0.8])))
    assert wrong_class["open_images"]["mAP@0.5"] == 0.0


def test_open_images_map_matches_a_hand_computed_case() -> None:
    # Person: 2 objects; ranked TP (0.9), FP (0.8, IoU < 0.5), TP (0.7) -> AP 0.8333.
    # Car: 1 object, no prediction -> AP 0. Background class 3 never appears.
    p1, p2, car = rect(0, 0, 20, 20), rect(25, 30, 45, 60), rect(5, 40, 20, 62)
    miss = rect(0, 10, 20, 30)  # IoU with p1 = 200 / 600
    result = scored(
        (
            target([p1, p2, car], [1, 1, 2]),
            prediction([p1, miss, p2], [1, 1, 1], [0.9, 0.8, 0.7]),
        )
    )
    per_class = result["open_images"]["per_class"]
    assert per_class["Person"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert per_class["Car"] == 0.0
    assert result["open_images"]["mAP@0.5"] == pytest.approx((0.5 + 0.5 * 2 / 3) / 2)


def test_coco_ap_of_half_recall_is_51_of_101_points() -> None:
    # One exact prediction for two objects: precision 1 at the 51 recall thresholds 0..0.50,
    # nothing beyond, at every IoU threshold -> AP = 51/101. AP50 the same; AR100 = 0.5.
    a, b = rect(2, 2, 20, 30), rect(25, 30, 45, 60)
    result = scored((target([a, b], [1, 1]), prediction([a], [1], [0.9])))
    for kind in ("segm", "bbox"):
        assert result["coco"][kind]["AP"] == pytest.approx(51 / 101)
        assert result["coco"][kind]["AP50"] == pytest.approx(51 / 101)
        assert result["coco"][kind]["AR100"] == pytest.approx(0.5)
    assert result["open_images"]["mAP@0.5"] == pytest.approx(0.5)


def test_no_predictions_score_zero_and_records_merge() -> None:
    a = rect(2, 2, 20, 30)
    empty = {
        "masks": torch.zeros(0, 1, 48, 64),
        "labels": torch.zeros(0, dtype=torch.int64),
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
    }
    first, second = EvalRecords(), EvalRecords()
    first.add("one", target([a], [1]), empty)
    second.add("two", target([a], [1]), prediction([a], [1], [0.6]))
    assert score_records(first, CLASSES)["coco"]["segm"]["AP"] == 0.0
    first.merge(second)
    merged = score_records(first, CLASSES)
    assert merged["images"] == 2
    # One of two objects found, at the only score: AP 0.5 (Open Images), 51/101 (COCO).
    assert merged["open_images"]["mAP@0.5"] == pytest.approx(0.5)
    assert merged["coco"]["segm"]["AP"] == pytest.approx(51 / 101)
