"""Evaluation: COCO box and mask AP (pycocotools) and Open Images-style mask mAP@0.5.

Each rank runs the model over its share of the validation images and keeps, per image, only
compact records: the ground truth and predictions as RLE (for COCO) and, per class, each
prediction's score and whether it matched (for Open Images). Rank 0 gathers them and scores.

Open Images-style mAP@0.5 (``open_images_map``) follows the Open Images challenge's
``oid_challenge_evaluation`` (TF object_detection ``per_image_evaluation`` and
``metrics.compute_average_precision``) on masks:

* per image and class, predictions in descending score order; each takes the ground-truth mask
  it overlaps most (mask IoU); it is a true positive when that IoU is >= 0.5 and that ground
  truth is not already taken, a false positive otherwise (a duplicate of a taken object stays
  a false positive even if another, less overlapping object is still free);
* per class over all images, precision/recall in score order; AP is the area under the
  precision/recall curve with all-point interpolation (Pascal VOC 2010+ / Open Images:
  precision made monotone non-increasing from the right, summed over the recall steps);
* mAP = mean AP over classes that have ground truth (a class with ground truth and no
  prediction scores 0).

What the challenge does and this does not: hierarchy expansion of labels, group-of boxes and
verified negative image-level labels (these shards carry none: every instance counts and every
class is treated as exhaustively annotated).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .distributed import Ranks, gather_to_main
from .precision import Precision

MASK_THRESHOLD = 0.5  # torchvision's predicted masks are probabilities
OPEN_IMAGES_IOU = 0.5
COCO_STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


# -- encoding ---------------------------------------------------------------------------------


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """Binary masks [N, H, W] -> COCO RLEs with ``counts`` as str (JSON- and pickle-friendly)."""
    if len(masks) == 0:
        return []
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(fortran)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _xyxy_to_xywh(boxes: np.ndarray) -> list[list[float]]:
    return [[float(x0), float(y0), float(x1 - x0), float(y1 - y0)] for x0, y0, x1, y1 in boxes]


# -- Open Images matching and AP -------------------------------------------------------------


def match_open_images(iou: np.ndarray, iou_threshold: float = OPEN_IMAGES_IOU) -> np.ndarray:
    """True-positive flags of one image's predictions of one class (already in score order).

    ``iou[d, g]`` is the mask IoU of prediction d and ground truth g. Each prediction takes its
    best-overlapping ground truth; a taken or too-weak best match makes it a false positive.
    """
    num_pred = iou.shape[0]
    tp = np.zeros(num_pred, dtype=bool)
    if num_pred == 0 or iou.shape[1] == 0:
        return tp
    taken = np.zeros(iou.shape[1], dtype=bool)
    best = iou.argmax(axis=1)
    for d in range(num_pred):
        g = best[d]
        if iou[d, g] >= iou_threshold and not taken[g]:
            tp[d] = True
            taken[g] = True
    return tp


def average_precision(scores: np.ndarray, tp: np.ndarray, num_gt: int) -> float:
    """All-point interpolated AP (Pascal VOC 2010+, Open Images) of one class.

    ``scores``/``tp``: every prediction of the class over all images; ``num_gt``: its objects.
    """
    if num_gt == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.asarray(tp, dtype=np.float64)[order]
    true_pos = np.cumsum(hits)
    false_pos = np.cumsum(1.0 - hits)
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / num_gt
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    # Monotone envelope: precision at recall r is the best precision at any recall >= r.
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def open_images_map(per_class: dict[int, dict[str, Any]], class_ids: Iterable[int]) -> dict:
    """mAP over the classes with ground truth; ``per_class[c]`` = {scores, tp, num_gt}."""
    aps: dict[int, float] = {}
    for c in class_ids:
        record = per_class.get(c, {"scores": [], "tp": [], "num_gt": 0})
        ap = average_precision(
            np.asarray(record["scores"]), np.asarray(record["tp"]), record["num_gt"]
        )
        if not np.isnan(ap):
            aps[c] = ap
    mean = float(np.mean(list(aps.values()))) if aps else float("nan")
    return {"mAP@0.5": mean, "per_class": aps}


# -- per-image accumulation ------------------------------------------------------------------


@dataclass
class EvalRecords:
    """One rank's compact evaluation records (what travels to rank 0)."""

    images: list[dict[str, Any]] = field(default_factory=list)  # {key, height, width}
    gt: list[dict[str, Any]] = field(default_factory=list)  # {key, label, bbox, area, rle}
    dets: list[dict[str, Any]] = field(default_factory=list)  # {key, label, score, bbox, rle}
    oi: dict[int, dict[str, Any]] = field(default_factory=dict)  # class -> {scores, tp, num_gt}

    def add(self, key: str, target: dict[str, Any], prediction: dict[str, Any]) -> None:
        """Record one image: ``target`` as the loader gives it, ``prediction`` as the model does.

        Predicted masks (probabilities [N, 1, H, W]) are binarised at 0.5.
        """
        gt_masks = _numpy(target["masks"]).astype(np.uint8)
        height, width = gt_masks.shape[-2:] if gt_masks.ndim == 3 else (0, 0)
        gt_labels = _numpy(target["labels"]).astype(np.int64)
        gt_boxes = _numpy(target["boxes"]).astype(np.float64).reshape(-1, 4)
        pred_masks = _numpy(prediction["masks"])
        if pred_masks.ndim == 4:
            pred_masks = pred_masks[:, 0]
        if gt_masks.ndim != 3:
            height, width = pred_masks.shape[-2:]
            gt_masks = np.zeros((0, height, width), np.uint8)
        pred_masks = (pred_masks >= MASK_THRESHOLD).astype(np.uint8)
        pred_labels = _numpy(prediction["labels"]).astype(np.int64)
        pred_scores = _numpy(prediction["scores"]).astype(np.float64)
        pred_boxes = _numpy(prediction["boxes"]).astype(np.float64).reshape(-1, 4)

        gt_rles = encode_masks(gt_masks)
        pred_rles = encode_masks(pred_masks)
        areas = _numpy(target["area"]) if "area" in target else mask_utils.area(gt_rles)
        self.images.append({"key": key, "height": int(height), "width": int(width)})
        for i, (label, box, rle) in enumerate(
            zip(gt_labels, _xyxy_to_xywh(gt_boxes), gt_rles, strict=True)
        ):
            self.gt.append(
                {"key": key, "label": int(label), "bbox": box, "area": float(areas[i]), "rle": rle}
            )
        for label, score, box, rle in zip(
            pred_labels, pred_scores, _xyxy_to_xywh(pred_boxes), pred_rles, strict=True
        ):
            self.dets.append(
                {"key": key, "label": int(label), "score": float(score), "bbox": box, "rle": rle}
            )
        for c in np.union1d(gt_labels, pred_labels):
            gt_index = np.flatnonzero(gt_labels == c)
            pred_index = np.flatnonzero(pred_labels == c)
            pred_index = pred_index[np.argsort(-pred_scores[pred_index], kind="stable")]
            record = self.oi.setdefault(int(c), {"scores": [], "tp": [], "num_gt": 0})
            record["num_gt"] += len(gt_index)
            if len(pred_index) == 0:
                continue
            if len(gt_index):
                iou = mask_utils.iou(
                    [pred_rles[i] for i in pred_index],
                    [gt_rles[i] for i in gt_index],
                    [0] * len(gt_index),
                )
                iou = np.asarray(iou, dtype=np.float64).reshape(len(pred_index), len(gt_index))
            else:
                iou = np.zeros((len(pred_index), 0))
            record["scores"].extend(pred_scores[pred_index].tolist())
            record["tp"].extend(match_open_images(iou).tolist())

    def merge(self, other: EvalRecords) -> None:
        self.images += other.images
        self.gt += other.gt
        self.dets += other.dets
        for c, record in other.oi.items():
            mine = self.oi.setdefault(c, {"scores": [], "tp": [], "num_gt": 0})
            mine["scores"] += record["scores"]
            mine["tp"] += record["tp"]
            mine["num_gt"] += record["num_gt"]


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


# -- COCO ------------------------------------------------------------------------------------


def coco_metrics(records: EvalRecords, class_ids: Sequence[int]) -> dict[str, dict[str, float]]:
    """COCO AP/AR for boxes (``bbox``) and masks (``segm``); 0 everywhere without predictions."""
    image_ids = {image["key"]: i + 1 for i, image in enumerate(records.images)}
    dataset = {
        "images": [
            {"id": image_ids[im["key"]], "height": im["height"], "width": im["width"]}
            for im in records.images
        ],
        "categories": [{"id": int(c), "name": str(c)} for c in class_ids],
        "annotations": [
            {
                "id": n + 1,
                "image_id": image_ids[g["key"]],
                "category_id": g["label"],
                "bbox": g["bbox"],
                "area": g["area"],
                "iscrowd": 0,
                "segmentation": g["rle"],
            }
            for n, g in enumerate(records.gt)
        ],
    }
    results: dict[str, dict[str, float]] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        for iou_type in ("bbox", "segm"):
            if not records.dets or not records.gt:
                results[iou_type] = dict.fromkeys(COCO_STAT_NAMES, 0.0)
                continue
            detections = [
                {
                    "image_id": image_ids[d["key"]],
                    "category_id": d["label"],
                    "score": d["score"],
                    **({"bbox": d["bbox"]} if iou_type == "bbox" else {"segmentation": d["rle"]}),
                }
                for d in records.dets
            ]
            evaluator = COCOeval(gt, gt.loadRes(detections), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            results[iou_type] = {
                name: float(value)
                for name, value in zip(COCO_STAT_NAMES, evaluator.stats, strict=True)
            }
    return results


def score_records(records: EvalRecords, classes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Both metrics for the gathered records; ``classes`` is the manifest's list."""
    class_ids = [int(c["index"]) for c in classes if int(c["index"]) != 0]
    names = {int(c["index"]): c.get("name") for c in classes}
    oi = open_images_map(records.oi, class_ids)
    return {
        "images": len(records.images),
        "instances": len(records.gt),
        "detections": len(records.dets),
        "coco": coco_metrics(records, class_ids),
        "open_images": {
            "mAP@0.5": oi["mAP@0.5"],
            "per_class": {names[c]: ap for c, ap in oi["per_class"].items()},
        },
    }


# -- running the model -----------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[list[torch.Tensor], list[dict[str, Any]]]],
    *,
    classes: Sequence[dict[str, Any]],
    ranks: Ranks,
    precision: Precision,
    max_images: int | None = None,
    on_prediction: Callable[[torch.Tensor, dict[str, Any], dict[str, Any]], None] | None = None,
) -> dict[str, Any] | None:
    """Run ``model`` (unwrapped: no DDP collectives) over this rank's ``batches``.

    ``batches`` yield float images on the model's device and targets (masks may stay on the
    CPU); ``max_images`` counts over all ranks. Returns the scores on rank 0, ``None`` elsewhere.
    ``on_prediction(image, target, prediction)`` sees every image this rank evaluates.
    """
    was_training = model.training
    model.eval()
    records = EvalRecords()
    limit = None if max_images is None else -(-max_images // ranks.world_size)
    seen = 0
    try:
        for images, targets in batches:
            if limit is not None and seen >= limit:
                break
            if limit is not None:
                images, targets = images[: limit - seen], targets[: limit - seen]
            with precision.autocast():
                predictions = model(images)
            for image, target, prediction in zip(images, targets, predictions, strict=True):
                prediction = {
                    k: (v.float() if v.is_floating_point() else v).cpu()
                    for k, v in prediction.items()
                }
                key = str(target.get("image_key", f"rank{ranks.rank}-{seen}"))
                records.add(key, target, prediction)
                if on_prediction is not None:
                    on_prediction(image, target, prediction)
                seen += 1
    finally:
        model.train(was_training)
    parts = gather_to_main(records, ranks)
    if parts is None:
        return None
    merged = EvalRecords()
    for part in parts:
        merged.merge(part)
    return score_records(merged, classes)
