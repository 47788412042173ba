"""Pictures of instances: an image with translucent masks, box outlines and "name 0.93" captions.

``draw_instances`` serves both ground truth (``oistream show``) and the trainer's predictions
(float mask probabilities, scores); ``render_sample`` draws one shard sample to a PNG file.
"""

from __future__ import annotations

import colorsys
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from oistream import sources

MASK_ALPHA = 0.45
# Small images are enlarged (nearest neighbour) until the long side reaches this, so captions
# stay legible; Open Images' 1024 px images are drawn at their own size.
MIN_LONG_SIDE = 640


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _image_array(image: Any) -> np.ndarray:
    """HxWx3 uint8 from PIL, HxWx3 / 3xHxW arrays or tensors (uint8, or floats in [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = _to_numpy(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    elif array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(array)


def _binary_masks(masks: Any, count: int, height: int, width: int) -> np.ndarray:
    """bool [N, H, W] from uint8/bool masks or Mask R-CNN's float [N, 1, H, W] probabilities."""
    if masks is None:
        return np.zeros((count, height, width), bool)
    array = _to_numpy(masks)
    if array.ndim == 4:
        array = array[:, 0]
    if array.dtype.kind == "f":
        return array >= 0.5
    return array != 0


def instance_colours(count: int) -> list[tuple[int, int, int]]:
    """Well-separated saturated colours: hues stepped by the golden ratio."""
    colours = []
    for i in range(count):
        hue = (0.6 + i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.8, 0.95)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return colours


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)  # Pillow's bundled font


def _extent(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The rows and columns that hold the mask's pixels (None if it has none)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    columns = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The band of ``mask`` within ``width`` pixels (4-neighbour steps) of its edge: a crisp
    contour over the tint, so touching instances of similar colour stay apart."""
    inner = np.pad(mask, 1)  # beyond the array is outside the mask
    for _ in range(width):
        eroded = inner.copy()
        eroded[1:, :] &= inner[:-1, :]
        eroded[:-1, :] &= inner[1:, :]
        eroded[:, 1:] &= inner[:, :-1]
        eroded[:, :-1] &= inner[:, 1:]
        inner = eroded
    return mask & ~inner[1:-1, 1:-1]


def _name(class_names: Sequence[str] | Mapping[int, str], label: int) -> str:
    if isinstance(class_names, Mapping):
        return class_names.get(label, f"class {label}")
    return class_names[label] if 0 <= label < len(class_names) else f"class {label}"


def draw_instances(
    image: Any,
    masks: Any,
    boxes: Any,
    labels: Any,
    class_names: Sequence[str] | Mapping[int, str],
    scores: Any = None,
    score_threshold: float = 0.5,
) -> Image.Image:
    """The image with each instance's mask tinted in its own colour, its box and a caption.

    ``image``: PIL image, HxWx3 or 3xHxW array/tensor (uint8 or float in [0, 1]). ``masks``:
    [N, H, W] 0/1 (ground truth) or [N, 1, H, W] probabilities (predictions, cut at 0.5), or
    None. ``boxes``: [N, 4] xyxy pixels. ``labels``: [N] class indices into ``class_names``.
    With ``scores``, instances below ``score_threshold`` are left out and captions show the
    score ("Person 0.93").
    """
    pixels = _image_array(image)
    height, width = pixels.shape[:2]
    boxes_array = _to_numpy(boxes).reshape(-1, 4).astype(np.float64)
    labels_array = _to_numpy(labels).reshape(-1).astype(np.int64)
    count = len(labels_array)
    mask_array = _binary_masks(masks, count, height, width)
    keep = np.arange(count)
    score_array = None
    if scores is not None:
        score_array = _to_numpy(scores).reshape(-1).astype(np.float64)
        keep = np.flatnonzero(score_array >= score_threshold)

    factor = max(1, math.ceil(MIN_LONG_SIDE / max(height, width)))
    if factor > 1:  # enlarge for legibility; masks stay pixel-exact blocks
        pixels = pixels.repeat(factor, axis=0).repeat(factor, axis=1)
        mask_array = mask_array.repeat(factor, axis=1).repeat(factor, axis=2)
        boxes_array = boxes_array * factor
    canvas = pixels.astype(np.float32)
    colours = instance_colours(len(keep))

    # Tints first (so later instances sit on top), then contours, then boxes and captions.
    # Each mask is handled inside its own extent: a hundred predictions stay quick.
    extents = [_extent(mask_array[i]) for i in keep]
    for colour, i, extent in zip(colours, keep, extents, strict=True):
        if extent is not None:
            region, mask = canvas[extent], mask_array[i][extent]
            region[mask] = region[mask] * (1 - MASK_ALPHA) + np.asarray(colour) * MASK_ALPHA
    long_side = max(canvas.shape[:2])
    line = max(2, round(long_side / 400))
    for colour, i, extent in zip(colours, keep, extents, strict=True):
        if extent is not None:
            canvas[extent][_outline(mask_array[i][extent], line)] = colour
    result = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(result)
    font = _font(max(12, round(long_side / 45)))
    for colour, i in zip(colours, keep, strict=True):
        x0, y0, x1, y1 = boxes_array[i]
        # Boxes cover pixels [x0, x1): the outline's last pixel column is x1 - 1.
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=line)
        caption = _name(class_names, int(labels_array[i]))
        if score_array is not None:
            caption += f" {score_array[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        text_w, text_h = right - left, bottom - top
        pad = max(2, line)
        label_h = text_h + 2 * pad
        # Above the box when there is room, else just inside its top edge.
        label_y = y0 - label_h if y0 - label_h >= 0 else y0
        label_x = min(max(0, x0), max(0, result.width - text_w - 2 * pad))
        draw.rectangle(
            [label_x, label_y, label_x + text_w + 2 * pad, label_y + label_h], fill=colour
        )
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luminance > 150 else (255, 255, 255)
        draw.text((label_x + pad - left, label_y + pad - top), caption, fill=ink, font=font)
    return result


def render_sample(
    source: str | os.PathLike,
    key: str | None = None,
    out: str | os.PathLike = "show.png",
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Draw one sample's ground truth (masks, boxes, class names) to a PNG and return its path.

    ``source``: a shard folder or URL, a single ``.tar``, a pattern or list (as ShardDataset
    takes). ``key``: the sample's ImageID, the first sample when None. The sample goes through
    the loader's own decoding (``train=False``), so the picture is what a model would be fed.
    An unknown key raises OistreamError.
    """
    from oistream.loader import ShardDataset  # torch is imported only when drawing

    dataset = ShardDataset(source, shuffle=0, train=False, storage_options=storage_options)
    image, target = dataset.read_sample(key)
    picture = draw_instances(
        image, target["masks"], target["boxes"], target["labels"], dataset.class_names
    )
    out = os.fspath(out)
    if fsspec.core.split_protocol(out)[0] in (None, "file", "local"):
        folder = os.path.dirname(os.path.abspath(out))
        os.makedirs(folder, exist_ok=True)
        picture.save(out, format="PNG")
    else:
        with fsspec.open(out, "wb", **sources.storage_options(out)) as f:
            picture.save(f, format="PNG")
    return out
