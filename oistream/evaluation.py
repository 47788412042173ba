"""`oistream evaluate`: the Open Images challenge instance-segmentation metric, and COCO AP.

Importable without torch. The Open Images number is the challenge's metric (tensorflow/models
``object_detection``: ``metrics/oid_challenge_evaluation.py`` driving
``OpenImagesInstanceSegmentationChallengeEvaluator``, ``utils/per_image_evaluation.py``,
``utils/metrics.py``, with the ground truth expanded as
``dataset_tools/oid_hierarchical_labels_expansion.py`` does). Written from reading that code:

* **Hierarchy expansion** (``Subcategory`` links only, not ``Part``; the root is skipped): every
  object is repeated for each ancestor, once per entry of the tool's ancestor list (a class
  reached by several paths can repeat an ancestor, and then so does its object); positive
  image-level labels go to the ancestors, negative ones to the descendants.
* **Verified classes only**: an image's detections of a class that is neither among its
  (expanded) image-level labels, positive or negative, nor among its objects' classes are
  ignored. Detections on an image without ground truth are ignored.
* **Empty predicted masks are dropped**: the challenge derives a detection's box from its mask
  and drops invalid boxes.
* **Matching**, per image and class, detections in the order ``np.argsort(scores)[::-1]``
  (equal scores in whatever order numpy's default sort gives them, reversed; for short arrays
  that is reversed input order): first against objects with masks that are not group-of (mask
  IoU >= 0.5 with the best-overlapping one, argmax taking the first of equal overlaps, a taken
  best match leaves the detection a false positive), then group-of objects with masks
  (intersection over the detection's area >= 0.5: ignored, or weight ``group_of_weight``, 0 in
  the instance-segmentation challenge), then objects with a box but no mask by box IoU (a
  detection matching one is ignored), then group-of boxes without masks by box IoA (ignored).
  Mask arithmetic is float32 as in ``np_mask_ops``; box arithmetic float64 as in ``np_box_ops``.
* **Counting**: objects without masks and group-of objects (weight 0) are not ground truth; a
  class's AP is VOC all-point AP over its detections concatenated image by image in ImageID
  order and sorted again with ``np.argsort(...)[::-1]``; mAP is the mean over the classes with
  ground truth.

Masks are COCO RLEs throughout. Intersections come from the RLE library (exact integers), so
the float32 quotients equal those of the challenge's dense ``np.minimum`` sums.

COCO AP (box and mask) is faster-coco-eval's (pycocotools' numbers; pycocotools is the fallback
when faster-coco-eval is not installed). Box AP uses each mask's tight box.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import io
import json
import math
import re
import sys
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oistream.errors import OistreamError

IOU_THRESHOLD = 0.5
# The instance-segmentation challenge's weight of group-of objects (detections inside ignored).
GROUP_OF_WEIGHT = 0.0
# ``np_mask_ops.EPSILON``: the challenge divides by max(union, EPSILON) and by area + EPSILON.
_EPSILON = np.float32(1e-7)
# ``non_max_suppression``'s score_threshold: detections scoring at most this are dropped.
_SCORE_FLOOR = -10.0
PREDICTION_COLUMNS = ("ImageID", "ImageWidth", "ImageHeight", "LabelName", "Score", "Mask")
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
MAX_SIDE = 1 << 15  # no Open Images image is this large; keeps H*W inside 2**30
_MAX_FIELD = 1 << 24  # the longest prediction field read (a mask's base64 text)
_RLE_COUNTS = re.compile(rb"[0-o]*")  # COCO RLE strings use characters 48..111
_RUN_TOO_LONG = re.compile(rb"[P-o]{6}")  # >6 characters in one run: over 30 bits
_HIERARCHY_DEPTH = 64
_MAX_MASK_PIXELS = 1 << 26  # real masks are about 1600x1200; a larger PNG is a bomb


def _mask_api():
    try:
        from faster_coco_eval.core import mask
    except ImportError:  # pragma: no cover - the fallback
        from pycocotools import mask
    return mask


# -- hierarchy -------------------------------------------------------------------------------


class Hierarchy:
    """Ancestor and descendant lists of ``bbox_labels_600_hierarchy.json``, as the challenge's
    expansion tool builds them (``Subcategory`` only, root skipped, multiplicities kept)."""

    def __init__(self, tree: dict[str, Any] | None) -> None:
        self.ancestors: dict[str, list[str]] = {}
        self.descendants: dict[str, list[str]] = {}
        if tree:
            if not isinstance(tree, dict) or not isinstance(tree.get("LabelName"), str):
                raise OistreamError("the class hierarchy is not {'LabelName', 'Subcategory'}")
            self.descendants, self.ancestors, _ = _plain_hierarchy(tree, True, 0)

    def to_ancestors(self, label: str) -> list[str]:
        """``label`` and the tool's ancestor list of it (boxes, positive labels)."""
        return [label, *self.ancestors.get(label, ())]

    def to_descendants(self, label: str) -> list[str]:
        """``label`` and its descendants (negative labels)."""
        return [label, *self.descendants.get(label, ())]


def _plain_hierarchy(
    node: dict[str, Any], skip_root: bool, depth: int
) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    # The same walk as the tool's _build_plain_hierarchy: a node met on several paths extends
    # its lists, so the multiplicities (and hence the expanded rows) are the tool's.
    if depth > _HIERARCHY_DEPTH:
        raise OistreamError(f"the class hierarchy is nested deeper than {_HIERARCHY_DEPTH}")
    keyed_parent: dict[str, list[str]] = {}
    keyed_child: dict[str, list[str]] = {}
    children: list[str] = []
    subcategories = node.get("Subcategory", [])
    if not isinstance(subcategories, list):
        raise OistreamError("the class hierarchy has a Subcategory that is not a list")
    for sub in subcategories:
        if not isinstance(sub, dict) or not isinstance(sub.get("LabelName"), str):
            raise OistreamError("the class hierarchy has a node without a LabelName")
        parents, childs, below = _plain_hierarchy(sub, False, depth + 1)
        for key, values in parents.items():
            keyed_parent.setdefault(key, []).extend(values)
        for key, values in childs.items():
            keyed_child.setdefault(key, []).extend(values)
        children.extend(below)
    if not skip_root:
        name = node["LabelName"]
        keyed_parent[name] = children
        children = [name, *children]
        for values in keyed_child.values():
            values.append(name)
        keyed_child[name] = []
    return keyed_parent, keyed_child, children


def descendant_mids(tree: dict[str, Any], mid: str) -> list[str]:
    """The distinct descendants of ``mid`` in the hierarchy, in first-seen order."""
    return list(dict.fromkeys(Hierarchy(tree).descendants.get(mid, [])))


# -- data ------------------------------------------------------------------------------------


@dataclass
class GroundTruthObject:
    """One annotated object: a mask (RLE at the image's size) or a box only (``rle`` None)."""

    label: str
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax, normalised
    is_group_of: bool = False
    rle: dict[str, Any] | None = None


@dataclass
class GroundTruthImage:
    """An image's annotations: objects and human-verified image-level labels (MIDs)."""

    image_id: str
    width: int
    height: int
    objects: list[GroundTruthObject] = field(default_factory=list)
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)


@dataclass
class Prediction:
    """One predicted mask: ``rle`` ``{"size": [H, W], "counts": bytes}`` or None (empty)."""

    image_id: str
    label: str
    score: float
    rle: dict[str, Any] | None
    height: int
    width: int


# -- the Open Images challenge metric --------------------------------------------------------


@dataclass
class _ClassRecord:
    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    num_gt: float = 0.0


def open_images_metric(
    ground_truth: Sequence[GroundTruthImage],
    predictions: Iterable[Prediction],
    classes: Sequence[tuple[str, str]],
    hierarchy: Hierarchy | None = None,
    group_of_weight: float = GROUP_OF_WEIGHT,
) -> dict[str, Any]:
    """The challenge's mAP@0.5 on masks: ``{"map", "per_class": {name: AP}, "num_images"}``.

    ``classes``: (MID, display name) of the evaluated classes (the challenge's label map);
    objects, labels and detections of other classes are left out.
    """
    hierarchy = hierarchy or Hierarchy(None)
    mask = _mask_api()
    index = {mid: i for i, (mid, _) in enumerate(classes)}
    records = [_ClassRecord() for _ in classes]
    expanded = {gt.image_id: _expand(gt, hierarchy, index) for gt in ground_truth}
    for image in expanded.values():
        for c, objects in image["objects"].items():
            counted = [o for o in objects if o.rle is not None and _area(mask, o.rle) > 0]
            plain = sum(1 for o in counted if not o.is_group_of)
            records[c].num_gt += plain + group_of_weight * (len(counted) - plain)
    by_image: dict[str, list[Prediction]] = {}
    for p in predictions:
        if p.image_id in expanded and p.label in index:
            by_image.setdefault(p.image_id, []).append(p)
    # The challenge adds images in pandas groupby order: sorted ImageIDs.
    for image_id in sorted(by_image):
        image = expanded[image_id]
        per_class: dict[int, list[Prediction]] = {}
        for p in by_image[image_id]:
            c = index[p.label]
            if c in image["verified"]:
                per_class.setdefault(c, []).append(p)
        for c in sorted(per_class):
            scores, labels = _match_class(
                mask,
                per_class[c],
                image["objects"].get(c, []),
                (image["height"], image["width"]),
                group_of_weight,
            )
            if len(scores):
                records[c].scores.append(scores)
                records[c].labels.append(labels)
    aps = np.full(len(classes), np.nan)
    for c, record in enumerate(records):
        if record.num_gt == 0:
            continue
        scores = np.concatenate(record.scores) if record.scores else np.array([], float)
        labels = np.concatenate(record.labels) if record.labels else np.array([], float)
        aps[c] = average_precision(scores, labels, record.num_gt)
    per_class_ap = {
        _unique_name(classes, c): float(aps[c]) for c in range(len(classes)) if records[c].num_gt
    }
    with np.errstate(all="ignore"), contextlib.suppress(RuntimeWarning):
        mean = float(np.nanmean(aps)) if per_class_ap else float("nan")
    return {"map": mean, "per_class": per_class_ap, "num_images": len(expanded)}


def _unique_name(classes: Sequence[tuple[str, str]], c: int) -> str:
    mid, name = classes[c]
    if sum(1 for _, other in classes if other == name) > 1:
        return f"{name} ({mid})"
    return name


def _expand(gt: GroundTruthImage, hierarchy: Hierarchy, index: dict[str, int]) -> dict[str, Any]:
    objects: dict[int, list[GroundTruthObject]] = {}
    verified: set[int] = set()
    for obj in gt.objects:
        for label in hierarchy.to_ancestors(obj.label):
            if label in index:
                objects.setdefault(index[label], []).append(obj)
                verified.add(index[label])
    for mid in gt.positive:
        verified.update(index[m] for m in hierarchy.to_ancestors(mid) if m in index)
    for mid in gt.negative:
        verified.update(index[m] for m in hierarchy.to_descendants(mid) if m in index)
    return {"objects": objects, "verified": verified, "height": gt.height, "width": gt.width}


def _area(mask: Any, rle: dict[str, Any]) -> int:
    return int(mask.area([rle])[0])


def _match_class(
    mask: Any,
    detections: list[Prediction],
    objects: list[GroundTruthObject],
    size: tuple[int, int],
    group_of_weight: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and weighted TP labels of one image's detections of one class (the challenge's
    ``_compute_tp_fp_for_single_class`` in mask mode)."""
    height, width = size
    kept = [d for d in detections if d.rle is not None and d.score > _SCORE_FLOOR]
    det_rles = [d.rle for d in kept]
    det_area = mask.area(det_rles).astype(np.int64) if kept else np.zeros(0, np.int64)
    nonempty = det_area > 0  # an empty mask gives the invalid box (0, 0, 0, 0): dropped
    kept = [d for d, ok in zip(kept, nonempty, strict=True) if ok]
    if not kept:
        return np.array([], float), np.array([], float)
    det_rles = [d.rle for d in kept]
    det_area = det_area[nonempty]
    scores = np.array([d.score for d in kept], dtype=float)
    order = np.argsort(scores)[::-1]  # the challenge's sort_by_field: ties reversed
    scores = scores[order]
    det_rles = [det_rles[i] for i in order]
    det_area = det_area[order]
    n = len(kept)
    if not objects:
        return scores, np.zeros(n, dtype=float)

    with_mask = [o for o in objects if o.rle is not None and _area(mask, o.rle) > 0]
    box_only = [o for o in objects if o.rle is None or _area(mask, o.rle) == 0]
    mask_plain = [o for o in with_mask if not o.is_group_of]
    mask_group = [o for o in with_mask if o.is_group_of]
    box_plain = [o for o in box_only if not o.is_group_of]
    box_group = [o for o in box_only if o.is_group_of]

    det_area32 = det_area.astype(np.float32)
    iou_mask = _mask_iou(mask, det_rles, det_area32, mask_plain)
    ioa_mask = _mask_ioa(mask, det_rles, det_area32, mask_group)
    if box_only:
        det_boxes = _boxes_of_masks(mask, det_rles, height, width)
        iou_box = _box_iou(det_boxes, _yx_boxes(box_plain))
        ioa_box = _box_ioa(det_boxes, _yx_boxes(box_group))
    else:
        iou_box = ioa_box = np.zeros((n, 0))

    tp = np.zeros(n, dtype=bool)
    to_group_of = np.zeros(n, dtype=bool)
    to_box = np.zeros(n, dtype=bool)

    def match_iou(iou: np.ndarray, is_box: bool) -> None:
        best = np.argmax(iou, axis=1)
        taken = np.zeros(iou.shape[1], dtype=bool)
        for i in range(n):
            g = best[i]
            if not tp[i] and not to_group_of[i] and iou[i, g] >= IOU_THRESHOLD and not taken[g]:
                tp[i] = True
                taken[g] = True
                to_box[i] = is_box

    def match_ioa(ioa: np.ndarray, is_box: bool) -> tuple[np.ndarray, np.ndarray]:
        group_scores = np.zeros(ioa.shape[1], dtype=float)
        weights = group_of_weight * np.ones(ioa.shape[1], dtype=float)
        best = np.argmax(ioa, axis=1)
        for i in range(n):
            g = best[i]
            if not tp[i] and ioa[i, g] >= IOU_THRESHOLD and not to_group_of[i]:
                to_group_of[i] = True
                to_box[i] = is_box
                group_scores[g] = max(group_scores[g], scores[i])
        chosen = (group_scores > 0) & (weights > 0)
        return group_scores[chosen], weights[chosen]

    group_scores = np.zeros(0, dtype=float)
    group_labels = np.zeros(0, dtype=float)
    if iou_mask.shape[1]:
        match_iou(iou_mask, False)
    if ioa_mask.shape[1]:
        group_scores, group_labels = match_ioa(ioa_mask, False)
    if iou_box.shape[1]:
        match_iou(iou_box, True)
    if ioa_box.shape[1]:
        match_ioa(ioa_box, True)  # their weights count in box mode only: not here
    valid = ~to_group_of & ~to_box
    return (
        np.concatenate((scores[valid], group_scores)),
        np.concatenate((tp[valid].astype(float), group_labels)),
    )


def _intersections(
    mask: Any, det_rles: list, det_area: np.ndarray, objects: list[GroundTruthObject]
) -> np.ndarray:
    """Exact pixel intersections [detections, objects] from the RLE library.

    With the crowd flag, the library's overlap is intersection / detection area, computed in
    double from integers below 2**30; multiplying back and rounding recovers the integer."""
    if not objects:
        return np.zeros((len(det_rles), 0), dtype=np.float64)
    overlap = np.asarray(
        mask.iou(det_rles, [o.rle for o in objects], [1] * len(objects)), dtype=np.float64
    ).reshape(len(det_rles), len(objects))
    return np.rint(np.maximum(overlap, 0.0) * det_area.astype(np.float64)[:, None])


def _mask_iou(
    mask: Any, det_rles: list, det_area32: np.ndarray, objects: list[GroundTruthObject]
) -> np.ndarray:
    # np_mask_ops.iou: float32 intersection / max(area1 + area2 - intersection, EPSILON).
    inter = _intersections(mask, det_rles, det_area32, objects).astype(np.float32)
    if not objects:
        return inter
    gt_area = mask.area([o.rle for o in objects]).astype(np.float32)
    union = det_area32[:, None] + gt_area[None, :] - inter
    return inter / np.maximum(union, _EPSILON)


def _mask_ioa(
    mask: Any, det_rles: list, det_area32: np.ndarray, objects: list[GroundTruthObject]
) -> np.ndarray:
    # np_mask_ops.ioa(group_of, detections), transposed: intersection / (detection area + EPS).
    inter = _intersections(mask, det_rles, det_area32, objects).astype(np.float32)
    return inter / (det_area32[:, None] + _EPSILON)


def _boxes_of_masks(mask: Any, rles: list, height: int, width: int) -> np.ndarray:
    """[ymin, xmin, ymax, xmax] normalised, as ``_to_normalized_box`` derives them."""
    xywh = np.asarray(mask.toBbox(rles), dtype=np.float64).reshape(-1, 4)
    x, y, w, h = xywh.T
    return np.stack([y / height, x / width, (y + h) / height, (x + w) / width], axis=1)


def _yx_boxes(objects: list[GroundTruthObject]) -> np.ndarray:
    return np.array(
        [[o.box[1], o.box[0], o.box[3], o.box[2]] for o in objects], dtype=np.float64
    ).reshape(-1, 4)


def _box_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    heights = np.maximum(
        np.zeros((len(a), len(b))),
        np.minimum(a[:, 2:3], b[:, 2][None, :]) - np.maximum(a[:, 0:1], b[:, 0][None, :]),
    )
    widths = np.maximum(
        np.zeros((len(a), len(b))),
        np.minimum(a[:, 3:4], b[:, 3][None, :]) - np.maximum(a[:, 1:2], b[:, 1][None, :]),
    )
    return heights * widths


def _box_area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _box_iou(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    inter = _box_intersection(det, gt)
    union = _box_area(det)[:, None] + _box_area(gt)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / union


def _box_ioa(det: np.ndarray, group: np.ndarray) -> np.ndarray:
    # np_box_ops.ioa(group_of, detections): intersection / detection area, transposed.
    inter = _box_intersection(group, det)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (inter / _box_area(det)[None, :]).T


def average_precision(scores: np.ndarray, labels: np.ndarray, num_gt: float) -> float:
    """VOC all-point AP of one class (``compute_precision_recall`` + ``compute_average_precision``).

    ``labels``: weighted TP labels (1 true, 0 false positive); ``num_gt``: the class's objects.
    """
    if num_gt == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(scores)[::-1]
    hits = np.asarray(labels, dtype=float)[order]
    true_pos = np.cumsum(hits)
    false_pos = np.cumsum((hits <= 0).astype(float))
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / num_gt
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at recall >= r
    steps = np.where(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


# -- COCO ------------------------------------------------------------------------------------


def coco_metrics(
    ground_truth: Sequence[GroundTruthImage],
    predictions: Iterable[Prediction],
    classes: Sequence[tuple[str, str]],
    kinds: Sequence[str] = ("mask", "box"),
) -> dict[str, dict[str, float]]:
    """COCO AP/AR of masks (``mask``) and of their tight boxes (``box``), those in ``kinds``.

    Ground truth: the objects with masks of the evaluated classes (group-of as crowd), no
    hierarchy expansion; detections: every prediction of those classes on those images.
    """
    mask = _mask_api()
    category = {mid: i + 1 for i, (mid, _) in enumerate(classes)}
    image_ids = {gt.image_id: i + 1 for i, gt in enumerate(ground_truth)}
    annotations = []
    for gt in ground_truth:
        for obj in gt.objects:
            if obj.rle is None or obj.label not in category:
                continue
            area = _area(mask, obj.rle)
            if area == 0:
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_ids[gt.image_id],
                    "category_id": category[obj.label],
                    "segmentation": _json_rle(obj.rle),
                    "area": float(area),
                    "bbox": [float(v) for v in mask.toBbox([obj.rle])[0]],
                    "iscrowd": int(obj.is_group_of),
                }
            )
    dataset = {
        "images": [
            {"id": image_ids[gt.image_id], "height": gt.height, "width": gt.width}
            for gt in ground_truth
        ],
        "categories": [{"id": category[mid], "name": name} for mid, name in classes],
        "annotations": annotations,
    }
    detections = []
    for p in predictions:
        if p.image_id not in image_ids or p.label not in category:
            continue
        # COCO has no rule for empty masks: one is a detection overlapping nothing.
        rle = p.rle or mask.frPyObjects(
            {"size": [p.height, p.width], "counts": [p.height * p.width]}, p.height, p.width
        )
        detections.append(
            {
                "image_id": image_ids[p.image_id],
                "category_id": category[p.label],
                "score": float(p.score),
                "segmentation": _json_rle(rle),
                "bbox": [float(v) for v in mask.toBbox([rle])[0]],
            }
        )
    results = {}
    for name, iou_type in (("mask", "segm"), ("box", "bbox")):
        if name in kinds:
            results[name] = _coco_eval(dataset, detections, iou_type)
    return results


def _json_rle(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.decode("ascii")}


def _coco_eval(dataset: dict, detections: list[dict], iou_type: str) -> dict[str, float]:
    if not detections or not dataset["annotations"]:
        return dict.fromkeys(COCO_STAT_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # both libraries print their progress
        try:
            from faster_coco_eval import COCO, COCOeval_faster

            gt = COCO()
            gt.dataset = dataset
            gt.createIndex()
            dt = gt.loadRes([dict(d) for d in detections])
            evaluator = COCOeval_faster(gt, dt, iou_type, print_function=lambda *a, **k: None)
        except ImportError:  # pragma: no cover - the fallback
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            gt = COCO()
            gt.dataset = dataset
            gt.createIndex()
            dt = gt.loadRes([dict(d) for d in detections])
            evaluator = COCOeval(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(COCO_STAT_NAMES, evaluator.stats, strict=False)}


# -- the whole evaluation --------------------------------------------------------------------


def evaluate(
    ground_truth: Sequence[GroundTruthImage],
    predictions: Sequence[Prediction],
    classes: Sequence[tuple[str, str]],
    hierarchy: Hierarchy | None = None,
) -> dict[str, Any]:
    """``{"open_images": {...}, "coco": {"mask": {...}, "box": {...}}}`` (DESIGN section 8)."""
    by_id = {gt.image_id: gt for gt in ground_truth}
    for p in predictions:
        gt = by_id.get(p.image_id)
        if gt is not None and p.rle is not None and (p.height, p.width) != (gt.height, gt.width):
            raise OistreamError(
                f"prediction for {p.image_id} is {p.width}x{p.height} but the image is "
                f"{gt.width}x{gt.height}: masks must be at the image's size"
            )
    return {
        "open_images": open_images_metric(ground_truth, predictions, classes, hierarchy),
        "coco": coco_metrics(ground_truth, predictions, classes),
    }


def json_safe(value: Any) -> Any:
    """NaN (a metric with nothing to score) becomes null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


# -- predictions in and out ------------------------------------------------------------------


def encode_mask(binary: np.ndarray) -> dict[str, Any]:
    """A binary [H, W] mask -> COCO RLE ``{"size", "counts": bytes}``."""
    return encode_masks(binary[None])[0]


def encode_masks(binary: np.ndarray) -> list[dict[str, Any]]:
    """Binary masks [N, H, W] -> COCO RLEs, in one library call."""
    if len(binary) == 0:
        return []
    fortran = np.asfortranarray(binary.astype(np.uint8).transpose(1, 2, 0))
    return list(_mask_api().encode(fortran))


def checked_rle(counts: bytes, height: int, width: int, where: str) -> dict[str, Any] | None:
    """A COCO RLE from hostile ``counts``: characters and run lengths checked here, the pixel
    total by :func:`check_rle_totals` (in one vectorised pass over many). The C library trusts
    all three. Empty counts -> None (an empty mask)."""
    if not counts:
        return None
    if _RLE_COUNTS.fullmatch(counts) is None:
        raise OistreamError(f"{where}: the mask's RLE counts hold characters outside '0'..'o'")
    if (counts[-1] - 48) & 0x20:
        raise OistreamError(f"{where}: the mask's RLE counts end inside a run")
    if _RUN_TOO_LONG.search(counts):
        raise OistreamError(f"{where}: the mask's RLE counts hold a run longer than 30 bits")
    return {"size": [height, width], "counts": counts}


def check_rle_totals(rles: Sequence[dict[str, Any] | None], wheres: Sequence[str]) -> None:
    """Every run non-negative and the runs adding up to H*W, or one line naming the first bad
    mask. ``rles`` passed :func:`checked_rle` (so every string ends a run)."""
    present = [i for i, r in enumerate(rles) if r is not None]
    if not present:
        return
    totals, negative = rle_run_totals([rles[i]["counts"] for i in present])
    for n, i in enumerate(present):
        height, width = rles[i]["size"]
        if negative[n] or totals[n] != height * width:
            raise OistreamError(
                f"{wheres[i]}: the mask's RLE runs do not add up to {height}x{width} pixels"
            )


def rle_run_totals(strings: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Per COCO RLE string, the sum of its runs and whether a run is negative, decoded as
    pycocotools' ``rleFrString`` does (5 bits a character, 0x20 continues a run, 0x10 in a run's
    last character is its sign, runs after the second are deltas from the one two back), for all
    strings at once in numpy."""
    lengths = np.fromiter((len(x) for x in strings), dtype=np.int64, count=len(strings))
    c = np.frombuffer(b"".join(strings), dtype=np.uint8).astype(np.int64) - 48
    ends = (c & 0x20) == 0
    run_of_byte = np.cumsum(ends) - ends  # global run index of each character
    end_at = np.flatnonzero(ends)
    run_start = np.concatenate(([0], end_at[:-1] + 1))
    k = np.arange(len(c)) - run_start[run_of_byte]
    value = np.bincount(run_of_byte, weights=((c & 0x1F) << (5 * k)).astype(np.float64))
    value = value.astype(np.int64)
    last = c[end_at]
    value -= np.where(last & 0x10, np.int64(1) << (5 * (k[end_at] + 1)), 0)
    # Which string each run belongs to, and its index j within that string.
    runs_per_string = np.bincount(
        np.repeat(np.arange(len(strings)), lengths)[end_at], minlength=len(strings)
    )
    string_of_run = np.repeat(np.arange(len(strings)), runs_per_string)
    first_run = np.concatenate(([0], np.cumsum(runs_per_string)[:-1]))
    j = np.arange(len(value)) - first_run[string_of_run]
    # cnts[j] = value[j] + cnts[j - 2] for j > 2: a cumulative sum along each string's even
    # runs from j = 2 and along its odd runs (each already in string order); run 0 stands alone.
    counts = value.copy()
    for chain in ((j % 2 == 1), (j >= 2) & (j % 2 == 0)):
        picked = np.flatnonzero(chain)
        if not len(picked):
            continue
        cumulative = np.cumsum(value[picked])
        owner = string_of_run[picked]
        first = np.concatenate(([True], owner[1:] != owner[:-1]))
        start = np.maximum.accumulate(np.where(first, np.arange(len(picked)), 0))
        counts[picked] = cumulative - (cumulative - value[picked])[start]
    totals = np.bincount(string_of_run, weights=counts.astype(np.float64), minlength=len(strings))
    negative = np.bincount(string_of_run, weights=(counts < 0), minlength=len(strings)) > 0
    return totals.astype(np.int64), negative


def read_predictions(source: str, options: dict[str, Any] | None = None) -> list[Prediction]:
    """Predictions from the challenge CSV or a JSON list (by content: JSON starts with ``[``)."""
    from oistream import sources

    try:
        fs, path = sources.filesystem(source, options)
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise OistreamError(f"no predictions file {source}") from None
    except OSError as error:
        raise OistreamError(f"cannot read {source}: {error}") from None
    head = data[:64].lstrip()
    if head.startswith(b"["):
        return parse_predictions_json(data, source)
    return parse_predictions_csv(data, source)


def parse_predictions_csv(data: bytes, source: str = "predictions") -> list[Prediction]:
    """``ImageID,ImageWidth,ImageHeight,LabelName,Score,Mask`` rows (Mask = base64 of the
    zlib-compressed RLE counts; an empty Mask is an empty mask, dropped as the challenge does)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise OistreamError(f"{source}: not UTF-8 text (expected the challenge CSV)") from None
    csv.field_size_limit(_MAX_FIELD)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise OistreamError(f"{source}: empty file (expected a CSV header)") from None
    except csv.Error as error:
        raise OistreamError(f"{source}: line 1: {error}") from None
    missing = [c for c in PREDICTION_COLUMNS if c not in header]
    if missing:
        raise OistreamError(
            f"{source}: the header lacks {', '.join(missing)} "
            f"(expected {','.join(PREDICTION_COLUMNS)})"
        )
    at = {c: header.index(c) for c in PREDICTION_COLUMNS}
    out: list[Prediction] = []
    wheres: list[str] = []
    try:
        for row in reader:
            where = f"{source}: line {reader.line_num}"
            if not row:
                continue
            wheres.append(where)
            if len(row) != len(header):
                raise OistreamError(f"{where}: {len(row)} fields, the header has {len(header)}")
            width = _side(row[at["ImageWidth"]], "ImageWidth", where)
            height = _side(row[at["ImageHeight"]], "ImageHeight", where)
            encoded = row[at["Mask"]].strip()
            counts = b""
            if encoded:
                try:
                    packed = base64.b64decode(encoded, validate=True)
                    inflater = zlib.decompressobj()
                    # Each run takes at least one character: more than H*W+1 is not a mask.
                    counts = inflater.decompress(packed, height * width + 2)
                except (binascii.Error, ValueError, zlib.error) as error:
                    raise OistreamError(
                        f"{where}: Mask is not base64 of zlib-compressed RLE counts ({error})"
                    ) from None
                if inflater.unconsumed_tail or len(counts) > height * width + 1:
                    raise OistreamError(f"{where}: Mask decompresses to more than a mask")
            out.append(
                Prediction(
                    image_id=_image_id(row[at["ImageID"]], where),
                    label=_label(row[at["LabelName"]], where),
                    score=_score(row[at["Score"]], where),
                    rle=checked_rle(counts, height, width, where),
                    height=height,
                    width=width,
                )
            )
    except csv.Error as error:
        raise OistreamError(f"{source}: line {reader.line_num}: {error}") from None
    check_rle_totals([p.rle for p in out], wheres)
    return out


def parse_predictions_json(data: bytes, source: str = "predictions") -> list[Prediction]:
    """A JSON list of ``{"image_id", "label", "score", "mask": {"size": [H, W], "counts"}}``."""
    try:
        items = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise OistreamError(f"{source}: not valid JSON ({error})") from None
    if not isinstance(items, list):
        raise OistreamError(f"{source}: expected a JSON list of predictions")
    out = []
    for i, item in enumerate(items):
        where = f"{source}: prediction {i}"
        if not isinstance(item, dict):
            raise OistreamError(f"{where}: not an object")
        for key in ("image_id", "label", "score", "mask"):
            if key not in item:
                raise OistreamError(f"{where}: no {key!r}")
        m = item["mask"]
        if not isinstance(m, dict) or "size" not in m or "counts" not in m:
            raise OistreamError(f"{where}: mask is not {{'size': [H, W], 'counts': str}}")
        size, counts = m["size"], m["counts"]
        if not (isinstance(size, list) and len(size) == 2 and isinstance(counts, str)):
            raise OistreamError(f"{where}: mask is not {{'size': [H, W], 'counts': str}}")
        height = _side(size[0], "mask height", where)
        width = _side(size[1], "mask width", where)
        try:
            raw = counts.encode("ascii")
        except UnicodeEncodeError:
            raise OistreamError(f"{where}: mask counts are not ASCII") from None
        score = item["score"]
        if isinstance(score, bool) or not isinstance(score, int | float | str):
            raise OistreamError(f"{where}: score is not a number")
        out.append(
            Prediction(
                image_id=_image_id(item["image_id"], where),
                label=_label(item["label"], where),
                score=_score(str(score) if isinstance(score, str) else score, where),
                rle=checked_rle(raw, height, width, where),
                height=height,
                width=width,
            )
        )
    check_rle_totals([p.rle for p in out], [f"{source}: prediction {i}" for i in range(len(out))])
    return out


def _side(value: Any, name: str, where: str) -> int:
    try:
        side = int(value) if not isinstance(value, bool) else -1
    except (TypeError, ValueError):
        raise OistreamError(f"{where}: {name} {str(value)[:20]!r} is not an integer") from None
    if not 1 <= side <= MAX_SIDE:
        raise OistreamError(f"{where}: {name} {side} is not between 1 and {MAX_SIDE}")
    return side


def _score(value: Any, where: str) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise OistreamError(f"{where}: Score {str(value)[:20]!r} is not a number") from None
    if not math.isfinite(score):
        raise OistreamError(f"{where}: Score {score} is not finite")
    return score


def _image_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise OistreamError(f"{where}: ImageID {str(value)[:70]!r} is not an image ID")
    return value


def _label(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise OistreamError(f"{where}: LabelName {str(value)[:70]!r} is not a label")
    return value


def write_predictions_csv(predictions: Iterable[Prediction], stream: io.TextIOBase) -> int:
    """Write the challenge CSV; returns the number of rows."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    rows = 0
    for p in predictions:
        encoded = ""
        if p.rle is not None:
            encoded = base64.b64encode(zlib.compress(p.rle["counts"])).decode("ascii")
        writer.writerow([p.image_id, p.width, p.height, p.label, repr(float(p.score)), encoded])
        rows += 1
    return rows


# -- ground truth from shards ----------------------------------------------------------------


@dataclass
class ShardGroundTruth:
    """What ``oistream evaluate`` scores against: images, the classes, the hierarchy."""

    images: list[GroundTruthImage]
    classes: list[tuple[str, str]]
    hierarchy: Hierarchy
    annotated: bool  # whether the shards carried evaluation annotations


def load_ground_truth(source: str, options: dict[str, Any] | None = None) -> ShardGroundTruth:
    """Read a shard folder (its ``manifest.json`` and tars) into ground truth for evaluation."""
    from oistream import format as shard_format
    from oistream import sources

    manifest = shard_format.read_manifest(source, options)
    if manifest is None:
        raise OistreamError(f"no manifest.json in {source}: not a shard folder")
    fs, root = sources.filesystem(source, options)
    root = root.rstrip("/")
    classes = manifest_classes(manifest, source)
    hierarchy = Hierarchy(manifest.get("hierarchy"))
    images: list[GroundTruthImage] = []
    annotated = False
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise OistreamError(f"{source}/manifest.json lists no shards")
    for shard in shards:
        name = shard.get("name") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not shard_format.is_safe_member_name(name):
            raise OistreamError(f"{source}/manifest.json names a shard {str(name)[:40]!r}")
        try:
            with fs.open(f"{root}/{name}", "rb") as f:
                for sample in iter_tar_samples(f, f"{source}/{name}"):
                    image, has_annotations = sample_ground_truth(sample, f"{source}/{name}")
                    annotated = annotated or has_annotations
                    images.append(image)
        except FileNotFoundError:
            raise OistreamError(f"{source}: shard {name} is missing") from None
    return ShardGroundTruth(images, classes, hierarchy, annotated)


def manifest_classes(manifest: Any, source: str) -> list[tuple[str, str]]:
    """(MID, name) of the manifest's classes 1..K."""
    classes = manifest.get("classes") if isinstance(manifest, dict) else None
    if not isinstance(classes, list):
        raise OistreamError(f"{source}/manifest.json has no classes list")
    out = []
    for entry in classes:
        if not isinstance(entry, dict) or entry.get("index") == 0:
            continue
        mid, name = entry.get("mid"), entry.get("name")
        if not isinstance(mid, str) or not isinstance(name, str):
            raise OistreamError(f"{source}/manifest.json has a class without mid and name")
        out.append((mid, name))
    return out


def iter_tar_samples(stream: Any, where: str) -> Iterator[dict[str, bytes]]:
    """Samples of a shard tar read as a stream: ``{"__key__", "json", "000.mask.png", ...}``."""
    current: dict[str, Any] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                if "/" in name or "." not in name:
                    raise OistreamError(f"{where}: member {name[:60]!r} is not a sample member")
                key, suffix = name.split(".", 1)
                if current and key != current["__key__"]:
                    yield current
                    current = {}
                current["__key__"] = key
                handle = tar.extractfile(member)
                current[suffix] = handle.read() if handle is not None else b""
    except tarfile.TarError as error:
        raise OistreamError(f"{where}: not a readable tar ({error})") from None
    if current:
        yield current


def sample_ground_truth(sample: dict[str, bytes], where: str) -> tuple[GroundTruthImage, bool]:
    """One shard sample -> its ground truth (masks resized to the image as the loader does)."""
    from PIL import Image

    key = sample["__key__"]
    try:
        meta = json.loads(sample["json"])
        width, height = int(meta["width"]), int(meta["height"])
        instances = list(meta.get("instances", []))
    except (KeyError, ValueError, TypeError, RecursionError):
        raise OistreamError(f"{where}: sample {key[:40]!r} has no valid JSON") from None
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise OistreamError(f"{where}: sample {key[:40]!r} has size {width}x{height}")
    objects: list[GroundTruthObject] = []
    for inst in instances:
        try:
            label = str(inst["label"])
            box = tuple(float(v) for v in inst["box"])
            png = sample[str(inst["mask"]).removeprefix(f"{key}.")]
        except (KeyError, TypeError, ValueError):
            raise OistreamError(f"{where}: sample {key}: an instance without mask or box") from None
        try:
            with Image.open(io.BytesIO(png)) as im:
                if im.width * im.height > _MAX_MASK_PIXELS:  # checked before decoding
                    raise OistreamError(f"{where}: sample {key}: mask {im.size} is too large")
                pixels = np.asarray(im.convert("L")) != 0
        except OistreamError:
            raise
        except Exception as error:  # Pillow raises many types for a bad PNG
            raise OistreamError(f"{where}: sample {key}: mask is not a PNG ({error})") from None
        # Pillow's NEAREST resize to the image, as the loader's masks (DESIGN section 2).
        resized = Image.fromarray(pixels.astype(np.uint8)).resize((width, height), Image.NEAREST)
        objects.append(
            GroundTruthObject(label, _box4(box, where), False, encode_mask(np.asarray(resized)))
        )
    annotated = "boxes" in meta or "image_labels" in meta
    positive: list[str] = sorted({o.label for o in objects})
    negative: list[str] = []
    if annotated:
        objects = _merge_boxes(objects, meta.get("boxes", []), f"{where}: sample {key}")
        labels = meta.get("image_labels", {})
        if not isinstance(labels, dict):
            raise OistreamError(f"{where}: sample {key}: image_labels is not an object")
        positive = _mid_list(labels.get("positive", []), where)
        negative = _mid_list(labels.get("negative", []), where)
    return GroundTruthImage(key, width, height, objects, positive, negative), annotated


def _box4(box: tuple[float, ...], where: str) -> tuple[float, float, float, float]:
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise OistreamError(f"{where}: a box is not four finite numbers")
    return box[0], box[1], box[2], box[3]


def _mid_list(values: Any, where: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise OistreamError(f"{where}: image_labels holds something other than MIDs")
    return values


def _merge_boxes(
    instances: list[GroundTruthObject], boxes: Any, where: str
) -> list[GroundTruthObject]:
    """The challenge's outer merge of box rows and masks: a box row with the same label and
    coordinates as an instance is that instance (and gives it IsGroupOf); other box rows are
    objects without masks; instances without a box row stay, not group-of."""
    if not isinstance(boxes, list):
        raise OistreamError(f"{where}: boxes is not a list")
    unmatched = list(instances)
    out: list[GroundTruthObject] = []
    for record in boxes:
        try:
            label = str(record["label"])
            box = _box4(tuple(float(v) for v in record["box"]), where)
            group_of = bool(record.get("is_group_of", False))
        except (KeyError, TypeError, ValueError):
            raise OistreamError(f"{where}: a box without label and box") from None
        match = next((o for o in unmatched if o.label == label and o.box == box), None)
        if match is not None:
            unmatched.remove(match)
            out.append(GroundTruthObject(label, box, group_of, match.rle))
        else:
            out.append(GroundTruthObject(label, box, group_of, None))
    return out + unmatched


def evaluate_shards(
    shards: str, predictions: str, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``oistream evaluate SHARDS PREDICTIONS``: the metrics of a predictions file."""
    truth = load_ground_truth(shards, options)
    preds = read_predictions(predictions, options)
    known = {mid for mid, _ in truth.classes}
    unknown = sum(1 for p in preds if p.label not in known)
    if unknown:
        print(
            f"note: {unknown} predictions of classes the shards do not hold were left out",
            file=sys.stderr,
        )
    if not truth.annotated:
        print(
            "note: these shards carry no evaluation annotations (image-level labels, boxes): "
            "each image's verified classes are those of its masks",
            file=sys.stderr,
        )
    return evaluate(truth.images, preds, truth.classes, truth.hierarchy)
