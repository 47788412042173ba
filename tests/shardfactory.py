"""Writes small shard sets in format v1 (DESIGN section 4) for the loader's tests.

Independent of ``oistream.sharding.writer`` on purpose: the tests need shards whose every byte they
choose, including members no honest writer would produce (pickles, ``../`` names, absolute
paths, corrupt PNGs and JPEGs). Output is deterministic: fixed mtime, owner and member order.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

TAR_MTIME = 946_684_800
FAKE_MIDS = ("/m/01g317", "/m/0k4j", "/m/015qff", "/m/01mqdt")
FAKE_NAMES = ("Person", "Car", "Traffic light", "Traffic sign")


@dataclass
class FakeInstance:
    mask: (
        np.ndarray
    )  # 2-D, any size (real masks are not at the image's resolution), non-zero = object
    class_index: int
    mid: str = ""
    png: bytes | None = None  # overrides the encoded mask (a corrupt PNG, say)


@dataclass
class FakeSample:
    key: str
    image: np.ndarray  # H x W x 3 uint8
    instances: list[FakeInstance] = field(default_factory=list)
    jpeg: bytes | None = None  # overrides the encoded image
    extra_members: list[tuple[str, bytes]] = field(default_factory=list)  # "{key}.{ext}" names

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def width(self) -> int:
        return self.image.shape[1]


def classes_table(num_classes: int = len(FAKE_MIDS)) -> list[dict]:
    """The manifest's ``classes``: index 0 is background, then 1..K."""
    table = [{"index": 0, "mid": None, "name": "background"}]
    for k in range(num_classes):
        mid = FAKE_MIDS[k] if k < len(FAKE_MIDS) else f"/m/fake{k}"
        name = FAKE_NAMES[k] if k < len(FAKE_NAMES) else f"Class {k + 1}"
        table.append({"index": k + 1, "mid": mid, "name": name})
    return table


def encode_jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def encode_mask_png(mask: np.ndarray, one_bit: bool = True) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray((np.asarray(mask) != 0).astype(np.uint8) * 255)
    (image.convert("1") if one_bit else image).save(buffer, "PNG")
    return buffer.getvalue()


def random_sample(
    rng: np.random.Generator,
    key: str,
    height: int,
    width: int,
    instances: int,
    num_classes: int = len(FAKE_MIDS),
    mask_scale: float = 1600 / 1024,
) -> FakeSample:
    """An image with ``instances`` overlapping rectangles and ellipses whose masks are stored
    at ``mask_scale`` times the image's size (rounded), as Open Images stores them."""
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask_h = max(1, round(height * mask_scale))
    mask_w = max(1, round(width * mask_scale))
    rows, cols = np.mgrid[0:mask_h, 0:mask_w]
    sample = FakeSample(key=key, image=image)
    for _ in range(instances):
        cy, cx = rng.uniform(0, mask_h), rng.uniform(0, mask_w)
        ry = rng.uniform(0.1, 0.4) * mask_h
        rx = rng.uniform(0.1, 0.4) * mask_w
        if rng.random() < 0.5:
            mask = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1
        else:
            mask = (np.abs(rows - cy) < ry) & (np.abs(cols - cx) < rx)
        class_index = int(rng.integers(1, num_classes + 1))
        sample.instances.append(
            FakeInstance(
                mask=mask,
                class_index=class_index,
                mid=classes_table(num_classes)[class_index]["mid"],
            )
        )
    return sample


def random_samples(
    count: int,
    seed: int = 0,
    *,
    size: tuple[int, int] = (24, 32),
    max_instances: int = 4,
    portrait_every: int = 0,
    num_classes: int = len(FAKE_MIDS),
) -> list[FakeSample]:
    """``count`` samples with keys ``{i:016x}``; every ``portrait_every``-th image is portrait."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        height, width = size
        if portrait_every and i % portrait_every == 0:
            height, width = width, height
        n = int(rng.integers(0, max_instances + 1))
        samples.append(random_sample(rng, f"{i:016x}", height, width, n, num_classes))
    return samples


def sample_members(sample: FakeSample, split: str = "train") -> list[tuple[str, bytes]]:
    """The tar members of one sample in format v1, in webdataset's sorted field order."""
    instances = []
    fields: dict[str, bytes] = {}
    for k, instance in enumerate(sample.instances):
        mask_field = f"{k:03d}.mask.png"
        label = instance.mid or f"/m/class{instance.class_index}"
        instances.append(
            {
                "mask": mask_field,
                "mask_path": f"{sample.key}_{label.replace('/', '')}_{k:08x}.png",
                "label": label,
                "class_index": instance.class_index,
                "box_id": f"{k:08x}",
                "box": [0.0, 0.0, 1.0, 1.0],
                "predicted_iou": None,
                "clicks": [],
            }
        )
        fields[mask_field] = (
            instance.png if instance.png is not None else encode_mask_png(instance.mask)
        )
    record = {
        "image_id": sample.key,
        "split": split,
        "width": sample.width,
        "height": sample.height,
        "instances": instances,
    }
    fields["json"] = json.dumps(record, sort_keys=True).encode()
    fields["jpg"] = sample.jpeg if sample.jpeg is not None else encode_jpeg(sample.image)
    members = [(f"{sample.key}.{name}", fields[name]) for name in sorted(fields)]
    return members + list(sample.extra_members)


def write_tar(path: str | Path, members: Sequence[tuple[str, bytes | SymbolicLink]]) -> bytes:
    """A byte-reproducible USTAR tar of ``members``, names taken as given (hostile ones too)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = TAR_MTIME
            info.mode = 0o444
            info.uname = info.gname = "oistream"
            if isinstance(data, SymbolicLink):
                info.type = tarfile.SYMTYPE
                info.linkname = data.target
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    Path(path).write_bytes(data)
    return data


def write_shards(
    root: str | Path,
    samples: Sequence[FakeSample],
    *,
    samples_per_shard: int = 4,
    split: str = "train",
    num_classes: int = len(FAKE_MIDS),
    manifest: bool = True,
    extra_members: dict[int, list[tuple[str, bytes]]] | None = None,
) -> list[Path]:
    """Write ``samples`` as ``{split}-{NNNNNN}.tar`` under ``root`` (plus ``manifest.json``).

    ``extra_members[i]`` are appended raw to shard i (names taken as they are).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    shard_records = []
    for index, start in enumerate(range(0, len(samples), samples_per_shard)):
        chunk = samples[start : start + samples_per_shard]
        members = [m for sample in chunk for m in sample_members(sample, split)]
        members += (extra_members or {}).get(index, [])
        name = f"{split}-{index:06d}.tar"
        data = write_tar(root / name, members)
        paths.append(root / name)
        shard_records.append(
            {
                "name": name,
                "samples": len(chunk),
                "instances": sum(len(s.instances) for s in chunk),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    if manifest:
        record = {
            "format_version": 1,
            "oistream_version": "tests",
            "split": split,
            "classes": classes_table(num_classes),
            "shards": shard_records,
            "totals": {
                "samples": len(samples),
                "instances": sum(len(s.instances) for s in samples),
            },
            "failures": [],
        }
        (root / "manifest.json").write_text(json.dumps(record, indent=1))
    return paths


@dataclass
class SymbolicLink:
    """A tar member that is a symbolic link to ``target`` rather than a file."""

    target: str


class _CreatesFileWhenUnpickled:
    """Unpickling this calls ``open(path, "w")``: proof that a loader unpickled a member."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_bomb(marker_path: str | Path) -> bytes:
    return pickle.dumps(_CreatesFileWhenUnpickled(str(marker_path)))


def hostile_members(key: str, marker_path: str | Path) -> list[tuple[str, bytes]]:
    """Members a shard from an untrusted place might carry next to sample ``key``.

    Pickles (which would create ``marker_path`` if loaded), names that leave the folder, an
    absolute path, and a sample "linked" whose image is a symbolic link to a file outside.
    """
    bomb = pickle_bomb(marker_path)
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    return [
        (f"{key}.pyd", bomb),
        (f"{key}.pickle", bomb),
        ("../evil.jpg", jpeg),
        ("../evil.json", b'{"instances": []}'),
        (f"{key}/../../evil2.jpg", jpeg),
        ("/tmp/oistream-evil.jpg", jpeg),
        ("linked0000000000.jpg", SymbolicLink("/etc/hostname")),
        ("linked0000000000.json", json.dumps({"width": 8, "height": 8, "instances": []}).encode()),
    ]


def corrupt(data: bytes) -> bytes:
    """Keep the signature, break the body: decoders fail inside the stream, not at its start."""
    return data[:24] + bytes(b ^ 0x5A for b in data[24:])
