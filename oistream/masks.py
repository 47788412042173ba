"""Instance-mask assembly: decoded masks of any size -> torchvision's uint8 [N, H, W] targets.

Open Images stores each instance mask as its own PNG at its own resolution. For Mask R-CNN every
mask has to be resized to the image's exact (H, W), overlaps resolved (a pixel belongs to at most
one instance, later instances on top: the Mask R-CNN samples' convention), tight boxes computed
and instances left without pixels dropped. ``assemble_masks`` does all of it in one compiled
numba pass whose work follows the masks' extent rather than N x H x W:

* the resize is Pillow's ``Image.resize((W, H), Image.NEAREST)``, reproduced exactly: Pillow
  samples source pixel ``int(pos)`` where ``pos`` starts at ``scale / 2`` and grows by ``scale``
  (``scale = src / dst`` in double precision, accumulated, not multiplied — the accumulation
  decides the ties, so it is copied as is);
* each source row is read as foreground runs, skipping zero (or all-foreground) stretches eight
  bytes at a time, and each run becomes one interval fill of destination pixels; source rows that
  no destination row samples are never read;
* occlusion paints instance numbers into an "owner" map in instance order (later overwrite
  earlier), then the owner map is read back as runs, which gives the boxes and the output planes,
  written only where the instance has pixels (the output starts as calloc'd zeros).

``reference_assemble_masks`` is the seed pipeline (Pillow resize per mask, the Mask R-CNN samples'
numpy occlusion loop, boxes from ``np.where``): the specification the tests hold the kernel to.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numba
import numpy as np
from numba import njit
from numba.typed import List
from PIL import Image

__all__ = ["assemble_masks", "decode_mask_png", "reference_assemble_masks", "warm_up"]

_SOURCE_MASK_TYPE = numba.types.Array(numba.types.uint8, 2, "C", readonly=True)

# SWAR constants: a 64-bit word holds eight mask bytes (little or big endian does not matter,
# the tests below only ask "is any byte zero / non-zero", never which one).
_LOW_BITS = np.uint64(0x0101010101010101)
_HIGH_BITS = np.uint64(0x8080808080808080)
_ZERO_WORD = np.uint64(0)


def decode_mask_png(data: bytes) -> np.ndarray:
    """Decode one mask PNG into a 2-D array (bool for 1-bit PNGs, else uint8; non-zero = object).

    ``np.asarray`` exposes Pillow's decoded buffer without a further copy.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode not in ("1", "L", "P"):
            image = image.convert("L")
        return np.asarray(image)


@njit(cache=True, nogil=True)
def _first_destination_index(source_len: int, destination_len: int) -> np.ndarray:
    """first[c] = the first destination pixel that Pillow's NEAREST resize samples from source
    index >= c (len source_len + 1), so source run [a, b) covers destinations [first[a], first[b]).

    Copies Pillow's ImagingScaleAffine: position scale/2, += scale per pixel, truncated; a
    position past the source is not sampled (Pillow leaves that pixel 0).
    """
    first = np.empty(source_len + 1, np.int64)
    scale = np.float64(source_len) / np.float64(destination_len)
    position = scale * 0.5
    sampled = destination_len
    next_source = 0
    for x in range(destination_len):
        source = int(position)
        if source >= source_len:
            sampled = x
            break
        while next_source <= source:
            first[next_source] = x
            next_source += 1
        position += scale
    for c in range(next_source, source_len + 1):
        first[c] = sampled
    return first


@njit(cache=True, nogil=True, inline="always")
def _has_zero_byte(word):
    # Classic SWAR test; exact as a yes/no answer (non-zero result iff some byte is zero).
    return (word - _LOW_BITS) & ~word & _HIGH_BITS


@njit(cache=True, nogil=True, inline="always")
def _next_foreground(flat, words, position, end):
    """Index of the first non-zero byte of flat[position:end], or end."""
    while position < end and (position & 7) != 0:
        if flat[position] != 0:
            return position
        position += 1
    while position + 32 <= end:
        k = position >> 3
        if (words[k] | words[k + 1] | words[k + 2] | words[k + 3]) != _ZERO_WORD:
            break
        position += 32
    while position + 8 <= end:
        if words[position >> 3] != _ZERO_WORD:
            break
        position += 8
    while position < end:
        if flat[position] != 0:
            return position
        position += 1
    return end


@njit(cache=True, nogil=True, inline="always")
def _next_background(flat, words, position, end):
    """Index of the first zero byte of flat[position:end], or end."""
    while position < end and (position & 7) != 0:
        if flat[position] == 0:
            return position
        position += 1
    while position + 32 <= end:
        k = position >> 3
        if (
            _has_zero_byte(words[k])
            | _has_zero_byte(words[k + 1])
            | _has_zero_byte(words[k + 2])
            | _has_zero_byte(words[k + 3])
        ) != _ZERO_WORD:
            break
        position += 32
    while position + 8 <= end:
        if _has_zero_byte(words[position >> 3]) != _ZERO_WORD:
            break
        position += 8
    while position < end:
        if flat[position] == 0:
            return position
        position += 1
    return end


@njit(cache=True, nogil=True, inline="always")
def _owner_run_end(row, row_words, x, stop, lane_shift):
    """End of the run of equal owners that starts at row[x] (row_words: the same row viewed as
    uint64 words of 1 << lane_shift owners each)."""
    value = row[x]
    lanes = 1 << lane_shift
    # The owner value repeated in every lane of a word.
    if lane_shift == 2:
        pattern = np.uint64(value) * np.uint64(0x0001000100010001)
    else:
        pattern = np.uint64(value) * np.uint64(0x0000000100000001)
    x += 1
    while x < stop and (x & (lanes - 1)) != 0:
        if row[x] != value:
            return x
        x += 1
    while x + 4 * lanes <= stop:
        k = x >> lane_shift
        if (
            (row_words[k] ^ pattern)
            | (row_words[k + 1] ^ pattern)
            | (row_words[k + 2] ^ pattern)
            | (row_words[k + 3] ^ pattern)
        ) != _ZERO_WORD:
            break
        x += 4 * lanes
    while x + lanes <= stop:
        if row_words[x >> lane_shift] != pattern:
            break
        x += lanes
    while x < stop:
        if row[x] != value:
            return x
        x += 1
    return stop


@njit(cache=True, nogil=True)
def _assemble(masks, height, width, resolve_occlusion, owner, owner_words, out, boxes, kept):
    """Fill out[:n_kept], boxes[:n_kept], kept[:n_kept]; return n_kept.

    ``out`` is zeroed [N, H, W] uint8; ``owner`` a zeroed [H, >= W] int16 or int32 map whose
    rows are 8-byte aligned and ``owner_words`` the same memory as uint64 (both used only when
    resolving occlusion); ``boxes`` float32 [N, 4]; ``kept`` int64 [N].
    """
    count = len(masks)
    # Per-instance boxes as half-open pixel ranges; x0 == width marks "no pixel yet".
    box_x0 = np.full(count, width, np.int64)
    box_y0 = np.full(count, height, np.int64)
    box_x1 = np.zeros(count, np.int64)
    box_y1 = np.zeros(count, np.int64)
    # Per destination row, the column range any instance painted (bounds the owner-map reads).
    row_lo = np.full(height, width, np.int64)
    row_hi = np.zeros(height, np.int64)
    n_kept = 0

    table_h = -1
    table_w = -1
    first_row = np.empty(0, np.int64)
    first_col = np.empty(0, np.int64)
    for i in range(count):
        source = masks[i]
        source_h, source_w = source.shape
        if source_h != table_h or source_w != table_w:  # masks of one image often share a size
            first_row = _first_destination_index(source_h, height)
            first_col = _first_destination_index(source_w, width)
            table_h = source_h
            table_w = source_w
        flat = source.reshape(source_h * source_w)
        words = flat[: (source_h * source_w) // 8 * 8].view(np.uint64)
        # Without occlusion each non-empty instance takes the next output plane directly.
        plane = n_kept
        for r in range(source_h):
            # Every row gets one branch-free (vectorised) pass, even rows no destination row
            # samples: a plain sequential stream is what keeps large masks coming from memory
            # at full speed; skipping rows, or scanning them with early exits, is 2x slower.
            row = source[r]
            any_set = np.uint8(0)
            all_set = np.uint8(255)
            for t in range(source_w):
                any_set |= row[t]
                all_set = min(all_set, row[t])
            y_begin = first_row[r]
            y_end = first_row[r + 1]
            if any_set == 0 or y_begin == y_end:
                continue
            row_start = r * source_w
            row_end = row_start + source_w
            if all_set != 0:
                position = row_start
            else:
                position = _next_foreground(flat, words, row_start, row_end)
            while position < row_end:
                if all_set != 0:
                    run_end = row_end
                else:
                    run_end = _next_background(flat, words, position, row_end)
                x_begin = first_col[position - row_start]
                x_end = first_col[run_end - row_start]
                if x_begin < x_end:
                    if resolve_occlusion:
                        for y in range(y_begin, y_end):
                            owner[y, x_begin:x_end] = i + 1
                            row_lo[y] = min(row_lo[y], x_begin)
                            row_hi[y] = max(row_hi[y], x_end)
                    else:
                        for y in range(y_begin, y_end):
                            out[plane, y, x_begin:x_end] = 1
                        box_x0[i] = min(box_x0[i], x_begin)
                        box_x1[i] = max(box_x1[i], x_end)
                        box_y0[i] = min(box_y0[i], y_begin)
                        box_y1[i] = max(box_y1[i], y_end)
                position = _next_foreground(flat, words, run_end, row_end)
        if not resolve_occlusion and box_x0[i] < width:
            kept[n_kept] = i
            n_kept += 1

    if resolve_occlusion:
        lane_shift = 2 if owner.itemsize == 2 else 1
        # Boxes of the final masks, from the owner map read as runs of one owner.
        for y in range(height):
            row = owner[y]
            row_words = owner_words[y]
            x = row_lo[y]
            stop = row_hi[y]
            while x < stop:
                run_end = _owner_run_end(row, row_words, x, stop, lane_shift)
                value = row[x]
                if value != 0:
                    k = value - 1
                    box_x0[k] = min(box_x0[k], x)
                    box_x1[k] = max(box_x1[k], run_end)
                    box_y0[k] = min(box_y0[k], y)
                    box_y1[k] = y + 1
                x = run_end
        plane_of = np.full(count, -1, np.int64)
        for i in range(count):
            if box_x0[i] < width:
                plane_of[i] = n_kept
                kept[n_kept] = i
                n_kept += 1
        # Output planes, written only where each instance has pixels.
        for y in range(height):
            row = owner[y]
            row_words = owner_words[y]
            x = row_lo[y]
            stop = row_hi[y]
            while x < stop:
                run_end = _owner_run_end(row, row_words, x, stop, lane_shift)
                value = row[x]
                if value != 0:
                    out[plane_of[value - 1], y, x:run_end] = 1
                x = run_end

    for k in range(n_kept):
        i = kept[k]
        boxes[k, 0] = box_x0[i]
        boxes[k, 1] = box_y0[i]
        boxes[k, 2] = box_x1[i]
        boxes[k, 3] = box_y1[i]
    return n_kept


def _as_source_mask(mask: np.ndarray) -> np.ndarray:
    """The kernel reads uint8, C-contiguous, 8-byte-aligned masks; views where possible."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"an instance mask must be 2-D, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        mask = mask.view(np.uint8)
    elif mask.dtype != np.uint8:
        mask = (mask != 0).view(np.uint8)
    if not mask.flags.c_contiguous or mask.ctypes.data % 8 != 0:
        mask = mask.copy()  # a fresh array is C-contiguous and aligned for the word reads
    return mask


def assemble_masks(
    masks: Sequence[np.ndarray], height: int, width: int, resolve_occlusion: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resize, (optionally) de-overlap and box the instance masks of one image.

    masks: decoded instance masks, 2-D arrays (uint8 or bool, any size, any non-zero =
    foreground), in instance order. Returns (masks uint8 [N', H, W] with values 0/1, boxes
    float32 [N', 4] xyxy in pixels — x1 = max col + 1, y1 = max row + 1, i.e. the torchvision
    convention of a box that covers the pixels, kept int64 [N'] indices of instances that kept at
    least one pixel).

    Resizing gives exactly the pixels of ``Image.fromarray(m).resize((width, height),
    Image.NEAREST)``. With ``resolve_occlusion`` a pixel belongs to at most one instance, the
    latest one that covers it. Instances left without pixels are dropped in both modes.
    """
    height = int(height)
    width = int(width)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    count = len(masks)
    # calloc'd: pages no instance touches are never written (nor, when mmapped, even mapped).
    out = np.zeros((count, height, width), np.uint8)
    boxes = np.zeros((count, 4), np.float32)
    kept = np.zeros(count, np.int64)
    if count == 0:
        return out, boxes, kept
    source_masks = List.empty_list(_SOURCE_MASK_TYPE)
    for mask in masks:
        source_masks.append(_as_source_mask(mask))
    # Owner map: 0 = nobody, i + 1 = instance i. Rows padded to whole 8-byte words so that
    # runs of one owner can be skipped a word at a time.
    owner_dtype = np.int16 if count < np.iinfo(np.int16).max else np.int32
    lanes = 8 // np.dtype(owner_dtype).itemsize
    padded_width = -(-width // lanes) * lanes
    owner = np.zeros((height, padded_width) if resolve_occlusion else (1, lanes), owner_dtype)
    n_kept = _assemble(
        source_masks,
        height,
        width,
        bool(resolve_occlusion),
        owner,
        owner.view(np.uint64),
        out,
        boxes,
        kept,
    )
    if n_kept < count:
        # Basic slices: views, no copy; the unused planes were never written.
        return out[:n_kept], boxes[:n_kept], kept[:n_kept]
    return out, boxes, kept


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now rather than on the first sample."""
    masks = [np.ones((3, 5), np.uint8), np.zeros((2, 2), np.uint8)]
    assemble_masks(masks, 4, 4, resolve_occlusion=True)
    assemble_masks(masks, 4, 4, resolve_occlusion=False)


def reference_assemble_masks(
    masks: Sequence[np.ndarray], height: int, width: int, resolve_occlusion: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seed pipeline, kept as the executable specification of ``assemble_masks``.

    Pillow NEAREST resize of each mask, stacked into an (H, W, N) array, the Mask R-CNN samples'
    occlusion loop, boxes from ``np.where`` per instance, empty instances dropped.
    """
    count = len(masks)
    stacked = np.zeros((height, width, count), np.uint8)
    for i, mask in enumerate(masks):
        resized = Image.fromarray(np.asarray(mask)).resize((width, height), Image.NEAREST)
        stacked[:, :, i] = np.asarray(resized)
    if resolve_occlusion and count > 0:
        occlusion = np.logical_not(stacked[:, :, -1]).astype(np.uint8)
        for i in range(count - 2, -1, -1):
            stacked[:, :, i] = stacked[:, :, i] * occlusion
            occlusion = np.logical_and(occlusion, np.logical_not(stacked[:, :, i]))
    boxes = []
    kept = []
    for i in range(count):
        rows, cols = np.where(stacked[:, :, i])
        if rows.size:
            boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            kept.append(i)
    planes = np.ascontiguousarray((stacked[:, :, kept] != 0).transpose(2, 0, 1)).view(np.uint8)
    return (
        planes,
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(kept, np.int64),
    )
