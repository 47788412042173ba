"""Undecoded JPEGs (the trainer's --gpu-decode path), decoded as a batch by the consumer, give
the same images and targets as the loader's own decoding, flips included. Run on the CPU:
the GPU only changes where torchvision's decode_jpeg runs."""

from __future__ import annotations

from pathlib import Path

import torch

import oistream
from oistream.sharding.run import ShardOptions, run_shard
from train.data import to_device


def _shards(split: str, tmp_path: Path) -> Path:
    out = tmp_path / split
    run_shard(
        ShardOptions(
            classes=["Person", "Car"],
            split=split,
            out=str(out),
            metadata="s3://openimages",
            processes=1,
            show_progress=False,
        )
    )
    return out


def test_encoded_images_decode_to_the_loader_samples(s3_env, tmp_path):
    out = _shards("train", tmp_path)
    options = {"shuffle": 0, "train": True, "seed": 3}
    decoded = list(oistream.ShardDataset(str(out), **options))
    encoded = list(oistream.ShardDataset(str(out), decode_images=False, **options))
    assert len(decoded) == len(encoded) > 4
    flips = 0
    for (image, target), (data, raw_target) in zip(decoded, encoded, strict=True):
        assert data.dim() == 1 and raw_target["image_size"] == tuple(image.shape[1:])
        flips += bool(raw_target.get("hflip"))
        (moved,), (moved_target,) = to_device(([data], [raw_target]), torch.device("cpu"))
        assert torch.equal(moved, image.float() / 255)
        for field in ("boxes", "labels", "masks", "area"):
            assert torch.equal(moved_target[field], target[field])
    assert 0 < flips < len(encoded)  # both branches met


def test_aspect_grouping_uses_the_header_size(s3_env, tmp_path):
    out = _shards("validation", tmp_path)
    dataset = oistream.ShardDataset(str(out), shuffle=0, train=False, decode_images=False)
    for images, targets in oistream.make_loader(dataset, batch_size=2, group_by_aspect=True):
        sides = {t["image_size"][1] >= t["image_size"][0] for t in targets}
        assert len(sides) == 1 or len(images) < 2
