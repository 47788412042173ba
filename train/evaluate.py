"""Evaluation: the model's predictions scored by ``oistream.evaluation`` (what `oistream
evaluate` runs), so the trainer's ``eval.json`` is the command's output on the same predictions.

Each rank runs the model over its share of the validation images and keeps, per image, its
predicted masks binarised at 0.5 as COCO RLEs (compact: what travels to rank 0). Rank 0 reads
the validation shards' ground truth once (annotated masks at the image's size, and where the
shards carry them, verified image-level labels, boxes, group-of flags and the hierarchy), scores
the Open Images challenge mask mAP@0.5 and COCO AP, and writes the predictions as the
challenge's CSV (``predictions.csv``) so that anyone can re-score them.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from oistream import evaluation

from .distributed import Ranks, gather_to_main
from .precision import Precision

MASK_THRESHOLD = 0.5  # torchvision's predicted masks are probabilities
PREDICTIONS_CSV = "predictions.csv"


@dataclass
class EvalRecords:
    """One rank's compact records: the images it evaluated and their predictions."""

    keys: list[str] = field(default_factory=list)
    predictions: list[evaluation.Prediction] = field(default_factory=list)

    def add(self, key: str, prediction: dict[str, Any], mids: Sequence[str | None]) -> None:
        """Record one image; ``prediction`` as torchvision's Mask R-CNN returns it (on the CPU),
        ``mids[label]`` the class of a model label."""
        self.keys.append(key)
        masks = _numpy(prediction["masks"])
        if masks.ndim == 4:
            masks = masks[:, 0]
        binary = masks >= MASK_THRESHOLD
        labels = _numpy(prediction["labels"]).astype(np.int64)
        scores = _numpy(prediction["scores"]).astype(np.float64)
        height, width = binary.shape[-2:]
        # Not reshape(n, -1): numpy cannot infer -1 when the model found nothing (n == 0).
        nonempty = binary.reshape(len(binary), height * width).any(axis=1)
        rles = iter(evaluation.encode_masks(binary[nonempty]))
        for label, score, has_pixels in zip(labels, scores, nonempty, strict=True):
            self.predictions.append(
                evaluation.Prediction(
                    image_id=key,
                    label=str(mids[label]),
                    score=float(score),
                    rle=next(rles) if has_pixels else None,  # empty: the challenge drops it
                    height=int(height),
                    width=int(width),
                )
            )

    def merge(self, other: EvalRecords) -> None:
        self.keys += other.keys
        self.predictions += other.predictions


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


_GROUND_TRUTH: dict[str, evaluation.ShardGroundTruth] = {}


def ground_truth(source: str, options: dict[str, Any] | None = None) -> evaluation.ShardGroundTruth:
    """The validation shards' ground truth, read once per process (each evaluation reuses it);
    ``options`` are the storage options of ``source`` (endpoint, credentials)."""
    if source not in _GROUND_TRUTH:
        _GROUND_TRUTH[source] = evaluation.load_ground_truth(source, options)
    return _GROUND_TRUTH[source]


def score_records(
    records: EvalRecords,
    truth: evaluation.ShardGroundTruth,
    publish_predictions: Callable[[bytes], None] | None = None,
) -> dict[str, Any]:
    """Score the evaluated images (``records.keys``) against ``truth``; hand the predictions,
    as the challenge CSV, to ``publish_predictions`` (the run folder publishes them whole)."""
    seen = set(records.keys)
    images = [image for image in truth.images if image.image_id in seen]
    if publish_predictions is not None:
        stream = io.StringIO(newline="")
        evaluation.write_predictions_csv(records.predictions, stream)
        publish_predictions(stream.getvalue().encode("utf-8"))
    result = evaluation.evaluate(images, records.predictions, truth.classes, truth.hierarchy)
    return {
        "images": len(images),
        "instances": sum(o.rle is not None for image in images for o in image.objects),
        "detections": len(records.predictions),
        **result,
    }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[list[torch.Tensor], list[dict[str, Any]]]],
    *,
    classes: Sequence[dict[str, Any]],
    ranks: Ranks,
    precision: Precision,
    ground_truth_source: str,
    ground_truth_options: dict[str, Any] | None = None,
    publish_predictions: Callable[[bytes], None] | None = None,
    max_images: int | None = None,
    on_prediction: Callable[[torch.Tensor, dict[str, Any], dict[str, Any]], None] | None = None,
) -> dict[str, Any] | None:
    """Run ``model`` (unwrapped: no DDP collectives) over this rank's ``batches`` and score.

    ``batches`` yield float images on the model's device and targets (with ``image_key``);
    ``max_images`` counts over all ranks; ``ground_truth_source`` is the validation shard
    folder; ``publish_predictions(csv_bytes)`` stores the predictions file. Returns the scores
    on rank 0, ``None`` elsewhere. ``on_prediction(image, target, prediction)`` sees every
    image this rank evaluates.
    """
    mids = [c.get("mid") for c in sorted(classes, key=lambda c: int(c["index"]))]
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
                records.add(key, prediction, mids)
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
    truth = ground_truth(ground_truth_source, ground_truth_options)
    return score_records(merged, truth, publish_predictions)
