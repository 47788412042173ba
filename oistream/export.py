"""`oistream export coco`: a shard set as COCO instances (RLE masks) plus its JPEGs.

Detectron2 (``register_coco_instances(name, {}, "DIR/annotations.json", "DIR/images")``),
MMDetection and the YOLO converters read COCO. The export writes:

* ``DIR/annotations.json``: ``images`` (``id``, ``file_name`` ``{ImageID}.jpg``, ``width``,
  ``height`` from the JPEG itself, ``ImageID``), ``categories`` from the manifest (``id`` = the
  shard's class index 1..K, ``name``, ``mid``), and one annotation per instance: ``segmentation``
  an RLE (pycocotools, counts as text) at the image's size, ``area`` (mask pixels), ``bbox``
  ``[x, y, w, h]`` of the mask (pycocotools' ``toBbox``), ``iscrowd`` 0, and the Open Images
  ``mask_path``/``box_id``;
* ``DIR/images/{ImageID}.jpg``: each image object, byte for byte (unless ``images=False``).

The masks are the loader's annotated masks (``ShardDataset(resolve_occlusion=False)``): each
PNG resized to the image's exact size as Pillow's NEAREST does, overlaps kept. An instance whose
mask has no pixel at that size has no valid COCO box and is left out (the loader drops it too).
Image ids are ``oistream.image_id_to_int`` of the ImageID, the ids the loader's targets carry.

Shards are untrusted: only members whose key is an ImageID are read, mask fields must be
``NNN.mask.png``, class indices must be in the manifest, and file names are built from the
checked ImageID alone, so nothing is written outside ``DIR``.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from oistream import sources
from oistream.errors import OistreamError
from oistream.format import MANIFEST_NAME, MASK_FIELD_PATTERN, read_manifest

ANNOTATIONS_NAME = "annotations.json"
IMAGES_FOLDER = "images"
_IMAGE_ID = re.compile(r"[0-9a-f]{16}")
# A sample member larger than this is not a plausible Open Images JPEG, mask or record.
_MAX_MEMBER_BYTES = 64 * 2**20


def export_coco(
    source: str,
    out: str,
    *,
    images: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Export the shard folder ``source`` (local or any fsspec URL) to ``out``; a summary line.

    Raises ``OistreamError`` for a folder without a readable manifest; a sample that cannot be
    read is skipped and counted in the summary, never half-exported.
    """
    from pycocotools import mask as mask_utils

    from oistream.loader import image_id_to_int
    from oistream.masks import assemble_masks, decode_mask_png

    options = sources.storage_options(source) if storage_options is None else storage_options
    manifest = _read_manifest(source, options)
    classes = {int(c["index"]): c for c in manifest["classes"] if int(c["index"]) > 0}
    out_fs, out_root = sources.filesystem(out, sources.storage_options(out))
    out_fs.makedirs(out_root, exist_ok=True)
    if images:
        out_fs.makedirs(f"{out_root}/{IMAGES_FOLDER}", exist_ok=True)

    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    skipped: list[str] = []
    dropped = 0
    seen: set[str] = set()
    for url in _shard_urls(source, manifest):
        for key, members in _samples(url, options):
            if key in seen:
                skipped.append(f"{key}: appears twice")
                continue
            try:
                record = json.loads(members["json"])
                jpeg = members["jpg"]
                with Image.open(io.BytesIO(jpeg)) as picture:
                    if picture.format != "JPEG":
                        raise ValueError(f"image is {picture.format}, not JPEG")
                    width, height = picture.size
                labels, masks, instances = [], [], []
                for instance in record.get("instances", []):
                    field = instance["mask"]
                    label = int(instance["class_index"])
                    if not isinstance(field, str) or not MASK_FIELD_PATTERN.fullmatch(field):
                        raise ValueError(f"bad mask field {field!r}")
                    if label not in classes:
                        raise ValueError(f"class_index {label} is not in the manifest")
                    masks.append(decode_mask_png(members[field]))
                    labels.append(label)
                    instances.append(instance)
                planes, _, kept = assemble_masks(masks, height, width, resolve_occlusion=False)
            except Exception as error:  # untrusted bytes fail in many ways: skip, say which
                skipped.append(f"{key}: {type(error).__name__}: {error}")
                continue
            seen.add(key)
            dropped += len(masks) - len(kept)
            image_number = image_id_to_int(key)
            coco_images.append(
                {
                    "id": image_number,
                    "file_name": f"{key}.jpg",
                    "width": width,
                    "height": height,
                    "ImageID": key,
                }
            )
            if len(kept):
                rles = mask_utils.encode(np.asfortranarray(planes.transpose(1, 2, 0)))
                areas = mask_utils.area(rles)
                boxes = mask_utils.toBbox(rles)
            for plane_index, instance_index in enumerate(kept.tolist()):
                rle = rles[plane_index]
                instance = instances[instance_index]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_number,
                        "category_id": labels[instance_index],
                        "segmentation": {
                            "size": [int(rle["size"][0]), int(rle["size"][1])],
                            "counts": rle["counts"].decode("ascii"),
                        },
                        "area": float(areas[plane_index]),
                        "bbox": [float(v) for v in boxes[plane_index]],
                        "iscrowd": 0,
                        "mask_path": instance.get("mask_path"),
                        "box_id": instance.get("box_id"),
                    }
                )
            if images:
                out_fs.pipe_file(f"{out_root}/{IMAGES_FOLDER}/{key}.jpg", jpeg)

    document = {
        "info": {
            "description": f"Open Images {manifest.get('split')} instance masks, from {source}",
            "version": str(manifest.get("oistream_version")),
            "plan_hash": manifest.get("plan_hash"),
        },
        "licenses": [],
        "images": coco_images,
        "annotations": annotations,
        "categories": [
            {"id": index, "name": c["name"], "mid": c["mid"], "supercategory": "object"}
            for index, c in sorted(classes.items())
        ],
    }
    sources.write_whole(out_fs, f"{out_root}/{ANNOTATIONS_NAME}", json.dumps(document).encode())
    line = (
        f"wrote {sources.join(out, ANNOTATIONS_NAME)}: {len(coco_images)} images, "
        f"{len(annotations)} annotations, {len(document['categories'])} categories"
        + (f"; JPEGs in {sources.join(out, IMAGES_FOLDER)}" if images else "")
    )
    if dropped:
        line += f"; {dropped} instance(s) without pixels at image size left out"
    if skipped:
        line += f"; {len(skipped)} unreadable sample(s) skipped (first: {skipped[0][:200]})"
    return line


def _read_manifest(source: str, options: dict[str, Any]) -> dict[str, Any]:
    manifest = read_manifest(source, options)  # validated: indices 0..K, safe shard names
    if manifest is None:
        raise OistreamError(f"no {MANIFEST_NAME} in {source}: not a shard folder")
    return manifest


def _shard_urls(source: str, manifest: dict[str, Any]) -> list[str]:
    return [sources.join(source, shard["name"]) for shard in manifest["shards"]]


def _samples(url: str, options: dict[str, Any]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(ImageID, {field: bytes}) per sample of one tar, members read in stream order."""
    fs, path = sources.filesystem(url, options)
    key: str | None = None
    fields: dict[str, bytes] = {}
    try:
        with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if not member.isfile() or member.size > _MAX_MEMBER_BYTES:
                    continue
                base = member.name.rsplit("/", 1)[-1]
                member_key, _, field = base.partition(".")
                if not _IMAGE_ID.fullmatch(member_key) or not field:
                    continue  # not a sample member, or a name that could leave DIR
                if member_key != key:
                    if key is not None:
                        yield key, fields
                    key, fields = member_key, {}
                extracted = tar.extractfile(member)
                if extracted is not None:
                    fields[field.lower()] = extracted.read()
    except (OSError, tarfile.TarError) as error:
        raise OistreamError(f"cannot read shard {url}: {error}") from None
    if key is not None:
        yield key, fields


__all__ = ["ANNOTATIONS_NAME", "IMAGES_FOLDER", "export_coco"]
