"""oistream shards -> batches on the training device, through oistream's public API only."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torchvision

import oistream
from oistream import torchvision_decoders_unwarned

from .errors import TrainError, one_line

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]
_TARGET_TENSORS = ("boxes", "labels", "masks")


def open_shards(source: str | Sequence[str], **options: Any) -> oistream.ShardDataset:
    """``oistream.ShardDataset(source, **options)``, its failures as one ``TrainError`` line."""
    try:
        return oistream.ShardDataset(source, **options)
    except Exception as error:  # botocore, aiohttp, OSError...: all mean this source
        raise TrainError(f"cannot open shards {source}: {one_line(error)}") from None


def describe_classes(classes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The manifest's classes as plain dicts sorted by index (what checkpoints store)."""
    return [
        {"index": int(c["index"]), "mid": c.get("mid") or None, "name": str(c.get("name"))}
        for c in sorted(classes, key=lambda c: int(c["index"]))
    ]


def class_names(classes: Sequence[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in describe_classes(classes)]


def make_batches(
    dataset: oistream.ShardDataset,
    batch_size: int,
    workers: int,
    *,
    device: torch.device,
    persistent: bool = True,
) -> torch.utils.data.DataLoader:
    """``oistream.make_loader`` with host memory pinned when batches go to a GPU."""
    options: dict[str, Any] = {"pin_memory": device.type == "cuda"}
    if workers > 0:
        options["persistent_workers"] = persistent
    return oistream.make_loader(
        dataset, batch_size=batch_size, num_workers=workers, group_by_aspect=True, **options
    )


def to_device(batch: Batch, device: torch.device, *, targets_too: bool = True) -> Batch:
    """uint8 images -> float [0, 1] on ``device`` (converted there: a quarter of the bytes
    cross the bus); target tensors follow unless ``targets_too`` is False (evaluation keeps the
    ground truth on the host, where it is scored). Undecoded JPEGs (1-D tensors, from
    ``ShardDataset(decode_images=False)``) are decoded there as one batch (nvJPEG on a GPU)
    and mirrored where the loader flipped their masks."""
    images, targets = batch
    if images and images[0].dim() == 1:
        images = decode_batch(images, targets, device)
    moved_images = [image.to(device, non_blocking=True).float().div_(255) for image in images]
    if targets_too:
        targets = [
            {
                k: v.to(device, non_blocking=True) if k in _TARGET_TENSORS else v
                for k, v in target.items()
            }
            for target in targets
        ]
    return moved_images, targets


def device_batches(
    loader: Iterable[Batch], device: torch.device, *, targets_too: bool = True
) -> Iterator[Batch]:
    for batch in loader:
        yield to_device(batch, device, targets_too=targets_too)


def decode_batch(
    encoded: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device
) -> list[torch.Tensor]:
    with torchvision_decoders_unwarned():
        images = torchvision.io.decode_jpeg(
            encoded, mode=torchvision.io.ImageReadMode.RGB, device=device
        )
    return [
        image.flip(-1) if target.get("hflip") else image
        for image, target in zip(images, targets, strict=True)
    ]


def check_gpu_decode_supported(device: torch.device) -> None:
    """nvJPEG runs in the main process on a CUDA device; there is no point elsewhere."""
    if device.type != "cuda":
        raise TrainError("--gpu-decode needs a CUDA device (the CPU decodes in the workers)")
