"""Deterministic selection of images and their assignment to shards (DESIGN section 4).

The plan depends only on the catalog rows and the arguments: the same CSV and the same command
give the same shards, sample for sample, which is what makes shards byte-reproducible and a
rerun able to skip what is already complete.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from oistream.catalog import OIClass, SegmentationTable, iter_image_instances

DEFAULT_SAMPLES_PER_SHARD = 1000


@dataclass
class SampleSpec:
    image_id: str
    # JSON-ready instance records (DESIGN section 4) in CSV order, ``class_index`` filled in.
    instances: list[dict[str, Any]]


@dataclass
class ShardSpec:
    index: int
    name: str
    samples: list[SampleSpec]


@dataclass
class Plan:
    split: str
    classes: list[OIClass]
    parameters: dict[str, Any]
    shards: list[ShardSpec] = field(default_factory=list)
    plan_hash: str = ""

    @property
    def num_samples(self) -> int:
        return sum(len(s.samples) for s in self.shards)

    @property
    def num_instances(self) -> int:
        return sum(len(x.instances) for s in self.shards for x in s.samples)

    def manifest_classes(self) -> list[dict[str, Any]]:
        """Index 0 is background; selected classes are 1..K in the order the user gave them."""
        return [{"index": 0, "mid": None, "name": "background"}] + [
            {"index": i, "mid": c.mid, "name": c.name} for i, c in enumerate(self.classes, start=1)
        ]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def hash_order_key(image_id: str, seed: int) -> bytes:
    """A seeded, version-proof hash: ID order is biased (prefix 0 first), hash order is not."""
    return hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()


def select_images(
    table: SegmentationTable,
    classes: Sequence[OIClass],
    per_class: int | None,
    max_images: int | None,
    seed: int,
) -> list[str]:
    """Per class the first ``per_class`` of its images in hash order; the union in hash order."""
    rows = table.rows
    if rows.empty:
        return []
    pairs = rows[["ImageID", "LabelName"]].drop_duplicates()
    keys = {image_id: hash_order_key(image_id, seed) for image_id in pairs["ImageID"].unique()}
    chosen: set[str] = set()
    for oi_class in classes:
        ids = pairs.loc[pairs["LabelName"] == oi_class.mid, "ImageID"].tolist()
        ids.sort(key=keys.__getitem__)
        chosen.update(ids if per_class is None else ids[:per_class])
    ordered = sorted(chosen, key=keys.__getitem__)
    return ordered if max_images is None else ordered[:max_images]


def make_plan(
    table: SegmentationTable,
    classes: Sequence[OIClass],
    split: str,
    *,
    per_class: int | None = None,
    max_images: int | None = None,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    seed: int = 0,
) -> Plan:
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be at least 1")
    class_index = {c.mid: i for i, c in enumerate(classes, start=1)}
    image_ids = select_images(table, classes, per_class, max_images, seed)
    samples = []
    for image_id, instances in iter_image_instances(table, image_ids):
        for instance in instances:
            instance["class_index"] = class_index[instance["label"]]
        samples.append(
            SampleSpec(image_id, [_instance_record(k, x) for k, x in enumerate(instances)])
        )
    plan = Plan(
        split=split,
        classes=list(classes),
        parameters={
            "per_class": per_class,
            "max_images": max_images,
            "samples_per_shard": samples_per_shard,
            "seed": seed,
        },
    )
    for index, start in enumerate(range(0, len(samples), samples_per_shard)):
        plan.shards.append(
            ShardSpec(index, shard_name(split, index), samples[start : start + samples_per_shard])
        )
    plan.plan_hash = compute_plan_hash(plan)
    return plan


def _instance_record(k: int, instance: dict[str, Any]) -> dict[str, Any]:
    """The instance as the shard's JSON holds it, keys in the order DESIGN section 4 lists them."""
    return {
        "mask": f"{k:03d}.mask.png",
        "mask_path": instance["mask_path"],
        "label": instance["label"],
        "class_index": instance["class_index"],
        "box_id": instance["box_id"],
        "box": instance["box"],
        "predicted_iou": instance["predicted_iou"],
        "clicks": instance["clicks"],
    }


def compute_plan_hash(plan: Plan) -> str:
    digest = hashlib.sha256()
    header = {
        "split": plan.split,
        "classes": [asdict(c) for c in plan.classes],
        "parameters": plan.parameters,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for shard in plan.shards:
        digest.update(shard.name.encode())
        for sample in shard.samples:
            digest.update(json.dumps([sample.image_id, sample.instances], sort_keys=True).encode())
    return digest.hexdigest()


def image_ids(shards: Iterable[ShardSpec]) -> list[str]:
    return [sample.image_id for shard in shards for sample in shard.samples]
