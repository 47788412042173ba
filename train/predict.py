"""``oistream predict``: run a trained checkpoint on images or shards and write what it found.

    oistream predict --checkpoint CKPT --input SRC --out DIR|URL [--pictures N]
                     [--score-threshold S] [--batch-size B] [--device D]

SRC is a folder or URL of JPEGs, a single JPEG, or shards (a folder or URL with
``manifest.json``, a ``.tar``, or a brace pattern). The checkpoint carries the architecture
and the classes, so no model flags are needed. Under ``--out``:

* ``json/{ImageID}.json``: ``{"image_id", "width", "height", "detections": [{"label" (MID),
  "name", "class_index", "score", "box" [x0, y0, x1, y1] pixels, "mask" (COCO RLE at the
  image's size: {"size": [h, w], "counts": str})}]}``;
* ``predictions.csv``: the Open Images challenge's per-mask CSV that ``oistream evaluate``
  reads, ``ImageID,ImageWidth,ImageHeight,LabelName,Score,Mask`` (Mask = base64 of the
  zlib-compressed RLE counts);
* ``pictures/{ImageID}.png``: the first ``--pictures`` images drawn by ``oistream show``'s
  renderer (``oistream.visualize.draw_instances``).

Every file is written whole (a temporary name then a rename locally; one PUT on object storage).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import re
import sys
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image

import oistream
from oistream import OistreamError, sources
from oistream.evaluation import encode_masks

from . import checkpoint as ckpt
from .errors import TrainError
from .evaluate import MASK_THRESHOLD
from .model import model_from_checkpoint

PROG = "oistream predict"
CSV_HEADER = ("ImageID", "ImageWidth", "ImageHeight", "LabelName", "Score", "Mask")
# torchvision's own cut (box_score_thresh): low, because ranking metrics want every candidate.
DEFAULT_SCORE_THRESHOLD = 0.05
# Pictures show only confident detections; below this a picture is mostly noise.
PICTURE_SCORE_THRESHOLD = 0.5
# A JPEG's pixels are checked from its header before decoding (Pillow's own bomb guard is
# 2 x 89 M pixels; the largest Open Images image is far below this).
MAX_IMAGE_PIXELS = 64_000_000
_JPEG = (".jpg", ".jpeg")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class Item:
    """One image to predict on: its key (ImageID), uint8 pixels [3, H, W]."""

    key: str
    image: torch.Tensor


def build_parser() -> argparse.ArgumentParser:
    from .config import _OneLineParser

    parser = _OneLineParser(
        prog=PROG,
        description="Run a checkpoint of `oistream train` on images or shards: one JSON per "
        "image, the challenge CSV `oistream evaluate` reads, and pictures.",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of `oistream train`")
    parser.add_argument(
        "--input",
        required=True,
        help="a folder or URL of JPEGs, one JPEG, or shards (folder/URL with manifest.json, "
        ".tar, brace pattern)",
    )
    parser.add_argument("--out", required=True, help="output folder or URL")
    parser.add_argument(
        "--pictures", type=int, default=4, help="draw the first N images' predictions"
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=DEFAULT_SCORE_THRESHOLD,
        help="keep detections scoring at least this (pictures show those scoring at least "
        f"{PICTURE_SCORE_THRESHOLD})",
    )
    parser.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// locations")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``oistream predict``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.pictures < 0:
        print(f"{PROG}: error: --batch-size must be >= 1, --pictures >= 0", file=sys.stderr)
        return 2
    if not 0.0 <= args.score_threshold <= 1.0:
        print(f"{PROG}: error: --score-threshold must be between 0 and 1", file=sys.stderr)
        return 2
    try:
        summary = run(args)
    except (TrainError, OistreamError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(
        f"{summary['images']} images, {summary['detections']} detections -> {summary['out']} "
        f"(json/, predictions.csv, {summary['pictures']} pictures)",
        file=sys.stderr,
    )
    return 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda but no CUDA device is available")
    return device


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the checkpoint, predict on every input image, write JSON, CSV and pictures."""
    device = _device(args.device)
    state = ckpt.load_checkpoint(args.checkpoint)
    model, classes, layout = model_from_checkpoint(
        state, str(args.checkpoint), box_score_thresh=args.score_threshold
    )
    options = sources.storage_options(str(args.input), args.endpoint_url)
    items = read_inputs(str(args.input), options)
    print(
        f"{layout.describe()} from {args.checkpoint} on {device}, "
        f"{len(classes) - 1} classes: {', '.join(c['name'] for c in classes[1:])}",
        file=sys.stderr,
        flush=True,
    )
    writer = PredictionWriter(
        str(args.out),
        classes,
        pictures=args.pictures,
        storage_options=sources.storage_options(str(args.out), args.endpoint_url),
    )
    predict(model.to(device).eval(), items, writer, batch_size=args.batch_size, device=device)
    return writer.close()


# -- inputs -----------------------------------------------------------------------------------


def is_shards(source: str, fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Shards: a .tar, a brace pattern, or a folder holding manifest.json or .tar files."""
    if source.endswith(".tar") or "{" in source:
        return True
    if not fs.isdir(path):
        return False
    if fs.exists(f"{path.rstrip('/')}/manifest.json"):
        return True
    return any(str(name).endswith(".tar") for name in fs.ls(path, detail=False))


def read_inputs(source: str, options: dict[str, Any]) -> Iterator[Item]:
    """Each input image as an ``Item``, in a stable order (shards' order, or sorted names)."""
    try:
        fs, path = sources.filesystem(source, options)
        shards = is_shards(source, fs, path)
        if not shards:
            if fs.isdir(path):
                names = sorted(
                    str(name)
                    for name in fs.ls(path, detail=False)
                    if str(name).lower().endswith(_JPEG)
                )
                if not names:
                    raise TrainError(f"{source} holds no .jpg/.jpeg files and no shards")
            elif fs.isfile(path):
                names = [path]
            else:
                raise TrainError(f"input not found: {source}")
    except OSError as error:
        raise TrainError(f"cannot read {source}: {error}") from None
    if shards:
        return _shard_items(source, options)
    return _jpeg_items(fs, names)


def _shard_items(source: str, options: dict[str, Any]) -> Iterator[Item]:
    try:
        dataset = oistream.ShardDataset(
            source, shuffle=0, train=False, resolve_occlusion=False, storage_options=options
        )
    except (OistreamError, OSError, ValueError) as error:
        raise TrainError(f"cannot open shards {source}: {error}") from None
    for image, target in dataset:
        yield Item(str(target.get("image_key", target.get("image_id"))), image)


def _jpeg_items(fs: fsspec.AbstractFileSystem, names: list[str]) -> Iterator[Item]:
    for name in names:
        key = os.path.splitext(name.rstrip("/").rsplit("/", 1)[-1])[0]
        try:
            data = fs.cat_file(name)
            image = decode_jpeg(data)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            # One bad file does not end the run: say which and go on.
            print(f"{PROG}: skipping {name}: {error}", file=sys.stderr)
            continue
        yield Item(key, image)


def decode_jpeg(data: bytes) -> torch.Tensor:
    """Bytes of an image file -> uint8 RGB tensor [3, H, W], its size checked before decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as picture:
            width, height = picture.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{width}x{height} is over {MAX_IMAGE_PIXELS} pixels")
            array = np.asarray(picture.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- running ----------------------------------------------------------------------------------


@torch.no_grad()
def predict(
    model: Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]],
    items: Iterable[Item],
    writer: PredictionWriter,
    *,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
) -> None:
    """Run ``model`` (torchvision detection output) over ``items`` and hand each result to
    ``writer``. Any callable with the model's interface works (tests pass the ground truth)."""
    for batch in _batches(items, batch_size):
        images = [item.image.to(device).float().div_(255) for item in batch]
        outputs = model(images)
        for item, output in zip(batch, outputs, strict=True):
            writer.add(item, {k: v.detach().cpu() for k, v in output.items()})


# -- outputs ----------------------------------------------------------------------------------


def _text(counts: bytes | str) -> str:
    """RLE counts for JSON: pycocotools' bytes are ASCII."""
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


def csv_mask(rle: dict[str, Any]) -> str:
    """The challenge's Mask field: base64 of the zlib-compressed COCO RLE counts."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return base64.b64encode(zlib.compress(counts)).decode("ascii")


class PredictionWriter:
    """Writes each image's JSON as it comes, the CSV at the end, and the first pictures."""

    def __init__(
        self,
        out: str,
        classes: list[dict[str, Any]],
        *,
        pictures: int = 4,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.out = out.rstrip("/")
        self.classes = classes
        self.names = [str(c.get("name")) for c in classes]
        self.pictures = pictures
        self.fs, self.root = sources.filesystem(out, storage_options)
        self.rows = io.StringIO()
        self.csv = csv.writer(self.rows, lineterminator="\n")
        self.csv.writerow(CSV_HEADER)
        self.images = 0
        self.detections = 0
        self.drawn = 0
        self.keys: set[str] = set()

    def _publish(self, relative: str, data: bytes) -> None:
        """Whole files only: local files by temporary name and rename, remote ones by one PUT."""
        sources.write_whole(self.fs, f"{self.root}/{relative}", data)

    def add(self, item: Item, output: dict[str, torch.Tensor]) -> None:
        """Record one image's detections (torchvision's output, on the CPU)."""
        # The name of a file we write: never a path out of the output folder.
        name = _SAFE_NAME.sub("_", item.key) or "image"
        if name in self.keys:
            raise TrainError(f"two inputs are both called {item.key!r}")
        self.keys.add(name)
        height, width = (int(v) for v in item.image.shape[-2:])
        masks = output["masks"]
        if masks.ndim == 4:
            masks = masks[:, 0]
        binary = (masks >= MASK_THRESHOLD).to(torch.uint8).numpy()
        rles = encode_masks(binary.reshape(-1, height, width))
        labels = output["labels"].tolist()
        scores = output["scores"].tolist()
        boxes = output["boxes"].reshape(-1, 4).tolist()
        detections = []
        for i, (label, score, box, rle) in enumerate(zip(labels, scores, boxes, rles, strict=True)):
            mid = self.classes[label].get("mid") or self.names[label]
            detections.append(
                {
                    "label": mid,
                    "name": self.names[label],
                    "class_index": int(label),
                    "score": round(float(score), 6),
                    "box": [round(float(v), 2) for v in box],
                    "mask": {"size": [height, width], "counts": _text(rle["counts"])},
                }
            )
            # An empty mask is written as an empty field; the challenge metric drops it.
            mask_field = csv_mask(rle) if binary[i].any() else ""
            self.csv.writerow([item.key, width, height, mid, f"{float(score):.6f}", mask_field])
        record = {"image_id": item.key, "width": width, "height": height, "detections": detections}
        self._publish(f"json/{name}.json", json.dumps(record).encode())
        if self.drawn < self.pictures:
            self._draw(name, item, output)
        self.images += 1
        self.detections += len(detections)

    def _draw(self, name: str, item: Item, output: dict[str, torch.Tensor]) -> None:
        from oistream import draw_instances

        picture = draw_instances(
            item.image,
            output["masks"],
            output["boxes"],
            output["labels"],
            self.names,
            scores=output["scores"],
            score_threshold=PICTURE_SCORE_THRESHOLD,
        )
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        self._publish(f"pictures/{name}.png", buffer.getvalue())
        self.drawn += 1

    def close(self) -> dict[str, Any]:
        """Write ``predictions.csv``; returns a summary of what was written."""
        if self.images == 0:
            raise TrainError("no image could be read from the input")
        self._publish("predictions.csv", self.rows.getvalue().encode())
        return {
            "images": self.images,
            "detections": self.detections,
            "pictures": self.drawn,
            "out": self.out,
        }
