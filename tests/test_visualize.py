"""draw_instances and render_sample: what is drawn where, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from shardfactory import FakeInstance, FakeSample, write_shards

from oistream.errors import OistreamError
from oistream.visualize import MIN_LONG_SIDE, draw_instances, instance_colours, render_sample

GREY = 100


def grey_image(height: int = 200, width: int = 320) -> np.ndarray:
    return np.full((height, width, 3), GREY, np.uint8)


def square_mask(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def test_masks_are_tinted_in_distinct_colours_and_the_rest_is_untouched():
    masks = np.stack(
        [square_mask(200, 320, 20, 80, 20, 100), square_mask(200, 320, 120, 200, 200, 300)]
    )
    # Boxes away from the masks, so that box lines cannot pass for mask contours below.
    boxes = torch.tensor([[150, 5, 160, 15], [170, 5, 180, 15]], dtype=torch.float32)
    picture = draw_instances(grey_image(), masks, boxes, [1, 2], ["background", "Person", "Car"])
    factor = MIN_LONG_SIDE // 320  # small images are enlarged for legible captions
    assert picture.size == (320 * factor, 200 * factor)
    pixels = np.asarray(picture).astype(int)
    first, second = instance_colours(2)
    inside_first = pixels[60 * factor, 60 * factor]
    inside_second = pixels[160 * factor, 250 * factor]
    # A tint moves the grey towards the instance's colour.
    for inside, colour in ((inside_first, first), (inside_second, second)):
        assert np.all(np.sign(inside - GREY) == np.sign(np.asarray(colour) - GREY))
    assert not np.array_equal(inside_first, inside_second)
    # Contours in the pure colour on every side, the image's bottom edge included.
    for y, x in ((20, 60), (79, 60), (50, 20), (50, 99)):
        assert np.array_equal(pixels[y * factor, x * factor], first), (y, x)
    for y, x in ((120, 250), (199, 250), (150, 200), (150, 299)):
        assert np.array_equal(pixels[y * factor, x * factor], second), (y, x)
    assert np.array_equal(pixels[100 * factor, 160 * factor], [GREY] * 3)  # outside everything


def test_predictions_below_the_threshold_are_not_drawn():
    probabilities = torch.zeros(2, 1, 50, 60)
    probabilities[0, 0, 10:20, 10:20] = 0.9
    probabilities[1, 0, 30:40, 30:40] = 0.9
    boxes = torch.tensor([[10, 10, 20, 20], [30, 30, 40, 40]], dtype=torch.float32)
    image = torch.full((3, 50, 60), GREY / 255)  # a float image in [0, 1], as models take
    picture = draw_instances(
        image, probabilities, boxes, torch.tensor([1, 1]), {1: "Car"}, scores=[0.9, 0.2]
    )
    factor = picture.width // 60
    pixels = np.asarray(picture).astype(int)
    assert not np.array_equal(pixels[15 * factor, 15 * factor], [GREY] * 3)
    assert np.array_equal(pixels[35 * factor, 35 * factor], [GREY] * 3)  # score 0.2 < 0.5


def test_render_sample_draws_the_chosen_sample(tmp_path):
    image = np.full((40, 60, 3), GREY, np.uint8)
    plain = FakeSample("00000000000000a1", image, [])
    with_car = FakeSample(
        "00000000000000a2", image, [FakeInstance(square_mask(62, 94, 10, 50, 10, 60), 2)]
    )
    write_shards(tmp_path / "shards", [plain, with_car])
    out = render_sample(tmp_path / "shards", key="00000000000000a2", out=tmp_path / "x" / "a.png")
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        assert max(picture.size) >= MIN_LONG_SIDE
        assert len(picture.convert("RGB").getcolors(2**16)) > 3  # tint, outline, caption
    first = render_sample(tmp_path / "shards" / "train-000000.tar", out=tmp_path / "b.png")
    with Image.open(first) as picture:  # the first sample has no instances: the image alone
        assert len(picture.convert("RGB").getcolors(2**16)) <= 3  # grey, JPEG ringing aside


def test_render_sample_unknown_key_is_a_one_line_error(tmp_path):
    write_shards(tmp_path, [FakeSample("00000000000000b1", grey_image(20, 20), [])])
    with pytest.raises(OistreamError, match="no sample with key ffff") as error:
        render_sample(tmp_path, key="ffff", out=tmp_path / "c.png")
    assert "\n" not in str(error.value)
