"""Training-time transforms on (image uint8 [3, H, W], torchvision detection target) pairs.

Deliberately few: torchvision's Mask R-CNN resizes, normalises and pads by itself, so the loader
only adds what augments the data (a horizontal flip) and what cleans it (dropping tiny
instances). Every function keeps ``boxes``, ``labels``, ``masks`` and ``area`` aligned.
"""

from __future__ import annotations

from typing import Any

import torch

Target = dict[str, Any]

# Per-instance fields that must be filtered together.
INSTANCE_FIELDS = ("boxes", "labels", "masks", "area", "iscrowd")


def hflip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirror image, masks and boxes left-right.

    Boxes are half-open pixel ranges (x1 = last column + 1), so x0' = W - x1 and x1' = W - x0
    is exactly the tight box of the flipped mask.
    """
    encoded = "image_size" in target  # an undecoded JPEG: flipped after decoding, by the consumer
    width = target["image_size"][1] if encoded else image.shape[-1]
    flipped = dict(target)
    boxes = target["boxes"]
    flipped_boxes = boxes.clone()
    flipped_boxes[:, 0] = width - boxes[:, 2]
    flipped_boxes[:, 2] = width - boxes[:, 0]
    flipped["boxes"] = flipped_boxes
    flipped["masks"] = target["masks"].flip(-1)
    if encoded:
        flipped["hflip"] = not target.get("hflip", False)
        return image, flipped
    return image.flip(-1), flipped


class RandomHorizontalFlip:
    """Flip with probability ``p``, drawing from the generator it is given.

    The generator is the caller's (the loader seeds one per rank, worker and epoch), so runs
    are reproducible and workers do not repeat each other's choices.
    """

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(
        self, image: torch.Tensor, target: Target, generator: torch.Generator
    ) -> tuple[torch.Tensor, Target]:
        if torch.rand((), generator=generator).item() < self.p:
            return hflip(image, target)
        return image, target


def keep_instances(target: Target, keep: torch.Tensor) -> Target:
    """The target restricted to the instances selected by ``keep`` (a bool mask or indices)."""
    kept = dict(target)
    for name in INSTANCE_FIELDS:
        if name in target:
            kept[name] = target[name][keep]
    return kept


def drop_small_instances(target: Target, min_area: float) -> Target:
    """Drop instances whose mask covers fewer than ``min_area`` pixels."""
    if min_area <= 0:
        return target
    return keep_instances(target, target["area"] >= min_area)
