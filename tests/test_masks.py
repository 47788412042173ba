"""The numba mask kernel equals, pixel for pixel, the seed pipeline it replaces.

``reference_assemble_masks`` (Pillow NEAREST resize per mask, the Mask R-CNN samples' numpy
occlusion loop, boxes from ``np.where``) is the specification; random inputs come from
hypothesis, structured cases (off-by-one scales, full occlusion, thousands of instances) are
spelled out.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import oistream.masks
from oistream.masks import (
    _first_destination_index,
    assemble_instances,
    assemble_masks,
    decode_mask_png,
    reference_assemble_masks,
)


@contextlib.contextmanager
def reading_every_row(on: bool):
    """The kernel streams past unsampled rows only for masks too large for the cache; tests use
    small masks, so switch that path on by hand to cover it too."""
    saved = oistream.masks._STREAM_ABOVE_BYTES
    if on:
        oistream.masks._STREAM_ABOVE_BYTES = -1
    try:
        yield
    finally:
        oistream.masks._STREAM_ABOVE_BYTES = saved


def assert_same(got, expected) -> None:
    names = ("masks", "boxes", "kept")
    for name, a, b in zip(names, got, expected, strict=True):
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, (name, a.shape, b.shape)
        np.testing.assert_array_equal(a, b, err_msg=name)


def check_against_reference(masks, height, width) -> None:
    for resolve in (True, False):
        got = assemble_instances(masks, height, width, resolve_occlusion=resolve)
        expected = reference_assemble_masks(masks, height, width, resolve_occlusion=resolve)
        assert_same((got.masks, got.boxes, got.kept), expected)
        assert got.masks.dtype == np.uint8 and set(np.unique(got.masks)) <= {0, 1}
        assert got.masks.flags.c_contiguous
        # The areas counted while painting are the pixels of the planes handed out.
        assert got.areas.dtype == np.float32
        np.testing.assert_array_equal(got.areas, expected[0].sum((1, 2)))
        assert_same(assemble_masks(masks, height, width, resolve), expected)


def make_mask(rng: np.random.Generator, shape: tuple[int, int], kind: str, as_bool: bool):
    h, w = shape
    if kind == "empty":
        fg = np.zeros(shape, bool)
    elif kind == "full":
        fg = np.ones(shape, bool)
    elif kind == "noise":
        fg = rng.random(shape) < rng.random()
    else:  # "blob": a random ellipse, the shape real masks have
        rows, cols = np.ogrid[:h, :w]
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.5, h), rng.uniform(0.5, w)
        fg = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
    if as_bool:
        return fg
    # Any non-zero value is foreground.
    return (fg * rng.integers(1, 256, shape)).astype(np.uint8)


mask_specs = st.lists(
    st.tuples(
        st.integers(1, 70),
        st.integers(1, 70),
        st.sampled_from(["empty", "full", "noise", "blob", "blob"]),
        st.booleans(),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 48),
    width=st.integers(1, 48),
    specs=mask_specs,
    seed=st.integers(0, 2**32 - 1),
    every_row=st.booleans(),
)
def test_matches_reference_on_random_masks(height, width, specs, seed, every_row):
    rng = np.random.default_rng(seed)
    masks = [make_mask(rng, (h, w), kind, as_bool) for h, w, kind, as_bool in specs]
    with reading_every_row(every_row):
        check_against_reference(masks, height, width)


@pytest.mark.parametrize(
    ("source", "destination"),
    [
        ((1199, 1600), (767, 1024)),  # off-by-one sizes of the Open Images case
        ((1200, 1600), (768, 1024)),
        ((1023, 1025), (1024, 1024)),  # scale factors just either side of 1
        ((767, 1023), (768, 1024)),
        ((1601, 1599), (1600, 1600)),
        ((3, 7), (500, 333)),  # strong upscale
        ((2000, 1500), (37, 61)),  # strong downscale
        ((800, 600), (800, 600)),  # identity
    ],
)
@pytest.mark.parametrize("every_row", [False, True])
def test_resize_is_pillow_nearest_at_real_sizes(source, destination, every_row):
    rng = np.random.default_rng(sum(source) + sum(destination))
    noise = make_mask(rng, source, "noise", as_bool=False)
    blobs = [make_mask(rng, source, "blob", as_bool=True) for _ in range(2)]
    height, width = destination
    with reading_every_row(every_row):
        resized, _, kept = assemble_masks([noise], height, width, resolve_occlusion=False)
        pillow = np.asarray(Image.fromarray(noise).resize((width, height), Image.NEAREST))
        np.testing.assert_array_equal(resized[0], pillow != 0)
        assert kept.tolist() == [0]
        check_against_reference([noise, *blobs], height, width)


def pillow_source_index(source_len: int, destination_len: int) -> np.ndarray:
    """Which source column Pillow's NEAREST picks for each destination column."""
    ramp = Image.fromarray(np.arange(source_len, dtype=np.int32)[None, :])
    return np.asarray(ramp.resize((destination_len, 1), Image.NEAREST))[0]


SIZES = [*range(1, 40), 99, 100, 101, 255, 256, 257, 767, 768, 769, 1023, 1024, 1025, 1199, 1200]
SIZES += [1201, 1599, 1600, 1601, 2047, 2048, 4095, 4096, 4097, 6000]


def test_index_table_matches_pillow_on_many_sizes():
    """The accumulated double-precision position decides ties: every pair of sizes agrees."""
    for source_len in SIZES:
        for destination_len in SIZES:
            first = _first_destination_index(source_len, destination_len)
            # Destination x samples source c exactly when first[c] <= x < first[c + 1].
            ours = np.repeat(np.arange(source_len), np.diff(first))
            expected = pillow_source_index(source_len, destination_len)
            assert np.array_equal(ours, expected), (source_len, destination_len)


def test_later_instances_occlude_earlier_and_fully_hidden_ones_are_dropped():
    base = np.zeros((10, 10), np.uint8)
    hidden = base.copy()
    hidden[2:5, 2:5] = 9  # fully under the cover below
    cover = base.copy()
    cover[1:6, 1:8] = 1
    partly = base.copy()
    partly[4:9, 6:10] = 255  # on top of the cover's lower right corner
    empty = base.copy()
    masks, boxes, kept = assemble_masks([hidden, cover, empty, partly], 10, 10)
    assert kept.tolist() == [1, 3]
    expected_cover = cover != 0
    expected_cover[4:9, 6:10] = False
    np.testing.assert_array_equal(masks[0], expected_cover)
    np.testing.assert_array_equal(masks[1], partly != 0)
    np.testing.assert_array_equal(boxes, [[1, 1, 8, 6], [6, 4, 10, 9]])
    assert boxes.dtype == np.float32 and kept.dtype == np.int64
    check_against_reference([hidden, cover, empty, partly], 10, 10)

    # Without occlusion every non-empty mask stays as it is.
    masks, boxes, kept = assemble_masks([hidden, cover, empty, partly], 10, 10, False)
    assert kept.tolist() == [0, 1, 3]
    np.testing.assert_array_equal(boxes[0], [2, 2, 5, 5])


def test_box_covers_the_pixels_xyxy():
    mask = np.zeros((6, 8), bool)
    mask[2, 3] = True
    _, boxes, _ = assemble_masks([mask], 6, 8)
    assert boxes.tolist() == [[3.0, 2.0, 4.0, 3.0]]  # x0, y0, x1 = col + 1, y1 = row + 1
    mask[4, 6] = True
    _, boxes, _ = assemble_masks([mask], 6, 8)
    assert boxes.tolist() == [[3.0, 2.0, 7.0, 5.0]]


def test_no_instances_and_only_empty_instances():
    for masks in ([], [np.zeros((5, 5), np.uint8)], [np.zeros((0, 4), np.uint8)]):
        for resolve in (True, False):
            out, boxes, kept = assemble_masks(masks, 7, 9, resolve)
            assert out.shape == (0, 7, 9) and out.dtype == np.uint8
            assert boxes.shape == (0, 4) and boxes.dtype == np.float32
            assert kept.shape == (0,) and kept.dtype == np.int64


def test_single_instance_bool_and_any_nonzero_value_agree():
    rng = np.random.default_rng(3)
    foreground = make_mask(rng, (37, 53), "blob", as_bool=True)
    values = (foreground * rng.integers(1, 256, foreground.shape)).astype(np.uint8)
    results = [assemble_masks([m], 20, 31) for m in (foreground, values)]
    assert_same(results[0], results[1])
    check_against_reference([foreground], 20, 31)


def test_read_only_strided_and_misaligned_inputs():
    rng = np.random.default_rng(4)
    read_only = make_mask(rng, (40, 30), "blob", as_bool=False)
    read_only.setflags(write=False)
    transposed = make_mask(rng, (30, 40), "noise", as_bool=False).T
    buffer = np.zeros(1 + 33 * 27, np.uint8)
    misaligned = buffer[1:].reshape(33, 27)  # data one byte past an aligned address
    misaligned[5:20, 3:25] = 1
    check_against_reference([read_only, transposed, misaligned], 25, 35)


def test_tens_of_thousands_of_instances_last_cover_wins():
    count = 32_790
    masks = []
    for i in range(count):
        mask = np.zeros((4, 4), np.uint8)
        mask.flat[i % 16] = 1
        masks.append(mask)
    out, boxes, kept = assemble_masks(masks, 4, 4)
    # Each pixel belongs to the last instance that covers it.
    assert kept.tolist() == list(range(count - 16, count))
    for plane, index in zip(out, kept, strict=True):
        expected = np.zeros(16, np.uint8)
        expected[index % 16] = 1
        np.testing.assert_array_equal(plane.ravel(), expected)
    assert len(boxes) == 16


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_decode_mask_png_one_bit_and_grey():
    rng = np.random.default_rng(5)
    foreground = make_mask(rng, (21, 34), "blob", as_bool=True)
    one_bit = decode_mask_png(png_bytes(foreground))
    assert one_bit.shape == (21, 34) and one_bit.dtype == np.uint8
    np.testing.assert_array_equal(one_bit != 0, foreground)
    grey = (foreground * 255).astype(np.uint8)
    np.testing.assert_array_equal(decode_mask_png(png_bytes(grey)), grey)
    assert_same(assemble_masks([one_bit], 9, 13), assemble_masks([foreground], 9, 13))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        assemble_masks([np.zeros((2, 2, 2), np.uint8)], 4, 4)
    with pytest.raises(ValueError):
        assemble_masks([np.zeros((2, 2), np.uint8)], 0, 4)


def test_each_bit_depth_goes_to_its_decoder_and_both_give_pillows_pixels(monkeypatch):
    # 8-bit grey goes through torchvision, 1-bit (and anything else) through Pillow; either way
    # the pixels are Pillow's, any grey value included.
    rng = np.random.default_rng(9)
    grey = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    one_bit = make_mask(rng, (37, 53), "blob", as_bool=True)
    used = []
    original = oistream.masks._decode_with_torchvision
    monkeypatch.setattr(
        oistream.masks,
        "_decode_with_torchvision",
        lambda data: used.append(len(data)) or original(data),
    )
    for pixels in (grey, one_bit):
        data = png_bytes(pixels)
        expected = np.asarray(Image.open(io.BytesIO(data))).view(np.uint8)
        np.testing.assert_array_equal(decode_mask_png(data), expected)
    assert len(used) == 1  # the grey one only


def test_an_8_bit_header_over_other_data_is_left_to_pillow():
    # The header says 8-bit grey 5x4, the data is cut short: torchvision refuses it and Pillow,
    # which then decides, raises as it always did.
    data = png_bytes(np.full((4, 5), 7, np.uint8))
    assert oistream.masks._is_8bit_gray_png(data)
    with pytest.raises(OSError):
        decode_mask_png(data[:-20])


def test_warm_up_compiles_what_both_decoders_hand_out():
    # Pillow's arrays (1-bit PNGs) are read-only, torchvision's (8-bit) writable: each is its
    # own numba signature, and one missing from warm_up would be compiled on the first batch.
    oistream.masks.warm_up()
    compiled = set(oistream.masks._paint_instance.signatures)
    foreground = make_mask(np.random.default_rng(11), (30, 40), "blob", as_bool=True)
    one_bit = decode_mask_png(png_bytes(foreground))
    grey = decode_mask_png(png_bytes((foreground * 255).astype(np.uint8)))
    assert not one_bit.flags.writeable and grey.flags.writeable
    for resolve in (True, False):
        got = assemble_instances([one_bit, grey], 17, 23, resolve_occlusion=resolve)
        assert len(got.kept) >= 1
    assert set(oistream.masks._paint_instance.signatures) == compiled
