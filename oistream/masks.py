"""Instance-mask assembly: decoded masks of any size -> torchvision's uint8 [N, H, W] targets.

Open Images stores each instance mask as its own PNG at its own resolution. For Mask R-CNN every
mask has to be resized to the image's exact (H, W), overlaps resolved (a pixel belongs to at most
one instance, later instances on top: the Mask R-CNN samples' convention), tight boxes computed
and instances left without pixels dropped. ``assemble_instances`` does all of it, counting each
mask's pixels on the way, in one compiled numba call per instance whose work follows the mask's
extent rather than H x W:

* the resize is Pillow's ``Image.resize((W, H), Image.NEAREST)``, reproduced exactly: Pillow
  samples source pixel ``int(pos)`` where ``pos`` starts at ``scale / 2`` and grows by ``scale``
  (``scale = src / dst`` in double precision). The position is accumulated, not multiplied out:
  ``floor((x + 0.5) * scale)`` picks another pixel for about a fifth of all size pairs;
* a source row is first summarised in one branch-free pass over 64-bit words (empty? full?);
  rows with both are cut into foreground runs, zero and non-zero stretches skipped 64 bytes at
  a time; each run maps through a per-mask table to one range of destination columns, written
  with a single fill. Rows the resize does not sample are skipped (or, for masks too large to
  stay in cache, streamed past, which is faster from memory than skipping);
* occlusion walks the instances from the last to the first, keeping per destination row the
  columns already claimed by later instances as a short list of ranges. An instance's visible
  ranges are its runs minus those claims, so its final mask, box and survival are known as soon
  as it is painted, and only its visible pixels are written (into zeroed planes).

``reference_assemble_masks`` is the seed pipeline (Pillow resize per mask, the Mask R-CNN samples'
numpy occlusion loop, boxes from ``np.where``): the specification the tests hold the kernel to.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numba import njit
from PIL import Image

from oistream.headers import PNG_START

__all__ = [
    "Instances",
    "assemble_instances",
    "assemble_masks",
    "decode_mask_png",
    "reference_assemble_masks",
    "warm_up",
]

# SWAR constants: a 64-bit word holds eight mask bytes (byte order does not matter: the word
# tests only ask "is any byte zero / non-zero", never which one).
_LOW_BITS = np.uint64(0x0101010101010101)
_HIGH_BITS = np.uint64(0x8080808080808080)
_ZERO_WORD = np.uint64(0)

# torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec (another
# dependency); they still work, and are the faster ones for some members. Only that is silenced.
TORCHVISION_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"

# Masks of one image larger than this in total are read as a plain stream of every row (see
# ``_assemble``); smaller ones, which stay in cache, are read only where the resize samples.
_STREAM_ABOVE_BYTES = 16 * 2**20


def decode_mask_png(data: bytes) -> np.ndarray:
    """Decode one mask PNG into a 2-D uint8 array (0 = background, non-zero = object).

    The fastest decoder depends on the bit depth (``benchmarks/loader.py`` measures them side
    by side): 8-bit grayscale goes through torchvision's libpng decoder, anything else (1-bit
    above all) through Pillow. Pillow's result is read-only: ``np.asarray`` wraps the bytes it
    hands out, with no copy of its own. A 1-bit PNG decodes to bytes 0/255 that numpy presents
    as bool; they are handed out as the uint8 they are (a bool array holding 255 misleads
    byte-level consumers such as ``view``).
    """
    if _is_8bit_gray_png(data):
        decoded = _decode_with_torchvision(data)
        if decoded is not None:
            return decoded
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode not in ("1", "L", "P"):
            image = image.convert("L")
        array = np.asarray(image)
    return array.view(np.uint8) if array.dtype == np.bool_ else array


def _is_8bit_gray_png(data: bytes) -> bool:
    """From the IHDR chunk, which a PNG must start with: bit depth 8, colour type 0 (gray)."""
    return len(data) > 26 and data[:16] == PNG_START and data[24] == 8 and data[25] == 0


def _decode_with_torchvision(data: bytes) -> np.ndarray | None:
    """The gray plane, or None if the file is not what its header said (Pillow then decides)."""
    import torch  # imported here: the Pillow path, and this module's other users, do without
    from torchvision.io import ImageReadMode, decode_png

    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", TORCHVISION_DEPRECATION, DeprecationWarning)
        try:
            plane = decode_png(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.GRAY
            )
        except (RuntimeError, ValueError):  # libpng's errors surface as RuntimeError
            return None
    if tuple(plane.shape) != (1, height, width):
        return None
    return plane[0].numpy()


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
def _at(array, index):
    """array[index] for an index known to be >= 0, in the hot loops. An unsigned index skips
    numba's negative-index fix-up, which keeps LLVM from vectorising a loop; indexing the whole
    array instead of a slice of it creates no view, whose atomic reference counting would cost
    more than the scan of a row."""
    return array[np.uint64(index)]


@njit(cache=True, nogil=True, inline="always")
def _next_foreground(flat, words, position, end):
    """Index of the first non-zero byte of flat[position:end], or end.

    ``words`` is ``flat`` seen as uint64: zero stretches go 64 bytes per step.
    """
    while position < end and (position & 7) != 0:
        if flat[position] != 0:
            return position
        position += 1
    k = position >> 3
    stop = min(end >> 3, words.shape[0])
    while k + 8 <= stop:
        if (
            _at(words, k)
            | _at(words, k + 1)
            | _at(words, k + 2)
            | _at(words, k + 3)
            | _at(words, k + 4)
            | _at(words, k + 5)
            | _at(words, k + 6)
            | _at(words, k + 7)
        ) != _ZERO_WORD:
            break
        k += 8
    while k < stop and _at(words, k) == _ZERO_WORD:
        k += 1
    position = max(position, k << 3)
    while position < end:
        if flat[position] != 0:
            return position
        position += 1
    return end


@njit(cache=True, nogil=True, inline="always")
def _next_background(flat, words, position, end):
    """Index of the first zero byte of flat[position:end], or end (same scheme)."""
    while position < end and (position & 7) != 0:
        if flat[position] == 0:
            return position
        position += 1
    k = position >> 3
    stop = min(end >> 3, words.shape[0])
    while k + 8 <= stop:
        if (
            _has_zero_byte(_at(words, k))
            | _has_zero_byte(_at(words, k + 1))
            | _has_zero_byte(_at(words, k + 2))
            | _has_zero_byte(_at(words, k + 3))
            | _has_zero_byte(_at(words, k + 4))
            | _has_zero_byte(_at(words, k + 5))
            | _has_zero_byte(_at(words, k + 6))
            | _has_zero_byte(_at(words, k + 7))
        ) != _ZERO_WORD:
            break
        k += 8
    while k < stop and _has_zero_byte(_at(words, k)) == _ZERO_WORD:
        k += 1
    position = max(position, k << 3)
    while position < end:
        if flat[position] == 0:
            return position
        position += 1
    return end


@njit(cache=True, nogil=True, inline="always")
def _row_summary(flat, words, start, end):
    """(any byte non-zero, any byte zero) for flat[start:end], in one branch-free pass over
    whole words (~8 ns for a 1600-byte row; the same test byte by byte is ~10x slower)."""
    first_word = (start + 7) >> 3
    last_word = end >> 3
    any_set = _ZERO_WORD
    any_zero = _ZERO_WORD
    for k in range(first_word, last_word):
        word = _at(words, k)
        any_set |= word
        any_zero |= _has_zero_byte(word)
    # The bytes before the first and after the last whole word (overlap is harmless).
    edge = False
    for position in range(start, min(end, first_word << 3)):
        any_set |= flat[position]
        edge |= flat[position] == 0
    for position in range(max(start, last_word << 3), end):
        any_set |= flat[position]
        edge |= flat[position] == 0
    return any_set != _ZERO_WORD, edge or any_zero != _ZERO_WORD


@njit(cache=True, nogil=True, inline="always")
def _foreground_extent(flat, words, start, end):
    """(first non-zero byte, one past the last) of flat[start:end]; (end, end) if all zero.

    The words are searched in one branch-free pass (min/max of the non-zero words' indices),
    then the few bytes around the two words found."""
    first_word = (start + 7) >> 3
    n_words = max(0, (end >> 3) - first_word)
    lowest = n_words
    highest = -1
    for k in range(n_words):
        non_zero = _at(words, first_word + k) != _ZERO_WORD
        lowest = min(lowest, k if non_zero else n_words)
        highest = max(highest, k if non_zero else -1)
    head_end = min(end, first_word << 3)  # bytes before the first whole word
    tail_start = max(head_end, (first_word + n_words) << 3)  # bytes after the last one
    begin = end
    for position in range(start, head_end):
        if flat[position] != 0:
            begin = position
            break
    if begin == end and lowest < n_words:
        begin = (first_word + lowest) << 3
        while flat[begin] == 0:
            begin += 1
    if begin == end:
        for position in range(tail_start, end):
            if flat[position] != 0:
                begin = position
                break
    if begin == end:
        return end, end
    for position in range(end - 1, tail_start - 1, -1):
        if flat[position] != 0:
            return begin, position + 1
    if highest >= 0:
        stop = ((first_word + highest) << 3) + 8
        while flat[stop - 1] == 0:
            stop -= 1
        return begin, stop
    stop = head_end
    while flat[stop - 1] == 0:
        stop -= 1
    return begin, stop


@njit(cache=True, nogil=True, inline="always")
def _destination_runs(flat, words, row_start, begin, end, first_col, runs):
    """The foreground runs of a source row, whose foreground spans flat[begin:end], as
    destination column ranges: runs[2k], runs[2k + 1] = start, end; touching ranges merged.
    Returns their count."""
    # Most rows of real masks are a single run: one branch-free pass over its inside says so.
    if not _row_summary(flat, words, begin, end)[1]:
        x_begin = first_col[begin - row_start]
        x_end = first_col[end - row_start]
        if x_begin == x_end:  # a short run can fall between two sampled columns
            return 0
        runs[0] = x_begin
        runs[1] = x_end
        return 1
    n_runs = 0
    position = begin
    while position < end:
        run_end = _next_background(flat, words, position, end)
        x_begin = first_col[position - row_start]
        x_end = first_col[run_end - row_start]
        if x_begin < x_end:
            if n_runs > 0 and runs[2 * n_runs - 1] == x_begin:
                runs[2 * n_runs - 1] = x_end
            else:
                runs[2 * n_runs] = x_begin
                runs[2 * n_runs + 1] = x_end
                n_runs += 1
        position = _next_foreground(flat, words, run_end, end)
    return n_runs


@njit(cache=True, nogil=True, inline="always")
def _write_run(out, plane, y, x_begin, x_end, box):
    out[plane, y, x_begin:x_end] = 1
    box[0] = min(box[0], x_begin)
    box[1] = min(box[1], y)
    box[2] = max(box[2], x_end)
    box[3] = max(box[3], y + 1)
    box[4] += x_end - x_begin  # the pixel count: runs written never overlap


@njit(cache=True, nogil=True, inline="always")
def _paint_row(out, plane, y, runs, n_runs, claims, n_claims, merged, box):
    """Write row y of the instance on ``plane``: its runs minus what later instances claimed;
    then add the runs to the claims.

    claims[y, :2 * n_claims[y]] holds row y's claimed columns as sorted, disjoint, non-touching
    [start, end) pairs, so a row costs its number of runs and claims, not its width.
    """
    row_claims = claims[y]
    n_row_claims = n_claims[y]
    # Visible parts: each run minus the claims (both lists are sorted).
    j = 0
    for k in range(n_runs):
        run_begin = runs[2 * k]
        run_end = runs[2 * k + 1]
        while j < n_row_claims and row_claims[2 * j + 1] <= run_begin:
            j += 1
        x = run_begin
        c = j
        while c < n_row_claims and row_claims[2 * c] < run_end:
            if row_claims[2 * c] > x:
                _write_run(out, plane, y, x, row_claims[2 * c], box)
            x = max(x, row_claims[2 * c + 1])
            c += 1
        if x < run_end:
            _write_run(out, plane, y, x, run_end, box)
    # New claims: merge the runs into the claims, fusing overlapping or touching pairs.
    n_merged = 0
    k = 0
    j = 0
    while k < n_runs or j < n_row_claims:
        if j == n_row_claims or (k < n_runs and runs[2 * k] < row_claims[2 * j]):
            begin = runs[2 * k]
            end = runs[2 * k + 1]
            k += 1
        else:
            begin = row_claims[2 * j]
            end = row_claims[2 * j + 1]
            j += 1
        if n_merged > 0 and begin <= merged[2 * n_merged - 1]:
            merged[2 * n_merged - 1] = max(merged[2 * n_merged - 1], end)
        else:
            merged[2 * n_merged] = begin
            merged[2 * n_merged + 1] = end
            n_merged += 1
    for k in range(2 * n_merged):  # a loop, not slices: views cost atomic reference counts
        row_claims[k] = merged[k]
    n_claims[y] = n_merged


@njit(cache=True, nogil=True)
def _paint_instance(
    source, height, width, resolve_occlusion, stream_all_rows, plane, out, boxes, areas, work
):
    """Resize one instance's mask into out[plane], minus what later instances claimed (with
    ``resolve_occlusion``); True if a pixel survived, its tight box and pixel count then in
    boxes[plane] and areas[plane].

    Called once per instance, from the last to the first, so that when instance i is painted
    every pixel that a later instance owns is already claimed: its final mask is complete as
    soon as it is painted. ``work`` (``_work_arrays``) carries what the calls share.
    """
    runs, merged, claims, n_claims, box = work
    box[0] = width
    box[1] = height
    box[2] = 0
    box[3] = 0
    box[4] = 0
    source_h, source_w = source.shape
    first_row = _first_destination_index(source_h, height)
    first_col = _first_destination_index(source_w, width)
    flat = source.reshape(source_h * source_w)
    words = flat[: (source_h * source_w) // 8 * 8].view(np.uint64)
    for r in range(source_h):
        y_begin = first_row[r]
        y_end = first_row[r + 1]
        sampled = y_begin < y_end
        # Masks too large to stay in cache are read as a plain stream of every row, sampled
        # or not: memory then runs at full speed, while skipping rows halves it.
        if not sampled and not stream_all_rows:
            continue
        row_start = r * source_w
        row_end = row_start + source_w
        # One cheap pass sorts out the empty rows (most of a mask) and the full ones.
        any_set, any_zero = _row_summary(flat, words, row_start, row_end)
        if not sampled or not any_set:
            continue
        if any_zero:
            begin, end = _foreground_extent(flat, words, row_start, row_end)
        else:
            begin, end = row_start, row_end
        n_runs = _destination_runs(flat, words, row_start, begin, end, first_col, runs)
        if n_runs == 0:
            continue
        for y in range(y_begin, y_end):
            if resolve_occlusion:
                _paint_row(out, plane, y, runs, n_runs, claims, n_claims, merged, box)
            else:
                for k in range(n_runs):
                    _write_run(out, plane, y, runs[2 * k], runs[2 * k + 1], box)
    if box[0] == width:
        return False
    for k in range(4):
        boxes[plane, k] = box[k]
    areas[plane] = box[4]
    return True


def _work_arrays(height: int, width: int, resolve_occlusion: bool) -> tuple[np.ndarray, ...]:
    """Scratch shared by one image's ``_paint_instance`` calls: runs and merged runs of a row;
    per destination row its claimed column ranges and their count; the box being grown (x0, y0,
    x1, y1, pixels)."""
    # Disjoint, non-touching ranges in a row of width W number at most ceil(W / 2).
    pair_capacity = 2 * ((width + 1) // 2)
    claims = np.empty((height if resolve_occlusion else 0, pair_capacity), np.int32)
    return (
        np.empty(pair_capacity, np.int32),
        np.empty(pair_capacity, np.int32),
        claims,
        np.zeros(height, np.int64),
        np.empty(5, np.int64),
    )


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


class Instances(NamedTuple):
    """One image's assembled instances, those that kept at least one pixel."""

    masks: np.ndarray  # uint8 [N', H, W], values 0/1
    boxes: np.ndarray  # float32 [N', 4], xyxy, x1 = max col + 1 (torchvision's convention)
    areas: np.ndarray  # float32 [N'], pixels per mask
    kept: np.ndarray  # int64 [N'], the input index of each


def assemble_instances(
    masks: Sequence[np.ndarray], height: int, width: int, resolve_occlusion: bool = True
) -> Instances:
    """Resize, (optionally) de-overlap, box and count the instance masks of one image.

    masks: decoded instance masks, 2-D arrays (uint8 or bool, any size, any non-zero =
    foreground), in instance order. Resizing gives exactly the pixels of
    ``Image.fromarray(m).resize((width, height), Image.NEAREST)``. With ``resolve_occlusion`` a
    pixel belongs to at most one instance, the latest one that covers it. Instances left
    without pixels are dropped in both modes.
    """
    height = int(height)
    width = int(width)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    count = len(masks)
    out = np.zeros((count, height, width), np.uint8)
    boxes = np.zeros((count, 4), np.float32)
    areas = np.zeros(count, np.float32)
    kept = np.zeros(count, np.int64)
    if count == 0:
        return Instances(out, boxes, areas, kept)
    sources = [_as_source_mask(mask) for mask in masks]
    stream_all_rows = sum(source.size for source in sources) > _STREAM_ABOVE_BYTES
    resolve_occlusion = bool(resolve_occlusion)
    work = _work_arrays(height, width, resolve_occlusion)
    # One kernel call per instance rather than one call over a numba typed List of them:
    # building that List measured 0.18 ms per sample in the loader (3% of a sample, more
    # than its kernel's calls cost), a call ~5 us. Kept instances take output planes from
    # the end down, so the result is out[N - n_kept:], a view, whatever was dropped.
    n_kept = 0
    for i in range(count - 1, -1, -1):
        plane = count - 1 - n_kept
        if _paint_instance(
            sources[i],
            height,
            width,
            resolve_occlusion,
            stream_all_rows,
            plane,
            out,
            boxes,
            areas,
            work,
        ):
            kept[plane] = i
            n_kept += 1
    # Basic slices: views, no copy; the unused planes were never written.
    first = count - n_kept
    return Instances(out[first:], boxes[first:], areas[first:], kept[first:])


def assemble_masks(
    masks: Sequence[np.ndarray], height: int, width: int, resolve_occlusion: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masks, boxes, kept) of ``assemble_instances``: the instances without their areas."""
    instances = assemble_instances(masks, height, width, resolve_occlusion)
    return instances.masks, instances.boxes, instances.kept


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now rather than on the first sample."""
    # Both kinds decoders hand out: Pillow's arrays are read-only, torchvision's writable.
    read_only = np.ones((3, 5), np.uint8)
    read_only.setflags(write=False)
    masks = [read_only, np.zeros((2, 2), np.uint8)]
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
