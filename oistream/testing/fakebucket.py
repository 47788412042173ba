"""A synthetic Open Images bucket with the real layout, for tests, demos and benchmarks.

``make_fake_bucket(root)`` writes two folders that mirror the two public roots (DESIGN section 2):

    root/open-images-dataset/{split}/{ImageID}.jpg
    root/openimages/v5/{split}-masks/{split}-masks-{c}.zip          c in 0-9a-f, all 16 per split
    root/openimages/v5/{split}-annotations-object-segmentation.csv
    root/openimages/v5/classes-segmentation.txt
    root/openimages/v5/class-descriptions-boxable.csv               no header (V5)
    root/openimages/v7/oidv7-class-descriptions-boxable.csv         header (V7)
    root/openimages/v5/{validation,test}-annotations-bbox.csv       boxes (IsGroupOf, box-only)
    root/openimages/2018_04/train/train-annotations-bbox.csv        train's boxes (V4 path)
    root/openimages/v5/{split}-annotations-human-imagelabels-boxable.csv   verified labels
    root/openimages/2018_04/bbox_labels_600_hierarchy.json          the class hierarchy

Served by ``oistream.testing.s3server`` as the buckets ``open-images-dataset`` and ``openimages``, a
program cannot tell it from the real thing by its layout. It reproduces the traits that break
naive readers: masks at a different resolution from their image (long side x 1600/1024,
rounded, and sometimes smaller still), 1-bit and 8-bit PNGs, Zip64 end records, members of
other images and classes in every zip, empty PredictedIoU cells, annotator boxes that are not
the mask's tight box.

The scenes are drawn so that Mask R-CNN can learn them: each class has its own shape and colour
family on a textured background, and instances overlap. Distractor classes (Dog, Cat, Bicycle,
Horse) appear in the same scenes so that a class filter has something to drop.

Everything is seeded: the same arguments give the same bytes.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import struct
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from oistream.sources import MASK_PREFIXES, SPLITS

IMAGES_BUCKET = "open-images-dataset"
METADATA_BUCKET = "openimages"

SEGMENTATION_HEADER = (
    "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks"
)

# Real Open Images MIDs. The four classes the project is about...
PERSON, CAR, TRAFFIC_LIGHT, TRAFFIC_SIGN = "/m/01g317", "/m/0k4j", "/m/015qff", "/m/01mqdt"
# ...classes drawn into the same scenes that a class filter must drop...
DOG, CAT, BICYCLE, HORSE = "/m/0bt9lr", "/m/01yrx", "/m/0199g", "/m/03k3r"
TARGET_MIDS = (PERSON, CAR, TRAFFIC_LIGHT, TRAFFIC_SIGN)
DISTRACTOR_MIDS = (DOG, CAT, BICYCLE, HORSE)
SCENE_MIDS = TARGET_MIDS + DISTRACTOR_MIDS

# ...segmentable classes that never occur in the fake's images...
_UNUSED_SEGMENTABLE = [
    ("/m/01bjv", "Bus"),
    ("/m/07r04", "Truck"),
    ("/m/04_sv", "Motorcycle"),
    ("/m/015p6", "Bird"),
    ("/m/01pns0", "Fire hydrant"),
    ("/m/02pv19", "Stop sign"),
]
# ...and boxable classes without masks: the boxable list is longer than the segmentable one.
# Vehicle, Land vehicle, Animal, Mammal and Carnivore are parents in the hierarchy.
_BOXABLE_ONLY = [
    ("/m/011k07", "Tortoise"),
    ("/m/011q46kg", "Container"),
    ("/m/012074", "Magpie"),
    ("/m/07yv9", "Vehicle"),
    ("/m/01prls", "Land vehicle"),
    ("/m/0jbk", "Animal"),
    ("/m/04rky", "Mammal"),
    ("/m/01lrl", "Carnivore"),
]

_DISPLAY_NAMES = {
    PERSON: "Person",
    CAR: "Car",
    TRAFFIC_LIGHT: "Traffic light",
    TRAFFIC_SIGN: "Traffic sign",
    DOG: "Dog",
    CAT: "Cat",
    BICYCLE: "Bicycle",
    HORSE: "Horse",
}

# (MID, display name) of every boxable class of the fake, sorted by MID as the real file is.
FAKE_CLASSES: list[tuple[str, str]] = sorted(
    [*_DISPLAY_NAMES.items(), *_UNUSED_SEGMENTABLE, *_BOXABLE_ONLY]
)
SEGMENTABLE_MIDS: list[str] = sorted([*SCENE_MIDS, *(mid for mid, _ in _UNUSED_SEGMENTABLE)])

BOX_HEADER = (
    "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,"
    "IsDepiction,IsInside"
)
IMAGE_LABELS_HEADER = "ImageID,Source,LabelName,Confidence"
HIERARCHY_ROOT = "/m/0bl9f"  # "Entity", as in bbox_labels_600_hierarchy.json


def _leaf(mid: str) -> dict[str, Any]:
    return {"LabelName": mid}


# A part of the real bbox_labels_600_hierarchy.json (real MIDs and links, Subcategory only).
FAKE_HIERARCHY: dict[str, Any] = {
    "LabelName": HIERARCHY_ROOT,
    "Subcategory": [
        _leaf("/m/011q46kg"),
        _leaf(PERSON),
        _leaf(TRAFFIC_LIGHT),
        {"LabelName": TRAFFIC_SIGN, "Subcategory": [_leaf("/m/02pv19")]},
        _leaf("/m/01pns0"),
        {
            "LabelName": "/m/07yv9",
            "Subcategory": [
                {
                    "LabelName": "/m/01prls",
                    "Subcategory": [
                        _leaf(CAR),
                        _leaf("/m/01bjv"),
                        _leaf("/m/07r04"),
                        _leaf("/m/04_sv"),
                        _leaf(BICYCLE),
                    ],
                }
            ],
        },
        {
            "LabelName": "/m/0jbk",
            "Subcategory": [
                {"LabelName": "/m/015p6", "Subcategory": [_leaf("/m/012074")]},
                _leaf("/m/011k07"),
                {
                    "LabelName": "/m/04rky",
                    "Subcategory": [
                        {"LabelName": "/m/01lrl", "Subcategory": [_leaf(DOG), _leaf(CAT)]},
                        _leaf(HORSE),
                    ],
                },
            ],
        },
    ],
}
# Of every this many images, one gets a box without a mask and one a group-of box.
_BOX_ONLY_EVERY = 3
_GROUP_OF_EVERY = 4

# Real masks have a long side of 1600 px where the image's is 1024.
MASK_SCALE = 1600 / 1024
# Some real masks are smaller than their image; this many of the fake's scenes get masks at
# SMALL_MASK_SCALE of the image's size instead (scene index % SMALL_MASK_EVERY == last).
SMALL_MASK_SCALE = 0.75
SMALL_MASK_EVERY = 6

# Fixed zip member timestamp: byte-reproducible zips.
_ZIP_DATE_TIME = (2019, 5, 1, 0, 0, 0)
_MAX_INSTANCES = 6
# An instance keeps its mask only if at least this share of its shape lies inside the image.
_MIN_VISIBLE = 0.35


def _round_half_up(value: float) -> int:
    # Python's round() goes to even on .5; the mask size rule wants the arithmetic rounding.
    return int(np.floor(value + 0.5))


def mask_size(width: int, height: int, scale: float = MASK_SCALE) -> tuple[int, int]:
    """The (width, height) of a mask for an image of ``width`` x ``height`` at ``scale``."""
    return _round_half_up(width * scale), _round_half_up(height * scale)


# ---------------------------------------------------------------------------------------------
# Scene rendering


@dataclass(frozen=True)
class _Instance:
    mid: str
    png: bytes
    box: tuple[str, str, str, str]  # XMin, XMax, YMin, YMax, formatted as in the CSV
    predicted_iou: str
    clicks: str


@dataclass(frozen=True)
class _Scene:
    width: int
    height: int
    jpeg: bytes
    instances: tuple[_Instance, ...]


# A drawing primitive in image pixels: (kind, coordinates, RGB colour, width or radius).
_Part = tuple[str, list[float], tuple[int, int, int], float]


def _jitter(rng: np.random.Generator, base: tuple[int, int, int], spread: int = 25) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in base)


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _person(rng: np.random.Generator, cx: float, cy: float, W: int, H: int) -> list[_Part]:
    h = rng.uniform(0.35, 0.85) * H
    top = cy - h / 2
    skin = _jitter(rng, _pick(rng, [(224, 172, 135), (198, 134, 90), (141, 85, 54)]), 12)
    shirt = _jitter(rng, _pick(rng, [(215, 40, 40), (235, 120, 30), (220, 60, 140)]))
    trousers = _jitter(rng, _pick(rng, [(110, 30, 30), (90, 50, 20), (130, 40, 80)]), 15)
    shoulder = 0.16 * h
    return [
        ("rect", [cx - 0.13 * h, top + 0.54 * h, cx - 0.01 * h, top + h], trousers, 0),
        ("rect", [cx + 0.01 * h, top + 0.54 * h, cx + 0.13 * h, top + h], trousers, 0),
        (
            "line",
            [cx - shoulder, top + 0.22 * h, cx - shoulder - 0.05 * h, top + 0.52 * h],
            shirt,
            0.06 * h,
        ),
        (
            "line",
            [cx + shoulder, top + 0.22 * h, cx + shoulder + 0.05 * h, top + 0.52 * h],
            shirt,
            0.06 * h,
        ),
        ("rrect", [cx - shoulder, top + 0.18 * h, cx + shoulder, top + 0.58 * h], shirt, 0.05 * h),
        ("ellipse", [cx - 0.085 * h, top, cx + 0.085 * h, top + 0.19 * h], skin, 0),
    ]


def _car(rng: np.random.Generator, cx: float, cy: float, W: int, H: int) -> list[_Part]:
    w = rng.uniform(0.25, 0.6) * W
    h = 0.45 * w
    body = _jitter(rng, _pick(rng, [(30, 70, 200), (40, 120, 220), (20, 40, 130), (70, 150, 230)]))
    glass = _jitter(rng, (170, 210, 235), 15)
    wheel = _jitter(rng, (25, 25, 28), 8)
    return [
        (
            "polygon",
            [
                cx - 0.3 * w,
                cy - 0.1 * h,
                cx - 0.17 * w,
                cy - 0.5 * h,
                cx + 0.2 * w,
                cy - 0.5 * h,
                cx + 0.33 * w,
                cy - 0.1 * h,
            ],
            glass,
            0,
        ),
        ("rrect", [cx - 0.5 * w, cy - 0.15 * h, cx + 0.5 * w, cy + 0.3 * h], body, 0.12 * h),
        ("ellipse", [cx - 0.42 * w, cy + 0.1 * h, cx - 0.18 * w, cy + 0.5 * h], wheel, 0),
        ("ellipse", [cx + 0.18 * w, cy + 0.1 * h, cx + 0.42 * w, cy + 0.5 * h], wheel, 0),
    ]


def _traffic_light(rng: np.random.Generator, cx: float, cy: float, W: int, H: int) -> list[_Part]:
    h = rng.uniform(0.15, 0.4) * H
    w = 0.36 * h
    top = cy - h / 2
    lit = int(rng.integers(3))
    lamps = [
        ((255, 40, 30), (90, 20, 15)),
        ((255, 190, 0), (90, 70, 10)),
        ((40, 230, 80), (15, 80, 30)),
    ]
    parts: list[_Part] = [
        ("rrect", [cx - w / 2, top, cx + w / 2, top + h], _jitter(rng, (38, 38, 44), 8), 0.12 * w)
    ]
    for k, (bright, dim) in enumerate(lamps):
        ly = top + (0.18 + 0.32 * k) * h
        r = 0.3 * w
        parts.append(("ellipse", [cx - r, ly - r, cx + r, ly + r], bright if k == lit else dim, 0))
    return parts


def _regular_polygon(cx: float, cy: float, r: float, sides: int, turn: float) -> list[float]:
    angles = turn + np.arange(sides) * 2 * np.pi / sides
    return [v for a in angles for v in (cx + r * np.cos(a), cy + r * np.sin(a))]


def _traffic_sign(rng: np.random.Generator, cx: float, cy: float, W: int, H: int) -> list[_Part]:
    r = rng.uniform(0.06, 0.13) * min(W, H)
    shape = _pick(rng, ["triangle", "octagon", "circle", "diamond"])
    if shape == "triangle":  # warning sign: red rim, white or yellow face
        face = _pick(rng, [(250, 250, 245), (250, 215, 0)])
        return [
            ("polygon", _regular_polygon(cx, cy, r, 3, -np.pi / 2), (210, 20, 30), 0),
            ("polygon", _regular_polygon(cx, cy + 0.05 * r, 0.65 * r, 3, -np.pi / 2), face, 0),
        ]
    if shape == "octagon":
        return [
            ("polygon", _regular_polygon(cx, cy, r, 8, np.pi / 8), (245, 245, 245), 0),
            ("polygon", _regular_polygon(cx, cy, 0.85 * r, 8, np.pi / 8), (200, 15, 25), 0),
        ]
    if shape == "circle":  # prohibition sign: red ring on white
        return [
            ("ellipse", [cx - r, cy - r, cx + r, cy + r], (205, 20, 30), 0),
            (
                "ellipse",
                [cx - 0.7 * r, cy - 0.7 * r, cx + 0.7 * r, cy + 0.7 * r],
                (250, 250, 250),
                0,
            ),
        ]
    return [  # diamond: yellow with a black rim
        ("polygon", _regular_polygon(cx, cy, r, 4, 0), (20, 20, 20), 0),
        ("polygon", _regular_polygon(cx, cy, 0.82 * r, 4, 0), (250, 205, 10), 0),
    ]


def _quadruped(
    rng: np.random.Generator, cx: float, cy: float, w: float, colour: tuple, *, ears: bool
) -> list[_Part]:
    h = 0.42 * w
    side = _pick(rng, [-1, 1])  # which way it faces
    head_x = cx + side * 0.5 * w
    head_r = 0.22 * h if not ears else 0.3 * h
    leg = 0.07 * w
    parts: list[_Part] = [
        ("line", [cx + dx * w, cy, cx + dx * w, cy + 0.55 * h], colour, leg)
        for dx in (-0.35, -0.22, 0.22, 0.35)
    ]
    parts.append(
        (
            "line",
            [cx - side * 0.45 * w, cy - 0.1 * h, cx - side * 0.62 * w, cy - 0.45 * h],
            colour,
            0.5 * leg,
        )
    )
    parts.append(("ellipse", [cx - 0.5 * w, cy - 0.3 * h, cx + 0.5 * w, cy + 0.3 * h], colour, 0))
    parts.append(
        ("line", [cx + side * 0.35 * w, cy - 0.1 * h, head_x, cy - 0.55 * h], colour, 1.4 * leg)
    )
    parts.append(
        (
            "ellipse",
            [head_x - head_r, cy - 0.55 * h - head_r, head_x + head_r, cy - 0.55 * h + head_r],
            colour,
            0,
        )
    )
    if ears:
        for dx in (-0.6, 0.2):
            ex = head_x + dx * head_r
            ey = cy - 0.55 * h - 0.7 * head_r
            parts.append(
                (
                    "polygon",
                    [ex, ey, ex + 0.4 * head_r, ey, ex + 0.2 * head_r, ey - 0.7 * head_r],
                    colour,
                    0,
                )
            )
    return parts


def _dog(rng: np.random.Generator, cx: float, cy: float, W: int, H: int) -> list[_Part]:
    colour = _jitter(rng, _pick(rng, [(150, 100, 50), (200, 160, 100), (95, 60, 35)]), 15)
    return _quadruped(rng, cx, cy, rng.uniform(0.15, 0.3) * W, colour, ears=False)


def _cat(rng: np.random.Generator, cx: float, cy: float, W: int, H: int) -> list[_Part]:
    colour = _jitter(rng, _pick(rng, [(130, 130, 130), (70, 70, 75), (200, 200, 195)]), 12)
    return _quadruped(rng, cx, cy, rng.uniform(0.1, 0.18) * W, colour, ears=True)


def _horse(rng: np.random.Generator, cx: float, cy: float, W: int, H: int) -> list[_Part]:
    colour = _jitter(rng, _pick(rng, [(90, 50, 25), (40, 28, 20), (120, 80, 45)]), 12)
    return _quadruped(rng, cx, cy, rng.uniform(0.28, 0.45) * W, colour, ears=False)


def _bicycle(rng: np.random.Generator, cx: float, cy: float, W: int, H: int) -> list[_Part]:
    r = rng.uniform(0.06, 0.12) * W
    frame = _jitter(rng, _pick(rng, [(20, 160, 120), (30, 180, 60), (0, 130, 150)]))
    tyre = (30, 30, 30)
    stroke = max(0.18 * r, 1.5)
    back, front = cx - 1.2 * r, cx + 1.2 * r
    seat, bar = (cx - 0.4 * r, cy - 1.2 * r), (cx + 0.9 * r, cy - 1.3 * r)
    return [
        ("ring", [back - r, cy - r, back + r, cy + r], tyre, stroke),
        ("ring", [front - r, cy - r, front + r, cy + r], tyre, stroke),
        ("line", [back, cy, cx, cy, *seat, back, cy], frame, stroke),
        ("line", [cx, cy, *bar, front, cy], frame, stroke),
        ("line", [*seat, *bar], frame, stroke),
    ]


_DRAWERS: dict[str, Callable[..., list[_Part]]] = {
    PERSON: _person,
    CAR: _car,
    TRAFFIC_LIGHT: _traffic_light,
    TRAFFIC_SIGN: _traffic_sign,
    DOG: _dog,
    CAT: _cat,
    BICYCLE: _bicycle,
    HORSE: _horse,
}
# How often each class is drawn after an image's first instance.
_CLASS_WEIGHTS = np.array([0.3, 0.22, 0.12, 0.14, 0.06, 0.05, 0.06, 0.05])


def _paint(
    draw: ImageDraw.ImageDraw,
    parts: list[_Part],
    sx: float,
    sy: float,
    fill: tuple | int | None,
    offset: tuple[float, float] = (0.0, 0.0),
) -> None:
    """Draw ``parts`` scaled by (sx, sy), then shifted by ``offset``; ``fill`` overrides every
    part's colour (masks)."""
    for kind, coords, colour, size in parts:
        ink = colour if fill is None else fill
        xy = [v * (sx, sy)[i % 2] + offset[i % 2] for i, v in enumerate(coords)]
        width = max(1, _round_half_up(size * (sx + sy) / 2))
        if kind == "ellipse":
            draw.ellipse(xy, fill=ink)
        elif kind == "rect":
            draw.rectangle(xy, fill=ink)
        elif kind == "rrect":
            draw.rounded_rectangle(xy, radius=width, fill=ink)
        elif kind == "polygon":
            draw.polygon(xy, fill=ink)
        elif kind == "line":
            draw.line(xy, fill=ink, width=width, joint="curve")
        elif kind == "ring":
            draw.ellipse(xy, outline=ink, width=width)
        else:  # pragma: no cover - a typo in a drawer
            raise ValueError(kind)


def _full_area(parts: list[_Part], sx: float, sy: float, mw: int, mh: int) -> int:
    """Pixels of the whole shape, parts off the mask's frame included (on a 3x canvas)."""
    canvas = Image.new("L", (3 * mw, 3 * mh), 0)
    _paint(ImageDraw.Draw(canvas), parts, sx, sy, fill=255, offset=(mw, mh))
    return int(np.count_nonzero(np.asarray(canvas)))


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Sky-to-ground gradient, a few soft blobs and pixel noise: texture, not a flat colour."""
    sky = np.array(
        _jitter(rng, _pick(rng, [(150, 190, 230), (200, 200, 205), (120, 150, 190)]), 20),
        dtype=np.float32,
    )
    ground = np.array(
        _jitter(rng, _pick(rng, [(110, 110, 105), (90, 120, 70), (150, 140, 120)]), 20),
        dtype=np.float32,
    )
    horizon = rng.uniform(0.3, 0.6)
    t = np.clip((np.linspace(0, 1, height) - horizon) * 6 + 0.5, 0, 1)[:, None, None]
    pixels = np.broadcast_to(sky * (1 - t) + ground * t, (height, width, 3)).copy()
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(2, 6))):
        bx, by = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.05, 0.25) * max(width, height)
        weight = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * radius**2))[..., None]
        pixels += weight * rng.uniform(-40, 40, size=3)
    pixels += rng.normal(0, 9, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _fmt_coordinate(value: float) -> str:
    # The real CSV writes box coordinates with up to 6 decimals, trailing zeros dropped
    # ("0.8875", "0.960938").
    text = f"{value:.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _annotator_box(rng: np.random.Generator, mask: np.ndarray) -> tuple[str, str, str, str]:
    """The box the annotator started from: the mask's tight box, slightly larger, clipped."""
    rows, cols = np.nonzero(mask)
    mh, mw = mask.shape
    x0, x1 = cols.min() / mw, (cols.max() + 1) / mw
    y0, y1 = rows.min() / mh, (rows.max() + 1) / mh
    grow = rng.uniform(0, 0.02, size=4)
    box = (
        max(0.0, x0 - grow[0]),
        min(1.0, x1 + grow[1]),
        max(0.0, y0 - grow[2]),
        min(1.0, y1 + grow[3]),
    )
    return tuple(_fmt_coordinate(v) for v in box)  # type: ignore[return-value]


def _clicks(rng: np.random.Generator, mask: np.ndarray) -> str:
    """1-8 ``x y t`` clicks: t=1 on the object, t=0 on background inside its box."""
    mh, mw = mask.shape
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    background = np.argwhere(~mask[r0:r1, c0:c1]) + np.array([r0, c0])
    triples = []
    for _ in range(int(rng.integers(1, 9))):
        if rng.random() < 0.25 and len(background):
            y, x = background[rng.integers(len(background))]
            t = 0
        else:
            k = rng.integers(len(rows))
            y, x, t = rows[k], cols[k], 1
        triples.append(f"{(x + 0.5) / mw:.5f} {(y + 0.5) / mh:.5f} {t}")
    return ";".join(triples)


def _encode_png(mask: np.ndarray, one_bit: bool) -> bytes:
    image = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    if one_bit:
        image = image.convert("1")
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _scene_size(rng: np.random.Generator, long_side: int) -> tuple[int, int]:
    aspect = _pick(rng, [4 / 3, 3 / 2, 16 / 9, 1.0, 5 / 4, 1.6, 2.0])
    aspect = max(1.0, aspect * rng.uniform(0.95, 1.05))
    short = max(16, _round_half_up(long_side / aspect))
    portrait = rng.random() < 0.3
    return (short, long_side) if portrait else (long_side, short)


def _render_scene(seed: Sequence[int], index: int, long_side: int) -> _Scene:
    """One image and its instances. ``index`` fixes the first class and the mask variants so
    that any run of 8 consecutive scenes holds every class."""
    rng = np.random.default_rng(list(seed))
    width, height = _scene_size(rng, long_side)
    small_masks = index % SMALL_MASK_EVERY == SMALL_MASK_EVERY - 1
    mw, mh = mask_size(width, height, MASK_SCALE if not small_masks else SMALL_MASK_SCALE)
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)

    count = int(rng.integers(1, _MAX_INSTANCES + 1))
    instances: list[_Instance] = []
    centres: list[tuple[float, float, float]] = []
    for k in range(count):
        mid = (
            SCENE_MIDS[index % len(SCENE_MIDS)]
            if k == 0
            else SCENE_MIDS[int(rng.choice(len(SCENE_MIDS), p=_CLASS_WEIGHTS))]
        )
        if centres and rng.random() < 0.6:  # next to an earlier object, so that they overlap
            px, py, reach = centres[int(rng.integers(len(centres)))]
            cx = float(np.clip(px + rng.uniform(-reach, reach), 0.05 * width, 0.95 * width))
            cy = float(np.clip(py + rng.uniform(-reach, reach), 0.05 * height, 0.95 * height))
        else:
            # Things that stand on the ground stand low; lights and signs hang higher.
            low, high = (0.2, 0.6) if mid in (TRAFFIC_LIGHT, TRAFFIC_SIGN) else (0.45, 0.85)
            cx, cy = rng.uniform(0.12, 0.88) * width, rng.uniform(low, high) * height
        parts = _DRAWERS[mid](rng, cx, cy, width, height)

        mask_image = Image.new("L", (mw, mh), 0)
        _paint(ImageDraw.Draw(mask_image), parts, mw / width, mh / height, fill=255)
        mask = np.asarray(mask_image) > 0
        if mask.sum() < _MIN_VISIBLE * _full_area(parts, mw / width, mh / height, mw, mh):
            continue  # mostly off the image: a sliver no annotator would have masked
        _paint(draw, parts, 1.0, 1.0, fill=None)
        centres.append((cx, cy, 0.12 * max(width, height)))
        iou = "" if rng.random() < 0.1 else f"{rng.uniform(0.45, 0.98):.5f}"
        instances.append(
            _Instance(
                mid=mid,
                png=_encode_png(mask, one_bit=(index + k) % 5 == 2),
                box=_annotator_box(rng, mask),
                predicted_iou=iou,
                clicks=_clicks(rng, mask),
            )
        )

    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return _Scene(width, height, out.getvalue(), tuple(instances))


# ---------------------------------------------------------------------------------------------
# Writing the bucket


def _render_scenes(
    seeds: list[tuple[int, ...]], long_side: int, processes: int
) -> Iterator[_Scene]:
    """Scene ``j`` rendered from ``seeds[j]`` with index ``j``, in order, in ``processes``
    processes (each scene has its own seed: the bytes do not depend on how many)."""
    indices = range(len(seeds))
    if processes <= 1 or len(seeds) < 2:
        for seed, index in zip(seeds, indices, strict=True):
            yield _render_scene(seed, index, long_side)
        return
    # spawn, not fork: callers (test fixtures, the demo) may have server threads running.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(processes, len(seeds)), mp_context=context) as pool:
        chunk = max(1, len(seeds) // (8 * processes))
        yield from pool.map(
            _render_scene, seeds, indices, [long_side] * len(seeds), chunksize=chunk
        )


def _box_ids(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` distinct 8-hex BoxIDs (they only need to be unique within an image)."""
    ids: list[str] = []
    while len(ids) < count:
        candidate = rng.bytes(4).hex()
        if candidate not in ids:
            ids.append(candidate)
    return ids


def _image_ids(rng: np.random.Generator, count: int, taken: set[str]) -> list[str]:
    """Random 16-hex IDs whose first characters cycle through 0-f, so every zip gets members."""
    ids: list[str] = []
    while len(ids) < count:
        candidate = MASK_PREFIXES[len(ids) % 16] + rng.bytes(8).hex()[1:]
        if candidate not in taken:
            taken.add(candidate)
            ids.append(candidate)
    return ids


def _write_zip(path: Path, members: list[tuple[str, bytes]], force_zip64: bool) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    if force_zip64:
        _force_zip64_end_records(path)


def _force_zip64_end_records(path: Path) -> None:
    """Rewrite the tail of a small zip the way a >65,535-member one looks: a Zip64 end record
    and locator, then a classic end record whose count/size/offset fields all say "see Zip64"
    (0xFFFF / 0xFFFFFFFF), so that a reader that ignores Zip64 fails here as it would on the
    real train zips."""
    with open(path, "r+b") as f:
        f.seek(-22, os.SEEK_END)
        eocd_at = f.tell()
        eocd = f.read(22)
        signature, _, _, _, count, cd_size, cd_offset, comment = struct.unpack("<4s4H2LH", eocd)
        if signature != b"PK\x05\x06" or comment:
            raise ValueError(f"{path}: unexpected end record")
        if eocd_at >= 20:
            f.seek(eocd_at - 20)
            if f.read(4) == b"PK\x06\x07":
                return  # zipfile already wrote Zip64 records (more than 65,535 members)
        zip64_end = struct.pack(
            "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, cd_size, cd_offset
        )
        locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd_at, 1)
        classic = struct.pack(
            "<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0
        )
        f.seek(eocd_at)
        f.truncate()
        f.write(zip64_end + locator + classic)


def has_zip64_end_records(path: str | os.PathLike) -> bool:
    """Whether a zip ends with a Zip64 end record and locator (read from the file's tail)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 22 - 20 - 56))
        tail = f.read()
    return tail[-42:-38] == b"PK\x06\x07" and b"PK\x06\x06" in tail


@dataclass(frozen=True)
class _Row:
    mask_path: str
    image_id: str
    mid: str
    box_id: str
    instance: _Instance


def _split_rows(
    ids: list[str], scenes: Iterable[_Scene], rng: np.random.Generator
) -> Iterator[tuple[str, _Scene, list[_Row]]]:
    for image_id, scene in zip(ids, scenes, strict=True):
        box_ids = _box_ids(rng, len(scene.instances))
        rows = [
            _Row(
                f"{image_id}_{inst.mid.replace('/', '')}_{box_id}.png",
                image_id,
                inst.mid,
                box_id,
                inst,
            )
            for inst, box_id in zip(scene.instances, box_ids, strict=True)
        ]
        yield image_id, scene, rows


def _csv_line(row: _Row) -> str:
    inst = row.instance
    return ",".join(
        [
            row.mask_path,
            row.image_id,
            row.mid,
            row.box_id,
            *inst.box,
            inst.predicted_iou,
            inst.clicks,
        ]
    )


def _write_class_lists(metadata: Path) -> None:
    (metadata / "v5").mkdir(parents=True, exist_ok=True)
    (metadata / "v7").mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{mid},{name}\n" for mid, name in FAKE_CLASSES)
    (metadata / "v7" / "oidv7-class-descriptions-boxable.csv").write_text(
        "LabelName,DisplayName\n" + rows, encoding="utf-8"
    )
    (metadata / "v5" / "class-descriptions-boxable.csv").write_text(rows, encoding="utf-8")
    (metadata / "v5" / "classes-segmentation.txt").write_text(
        "".join(f"{mid}\n" for mid in SEGMENTABLE_MIDS), encoding="utf-8"
    )


def _box_path(metadata: Path, split: str) -> Path:
    if split == "train":
        return metadata / "2018_04" / "train" / "train-annotations-bbox.csv"
    return metadata / "v5" / f"{split}-annotations-bbox.csv"


def _write_evaluation_files(
    metadata: Path, split: str, ids: list[str], rows: list[_Row], rng: np.random.Generator
) -> None:
    """The split's box CSV (a row per mask, plus boxes without masks and group-of boxes), its
    human-verified image-level labels (positives, negatives, classes without boxes) and the
    hierarchy, at the real paths with the real headers."""
    hierarchy = metadata / "2018_04" / "bbox_labels_600_hierarchy.json"
    hierarchy.parent.mkdir(parents=True, exist_ok=True)
    hierarchy.write_text(json.dumps(FAKE_HIERARCHY, indent=4) + "\n", encoding="utf-8")
    by_image: dict[str, list[_Row]] = {}
    for row in rows:
        by_image.setdefault(row.image_id, []).append(row)
    boxes: list[str] = []
    labels: list[str] = []
    absent = [DOG, CAT, HORSE, BICYCLE, TRAFFIC_SIGN, "/m/01bjv", "/m/07r04", "/m/011k07"]
    for j, image_id in enumerate(sorted(ids)):
        present: set[str] = set()
        for row in by_image.get(image_id, []):
            xmin, xmax, ymin, ymax = row.instance.box
            boxes.append(f"{image_id},xclick,{row.mid},1,{xmin},{xmax},{ymin},{ymax},0,0,0,0,0")
            present.add(row.mid)
        coords = sorted(float(v) for v in rng.uniform(0.0, 1.0, 4))
        x0, x1, y0, y1 = (_fmt_coordinate(v) for v in (coords[0], coords[2], coords[1], coords[3]))
        if j % _BOX_ONLY_EVERY == 0:  # an object annotated with a box only
            mid = _pick(rng, TARGET_MIDS)
            boxes.append(f"{image_id},xclick,{mid},1,{x0},{x1},{y0},{y1},1,0,0,0,0")
            present.add(mid)
        if j % _GROUP_OF_EVERY == 1:  # a crowd of people in one box
            boxes.append(f"{image_id},xclick,{PERSON},1,{x0},{x1},{y0},{y1},1,0,1,0,0")
            present.add(PERSON)
        verified = {mid: 1 for mid in present}
        for mid in rng.choice(absent, size=2, replace=False):
            verified.setdefault(str(mid), 0)  # verified absent
        if j % 5 == 2:  # verified present but never boxed
            verified.setdefault(str(_pick(rng, ["/m/011q46kg", "/m/01bjv", TRAFFIC_LIGHT])), 1)
        labels.extend(
            f"{image_id},verification,{mid},{flag}" for mid, flag in sorted(verified.items())
        )
    path = _box_path(metadata, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(BOX_HEADER + "\n" + "".join(b + "\n" for b in boxes), encoding="utf-8")
    (metadata / "v5" / f"{split}-annotations-human-imagelabels-boxable.csv").write_text(
        IMAGE_LABELS_HEADER + "\n" + "".join(line + "\n" for line in labels), encoding="utf-8"
    )


def make_fake_bucket(
    root: str | os.PathLike,
    images: int = 64,
    *,
    seed: int = 0,
    image_size: int = 320,
    zip64: bool = False,
    distinct_scenes: int | None = None,
    splits: Sequence[str] = SPLITS,
    processes: int = 1,
) -> dict:
    """Write a synthetic Open Images bucket under ``root`` and return a summary of it.

    ``images`` train images; validation and test get ``max(8, images // 4)`` each. ``image_size``
    is the images' long side (the real one is 1024). ``zip64=True`` gives the train zips Zip64
    end records even when they are small; validation and test zips always have them, so every
    reader meets them. ``distinct_scenes=K`` renders only K scenes and reuses their encoded bytes
    under fresh IDs: large buckets (tens of thousands of members per zip) in little time.
    ``processes`` > 1 renders the scenes in that many processes (each scene has its own seed, so
    the bytes are the same as with one).

    The summary: ``{"root", "images_root", "metadata_root", "splits": {split: {"images",
    "instances", "classes": {MID: instances}, "images_per_class": {MID: images}}}}``.
    """
    if not 16 <= image_size <= 1024:
        raise ValueError("image_size must be between 16 and 1024 (the real long side is 1024)")
    if distinct_scenes is not None and distinct_scenes < 1:
        raise ValueError("distinct_scenes must be at least 1")
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected some of {SPLITS}")

    root = Path(root)
    images_root, metadata = root / IMAGES_BUCKET, root / METADATA_BUCKET
    _write_class_lists(metadata)

    if distinct_scenes is not None:
        shared_seeds = [(seed, 1000, k) for k in range(distinct_scenes)]
        shared_scenes = list(_render_scenes(shared_seeds, image_size, processes))

    taken_ids: set[str] = set()
    summary: dict[str, Any] = {
        "root": str(root),
        "images_root": str(images_root),
        "metadata_root": str(metadata),
        "splits": {},
    }
    for split_index, split in enumerate(SPLITS):
        # IDs are drawn for every split, written or not, so a split's IDs do not depend on
        # which other splits were asked for.
        count = images if split == "train" else max(8, images // 4)
        id_rng = np.random.default_rng([seed, 2000, split_index])
        ids = _image_ids(id_rng, count, taken_ids)
        if split not in splits:
            continue

        if distinct_scenes is None:
            seeds = [(seed, split_index, j) for j in range(count)]
            scenes: Iterable[_Scene] = _render_scenes(seeds, image_size, processes)
        else:
            # Every scene used equally often, in shuffled order: were image j to get scene
            # j % K, a zip (image j's prefix is j % 16) would always get the same scenes and
            # the zips' member counts would differ by the scenes' instance counts.
            assignment = np.arange(count) % distinct_scenes
            np.random.default_rng([seed, 3000, split_index]).shuffle(assignment)

            scenes = (shared_scenes[int(k)] for k in assignment)

        image_dir = images_root / split
        image_dir.mkdir(parents=True, exist_ok=True)
        rows: list[_Row] = []
        images_per_class: Counter[str] = Counter()
        for image_id, scene, image_rows in _split_rows(ids, scenes, id_rng):
            (image_dir / f"{image_id}.jpg").write_bytes(scene.jpeg)
            rows.extend(image_rows)
            images_per_class.update({row.mid for row in image_rows})
        rows.sort(key=lambda row: row.mask_path)

        v5 = metadata / "v5"
        with open(
            v5 / f"{split}-annotations-object-segmentation.csv", "w", encoding="utf-8", newline=""
        ) as f:
            f.write(SEGMENTATION_HEADER + "\n")
            f.writelines(_csv_line(row) + "\n" for row in rows)

        zip_dir = v5 / f"{split}-masks"
        zip_dir.mkdir(parents=True, exist_ok=True)
        by_prefix: dict[str, list[tuple[str, bytes]]] = {c: [] for c in MASK_PREFIXES}
        for row in rows:
            by_prefix[row.image_id[0]].append((row.mask_path, row.instance.png))
        for prefix, members in by_prefix.items():
            _write_zip(
                zip_dir / f"{split}-masks-{prefix}.zip",
                members,
                force_zip64=zip64 or split != "train",
            )

        _write_evaluation_files(
            metadata, split, ids, rows, np.random.default_rng([seed, 4000, split_index])
        )

        summary["splits"][split] = {
            "images": len(ids),
            "instances": len(rows),
            "classes": dict(sorted(Counter(row.mid for row in rows).items())),
            "images_per_class": dict(sorted(images_per_class.items())),
        }
    return summary
