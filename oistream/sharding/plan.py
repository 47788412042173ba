"""Deterministic selection of images and their assignment to shards (DESIGN section 4).

The plan depends only on the catalog rows and the arguments: the same CSV and the same command
give the same shards, sample for sample, which is what makes shards byte-reproducible and a
rerun able to skip what is already complete.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from oistream.format import mask_field, shard_name
from oistream.sharding.catalog import (
    SegmentationTable,
    clicks_json,
    hash_order_keys,
    iter_image_instances,
)
from oistream.sharding.catalog import (
    hash_order_key as hash_order_key,  # defined by the catalog, which ranks while it reads
)
from oistream.sharding.classes import OIClass
from oistream.sharding.options import DEFAULT_SAMPLES_PER_SHARD
from oistream.sharding.rows import factorize, group_positions, isin
from oistream.sharding.specs import SampleSpec, ShardSpec


class Plan:
    """The selected images, cut into shards; sample records are built one shard at a time.

    Only the image IDs per shard and the catalog rows of the selected images stay in memory:
    instance records (with their parsed clicks) cost several times more and are made when a
    shard is handed to a worker.
    """

    def __init__(
        self,
        split: str,
        classes: Sequence[OIClass],
        parameters: dict[str, Any],
        table: SegmentationTable,
        shard_ids: list[list[str]],
    ) -> None:
        self.split = split
        self.classes = list(classes)
        self.parameters = parameters
        self.shard_ids = shard_ids
        self.shard_names = [shard_name(split, i) for i in range(len(shard_ids))]
        selected = {image_id for ids in shard_ids for image_id in ids}
        rows = table.rows
        self._rows = rows.take(isin(rows["ImageID"], selected))
        self._positions = group_positions(self._rows["ImageID"])
        self._class_index = {c.mid: i for i, c in enumerate(self.classes, start=1)}
        self.annotations: dict[str, dict[str, Any]] = {}
        # The manifest's record of them (hierarchy, sources), set with them; None when off.
        self.evaluation_record: dict[str, Any] | None = None
        self.plan_hash = self._compute_hash()

    def attach_annotations(self, per_image: dict[str, dict[str, Any]]) -> None:
        """Give each sample its evaluation annotations; they are part of the plan's hash."""
        self.annotations = per_image
        self.plan_hash = self._compute_hash()

    @property
    def num_samples(self) -> int:
        return sum(len(ids) for ids in self.shard_ids)

    def image_ids(self) -> list[str]:
        return [image_id for ids in self.shard_ids for image_id in ids]

    def mask_paths(self) -> list[str]:
        return self._rows["MaskPath"].tolist()

    def _shard_rows(self, index: int) -> np.ndarray:
        """Row positions of shard ``index``'s images, in plan order."""
        ids = self.shard_ids[index]
        if not ids:
            return np.zeros(0, dtype=np.intp)
        return np.concatenate([self._positions[i] for i in ids])

    def shard_mask_paths(self, index: int) -> list[str]:
        """The MaskPaths of shard ``index``'s images, in plan order."""
        return self._rows["MaskPath"][self._shard_rows(index)].tolist()

    def shard(self, index: int) -> ShardSpec:
        ids = self.shard_ids[index]
        rows = self._rows.take(self._shard_rows(index)) if ids else None
        samples = []
        if rows is not None:
            table = SegmentationTable(
                rows=rows, total_rows=len(rows), malformed=0, malformed_examples=[]
            )
            for image_id, instances in iter_image_instances(table, ids, clicks=clicks_json):
                texts = [
                    _instance_json(k, x, self._class_index[x["label"]])
                    for k, x in enumerate(instances)
                ]
                masks = [(mask_field(k), x["mask_path"]) for k, x in enumerate(instances)]
                extra = self.annotations.get(image_id)
                samples.append(
                    SampleSpec(
                        image_id,
                        masks,
                        f"[{','.join(texts)}]",
                        _compact_json(extra)[1:-1] if extra else "",
                    )
                )
        return ShardSpec(index, self.shard_names[index], samples)

    def shards(self) -> Iterator[ShardSpec]:
        for index in range(len(self.shard_ids)):
            yield self.shard(index)

    def instances_per_class(self, excluding: set[str]) -> dict[str, int]:
        """Instances of each selected class (by MID) in the samples not left out."""
        kept = ~isin(self._rows["ImageID"], excluding)
        counts = Counter(self._rows["LabelName"][kept].tolist())
        return {c.mid: counts[c.mid] for c in self.classes}

    def images_per_class(self, excluding: set[str]) -> dict[str, int]:
        """Images carrying each selected class (by MID) among the samples not left out."""
        kept = ~isin(self._rows["ImageID"], excluding)
        rows = self._rows.take(kept)
        pairs = zip(rows["ImageID"].tolist(), rows["LabelName"].tolist(), strict=True)
        counts = Counter(label for _, label in set(pairs))
        return {c.mid: counts[c.mid] for c in self.classes}

    def manifest_classes(self) -> list[dict[str, Any]]:
        """Index 0 is background; selected classes are 1..K in the order the user gave them."""
        return [{"index": 0, "mid": None, "name": "background"}] + [
            {"index": i, "mid": c.mid, "name": c.name} for i, c in enumerate(self.classes, start=1)
        ]

    def _compute_hash(self) -> str:
        """sha256 of the header (split, classes, parameters), the shards' names and sizes, and
        the selected rows in sample order, column by column: O(selected rows) in vectorised
        steps, without building the samples' records (which are a function of exactly these
        rows and the classes). Evaluation annotations count only where there are any."""
        digest = hashlib.sha256(b"oistream-plan-v2\0")
        header = {
            "split": self.split,
            "classes": [asdict(c) for c in self.classes],
            "parameters": self.parameters,
        }
        digest.update(json.dumps(header, sort_keys=True).encode())
        ids = self.image_ids()
        digest.update(json.dumps(self.shard_names).encode())
        digest.update(np.array([len(s) for s in self.shard_ids], dtype="<i8").tobytes())
        positions = [self._positions[i] for i in ids]
        digest.update(np.array([len(p) for p in positions], dtype="<i8").tobytes())
        rows = self._rows.take(np.concatenate(positions) if positions else np.zeros(0, np.intp))
        for column in _HASHED_TEXT:
            # Valid rows hold no control characters in these columns (the catalog checks them).
            digest.update("\x1f".join(rows[column].tolist()).encode() + b"\x1e")
        numbers = np.column_stack([rows[c] for c in _HASHED_NUMBERS]).astype("<f8")
        numbers[np.isnan(numbers)] = np.nan  # one bit pattern for every NaN
        digest.update(numbers.tobytes())
        for image_id in ids:
            extra = self.annotations.get(image_id)
            if extra:
                digest.update(json.dumps([image_id, extra], sort_keys=True).encode())
        return digest.hexdigest()


# What the plan hash covers of each selected row: everything its instance record is made from.
_HASHED_TEXT = ("ImageID", "MaskPath", "LabelName", "BoxID", "Clicks")
_HASHED_NUMBERS = ("BoxXMin", "BoxYMin", "BoxXMax", "BoxYMax", "PredictedIoU")


def select_images(
    table: SegmentationTable,
    classes: Sequence[OIClass],
    per_class: int | None,
    max_images: int | None,
    seed: int,
) -> list[str]:
    """Per class the first ``per_class`` of its images in hash order; the union in hash order.

    Vectorised over the rows: one hash per distinct image, then sorts of integer keys. Equal keys
    (a 64-bit collision) keep the CSV's order of first appearance.
    """
    rows = table.rows
    if rows.empty:
        return []
    codes, distinct = factorize(rows["ImageID"])
    image_ids = np.array(distinct, dtype=object)
    keys = hash_order_keys(distinct, seed)
    labels = rows["LabelName"]
    chosen = np.zeros(len(image_ids), dtype=bool)
    for oi_class in classes:
        images = np.unique(codes[labels == oi_class.mid])  # in order of first appearance
        if per_class is not None and len(images) > per_class:
            images = images[np.argsort(keys[images], kind="stable")[:per_class]]
        chosen[images] = True
    picked = np.flatnonzero(chosen)
    picked = picked[np.argsort(keys[picked], kind="stable")]
    if max_images is not None:
        picked = picked[:max_images]
    return image_ids[picked].tolist()


def make_plan(
    table: SegmentationTable,
    classes: Sequence[OIClass],
    split: str,
    *,
    per_class: int | None = None,
    max_images: int | None = None,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    seed: int = 0,
    extra_parameters: dict[str, Any] | None = None,
) -> Plan:
    """The deterministic selection (DESIGN section 4), cut into shards of ``samples_per_shard``.

    For each class, the images carrying it ordered by a seeded hash of the ImageID, the first
    ``per_class`` taken; the union ordered by the same hash, capped at ``max_images``. Each
    sample holds every instance of every selected class in its image. Same arguments, same plan
    (and the same ``plan_hash``).
    ``extra_parameters`` (e.g. the ImageID list a selection was limited to) join the
    recorded selection parameters, and so the plan hash; without them both are as before.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be at least 1")
    image_ids = select_images(table, classes, per_class, max_images, seed)
    parameters = {
        "per_class": per_class,
        "max_images": max_images,
        "samples_per_shard": samples_per_shard,
        "seed": seed,
        **(extra_parameters or {}),
    }
    shard_ids = [
        image_ids[start : start + samples_per_shard]
        for start in range(0, len(image_ids), samples_per_shard)
    ]
    return Plan(split, classes, parameters, table, shard_ids)


# One encoder for every record: json.dumps with separators builds a new one per call (17% of
# an instance record's 6.6 us).
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


def _instance_json(k: int, instance: dict[str, Any], class_index: int) -> str:
    """The instance as the shard's JSON holds it, keys in the order DESIGN section 4 lists
    them; ``instance["clicks"]`` is already JSON text (``catalog.clicks_json``)."""
    record = {
        "mask": mask_field(k),
        "mask_path": instance["mask_path"],
        "label": instance["label"],
        "class_index": class_index,
        "box_id": instance["box_id"],
        "box": instance["box"],
        "predicted_iou": instance["predicted_iou"],
    }
    return f'{_compact_json(record)[:-1]},"clicks":{instance["clicks"]}}}'
