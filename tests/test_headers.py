"""Image sizes from headers agree with Pillow's on images Pillow writes in many forms, and say
None (so the loader asks Pillow) on anything they cannot vouch for."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from oistream.headers import image_size, jpeg_size, png_size


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _pillow_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "I;16"])
@pytest.mark.parametrize("size", [(1, 1), (37, 5), (1600, 1067)])
def test_png_sizes_match_pillow(mode: str, size: tuple[int, int]) -> None:
    data = _encode(Image.new(mode, size), "PNG")
    assert png_size(data) == _pillow_size(data) == size
    assert jpeg_size(data) is None


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"progressive": True},
        {"quality": 20, "subsampling": 2},
        {"exif": Image.Exif().tobytes(), "icc_profile": b"\0" * 3000},
        {"comment": b"x" * 1000},
    ],
)
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_sizes_match_pillow(mode: str, options: dict) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (41, 67, len(mode)), np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode)
    data = _encode(image, "JPEG", **options)
    assert jpeg_size(data) == _pillow_size(data) == (67, 41)
    assert image_size(data) == (67, 41)
    assert png_size(data) is None


def test_fill_bytes_before_markers_are_skipped() -> None:
    data = _encode(Image.new("RGB", (9, 4)), "JPEG")
    padded = data[:2] + b"\xff\xff\xff" + data[2:]
    assert jpeg_size(padded) == (9, 4)


def test_anything_unvouched_for_is_none() -> None:
    jpeg = _encode(Image.new("RGB", (9, 4)), "JPEG")
    png = _encode(Image.new("L", (9, 4)), "PNG")
    frame = jpeg.index(b"\xff\xc0")
    assert jpeg_size(jpeg[: frame + 6]) is None  # the frame header runs out
    zero_height = jpeg[: frame + 5] + b"\0\0" + jpeg[frame + 7 :]
    assert jpeg_size(zero_height) is None  # height in a DNL segment: let Pillow decide
    assert jpeg_size(jpeg[:2] + b"\xff\xda\x00\x08" + jpeg[2:]) is None  # scan before frame
    assert jpeg_size(jpeg[:2] + b"\xff\xe0\x00\x01" + jpeg[2:]) is None  # length < 2
    assert jpeg_size(jpeg[:2] + b"\x00" + jpeg[2:]) is None  # junk where a marker belongs
    assert png_size(png[:20]) is None
    assert png_size(png.replace(b"IHDR", b"IHDX", 1)) is None
    assert image_size(_encode(Image.new("RGB", (9, 4)), "BMP")) is None
    assert image_size(b"") is None
