"""The fake bucket has the real Open Images layout, and the local S3 endpoint serves it."""

from __future__ import annotations

import csv
import io
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oistream import sources
from oistream.errors import OistreamError
from oistream.testing.fakebucket import (
    DISTRACTOR_MIDS,
    FAKE_CLASSES,
    MASK_SCALE,
    SEGMENTABLE_MIDS,
    SMALL_MASK_SCALE,
    TARGET_MIDS,
    has_zip64_end_records,
    make_fake_bucket,
    mask_size,
)
from oistream.testing.s3server import LocalS3

HEADER = b"MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks\n"
HEX = "0123456789abcdef"
CLICKS = re.compile(r"^\d\.\d{5} \d\.\d{5} [01](;\d\.\d{5} \d\.\d{5} [01]){0,7}$")


def metadata(root: Path) -> Path:
    return root / "openimages"


def read_rows(root: Path, split: str) -> list[dict[str, str]]:
    path = metadata(root) / "v5" / f"{split}-annotations-object-segmentation.csv"
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def zip_path(root: Path, split: str, prefix: str) -> Path:
    return metadata(root) / "v5" / f"{split}-masks" / f"{split}-masks-{prefix}.zip"


def read_mask(root: Path, split: str, mask_path: str) -> Image.Image:
    with zipfile.ZipFile(zip_path(root, split, mask_path[0])) as zf:
        return Image.open(io.BytesIO(zf.read(mask_path)))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("split", sources.SPLITS)
def test_every_path_of_the_real_layout_exists(fake_bucket: Path, split: str) -> None:
    v5 = metadata(fake_bucket) / "v5"
    assert (v5 / f"{split}-annotations-object-segmentation.csv").is_file()
    for prefix in HEX:
        assert zip_path(fake_bucket, split, prefix).is_file()
    assert (v5 / "classes-segmentation.txt").is_file()
    assert (v5 / "class-descriptions-boxable.csv").is_file()
    assert (metadata(fake_bucket) / "v7" / "oidv7-class-descriptions-boxable.csv").is_file()
    images = list((fake_bucket / "open-images-dataset" / split).glob("*.jpg"))
    assert len(images) == (24 if split == "train" else 8)


@pytest.mark.parametrize("split", sources.SPLITS)
def test_segmentation_csv_header_is_byte_for_byte_the_real_one(
    fake_bucket: Path, split: str
) -> None:
    path = metadata(fake_bucket) / "v5" / f"{split}-annotations-object-segmentation.csv"
    assert path.read_bytes().startswith(HEADER)


def test_class_lists_have_the_real_formats(fake_bucket: Path) -> None:
    v7 = (metadata(fake_bucket) / "v7" / "oidv7-class-descriptions-boxable.csv").read_text()
    v5 = (metadata(fake_bucket) / "v5" / "class-descriptions-boxable.csv").read_text()
    segmentable = (metadata(fake_bucket) / "v5" / "classes-segmentation.txt").read_text()
    assert v7.startswith("LabelName,DisplayName\n")
    assert v7 == "LabelName,DisplayName\n" + v5  # V5: the same rows, no header
    boxable = dict(line.split(",", 1) for line in v5.splitlines())
    assert boxable["/m/01g317"] == "Person"
    assert boxable["/m/0k4j"] == "Car"
    assert boxable["/m/015qff"] == "Traffic light"
    assert boxable["/m/01mqdt"] == "Traffic sign"
    assert segmentable.splitlines() == SEGMENTABLE_MIDS
    assert set(SEGMENTABLE_MIDS) < set(boxable)  # more boxable classes than segmentable ones
    assert len(boxable) == len(FAKE_CLASSES)


@pytest.mark.parametrize("split", sources.SPLITS)
def test_members_match_the_csv_and_sit_at_the_root_of_their_prefix_zip(
    fake_bucket: Path, split: str
) -> None:
    rows = read_rows(fake_bucket, split)
    members: set[str] = set()
    for prefix in HEX:
        with zipfile.ZipFile(zip_path(fake_bucket, split, prefix)) as zf:
            names = zf.namelist()
            assert names == sorted(names)
            for info in zf.infolist():
                assert "/" not in info.filename
                assert info.filename[0] == prefix
                assert info.compress_type == zipfile.ZIP_DEFLATED
            members.update(names)
    assert members == {row["MaskPath"] for row in rows}
    assert len(members) == len(rows)

    image_dir = fake_bucket / "open-images-dataset" / split
    for row in rows:
        assert re.fullmatch(r"[0-9a-f]{16}", row["ImageID"])
        assert re.fullmatch(r"[0-9a-f]{8}", row["BoxID"])
        label = row["LabelName"].replace("/", "")
        assert row["MaskPath"] == f"{row['ImageID']}_{label}_{row['BoxID']}.png"
        assert (image_dir / f"{row['ImageID']}.jpg").is_file()
    assert [row["MaskPath"] for row in rows] == sorted(row["MaskPath"] for row in rows)


def test_train_image_ids_cover_every_zip(fake_bucket: Path) -> None:
    ids = [row["ImageID"] for row in read_rows(fake_bucket, "train")]
    assert {image_id[0] for image_id in ids} == set(HEX)
    for prefix in HEX:
        with zipfile.ZipFile(zip_path(fake_bucket, "train", prefix)) as zf:
            assert zf.namelist()


def test_images_are_jpegs_with_varied_aspect_and_the_requested_long_side(fake_bucket: Path) -> None:
    shapes = set()
    for path in (fake_bucket / "open-images-dataset").rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert max(image.size) == 160
            shapes.add(image.size)
    assert any(w > h for w, h in shapes)
    assert any(w < h for w, h in shapes)


def test_masks_differ_from_the_image_resolution_as_the_real_ones_do(fake_bucket: Path) -> None:
    naive_off_by_one = small = full = 0
    modes = set()
    for split in sources.SPLITS:
        for row in read_rows(fake_bucket, split):
            path = fake_bucket / "open-images-dataset" / split / f"{row['ImageID']}.jpg"
            with Image.open(path) as image:
                width, height = image.size
            mask = read_mask(fake_bucket, split, row["MaskPath"])
            modes.add(mask.mode)
            assert mask.size != (width, height)
            if mask.size == mask_size(width, height, MASK_SCALE):
                full += 1
                # Scaling each axis back by 1024/1600 and truncating misses by one pixel here.
                back = (int(mask.width / MASK_SCALE), int(mask.height / MASK_SCALE))
                naive_off_by_one += back != (width, height)
            else:
                assert mask.size == mask_size(width, height, SMALL_MASK_SCALE)
                small += 1
            pixels = np.asarray(mask)
            assert pixels.any()
            if mask.mode == "L":
                assert set(np.unique(pixels)) <= {0, 255}
    assert full and small and naive_off_by_one
    assert modes == {"L", "1"}


def test_boxes_are_normalised_and_hold_the_mask(fake_bucket: Path) -> None:
    for split in sources.SPLITS:
        for row in read_rows(fake_bucket, split):
            texts = [row[k] for k in ("BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax")]
            assert all(re.fullmatch(r"[01]\.\d{1,6}", text) for text in texts), texts
            xmin, xmax, ymin, ymax = map(float, texts)
            assert 0 <= xmin < xmax <= 1 and 0 <= ymin < ymax <= 1
            mask = np.asarray(read_mask(fake_bucket, split, row["MaskPath"])) > 0
            ys, xs = np.nonzero(mask)
            h, w = mask.shape
            eps = 1e-6
            assert xmin <= xs.min() / w + eps and xmax >= (xs.max() + 1) / w - eps
            assert ymin <= ys.min() / h + eps and ymax >= (ys.max() + 1) / h - eps


def test_clicks_and_predicted_iou_use_the_real_syntax(fake_bucket: Path) -> None:
    rows = [row for split in sources.SPLITS for row in read_rows(fake_bucket, split)]
    for row in rows:
        assert CLICKS.fullmatch(row["Clicks"]), row["Clicks"]
        for triple in row["Clicks"].split(";"):
            x, y, _ = triple.split(" ")
            assert 0 <= float(x) <= 1 and 0 <= float(y) <= 1
        assert row["PredictedIoU"] == "" or re.fullmatch(r"0\.\d{5}", row["PredictedIoU"])
    empty = sum(row["PredictedIoU"] == "" for row in rows)
    assert 0 < empty < len(rows) / 3
    assert any(" 0" in row["Clicks"] for row in rows)  # background clicks too


def test_scenes_hold_target_and_distractor_classes(
    fake_bucket: Path, fake_bucket_summary: dict
) -> None:
    for split in sources.SPLITS:
        rows = read_rows(fake_bucket, split)
        labels = {row["LabelName"] for row in rows}
        assert set(TARGET_MIDS) <= labels
        assert labels & set(DISTRACTOR_MIDS)
        assert labels <= set(SEGMENTABLE_MIDS)
        summary = fake_bucket_summary["splits"][split]
        assert summary["instances"] == len(rows)
        assert sum(summary["classes"].values()) == len(rows)
    per_image: dict[str, set[str]] = {}
    for row in read_rows(fake_bucket, "train"):
        per_image.setdefault(row["ImageID"], set()).add(row["LabelName"])
    # Images where a class filter must keep some instances and drop others.
    assert any(
        labels & set(TARGET_MIDS) and labels & set(DISTRACTOR_MIDS) for labels in per_image.values()
    )


def read_end_records(path: Path) -> tuple[tuple, tuple | None]:
    """The classic end record, and the Zip64 one if a locator points at it."""
    data = path.read_bytes()
    classic = struct.unpack("<4s4H2LH", data[-22:])
    assert classic[0] == b"PK\x05\x06"
    locator = data[-42:-22]
    if locator[:4] != b"PK\x06\x07":
        return classic, None
    _, _, offset, _ = struct.unpack("<4sLQL", locator)
    record = struct.unpack("<4sQ2H2L4Q", data[offset : offset + 56])
    assert record[0] == b"PK\x06\x06"
    return classic, record


def test_validation_and_test_zips_always_carry_zip64_end_records(fake_bucket: Path) -> None:
    for split in ("validation", "test"):
        for prefix in HEX:
            path = zip_path(fake_bucket, split, prefix)
            classic, zip64 = read_end_records(path)
            assert zip64 is not None and has_zip64_end_records(path)
            # The classic record defers to Zip64, as in a >65,535-member zip.
            assert classic[4] == 0xFFFF and classic[5:7] == (0xFFFFFFFF, 0xFFFFFFFF)
            with zipfile.ZipFile(path) as zf:
                assert len(zf.namelist()) == zip64[6]
                assert zf.testzip() is None
    for prefix in HEX:  # train follows zip64=, off by default
        assert not has_zip64_end_records(zip_path(fake_bucket, "train", prefix))


def test_zip64_on_request_for_train(tmp_path: Path) -> None:
    make_fake_bucket(tmp_path, images=16, image_size=48, zip64=True, splits=("train",))
    for prefix in HEX:
        path = zip_path(tmp_path, "train", prefix)
        _, zip64 = read_end_records(path)
        assert zip64 is not None
        with zipfile.ZipFile(path) as zf:
            assert zf.namelist() and zf.testzip() is None


def test_zipfiles_own_zip64_records_are_kept_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand-in for a >65,535-member zip: zipfile writes Zip64 records itself past this limit.
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)
    make_fake_bucket(tmp_path, images=16, image_size=48, zip64=True, splits=("train",))
    monkeypatch.undo()
    for prefix in HEX:
        path = zip_path(tmp_path, "train", prefix)
        assert path.read_bytes().count(b"PK\x06\x07") == 1
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None


def test_same_arguments_give_the_same_bytes(tmp_path: Path) -> None:
    args = {"images": 10, "image_size": 64, "seed": 3}
    make_fake_bucket(tmp_path / "a", **args)
    make_fake_bucket(tmp_path / "b", **args)
    make_fake_bucket(tmp_path / "c", **{**args, "seed": 4})
    a, b, c = (tree_bytes(tmp_path / name) for name in "abc")
    assert a == b
    assert a != c


def test_rendering_in_several_processes_gives_the_same_bytes(tmp_path: Path) -> None:
    args = {"images": 10, "image_size": 64, "seed": 3, "splits": ("train", "validation")}
    make_fake_bucket(tmp_path / "one", **args)
    make_fake_bucket(tmp_path / "two", **args, processes=2)
    make_fake_bucket(tmp_path / "shared-one", **args, distinct_scenes=3)
    make_fake_bucket(tmp_path / "shared-two", **args, distinct_scenes=3, processes=2)
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")
    assert tree_bytes(tmp_path / "shared-one") == tree_bytes(tmp_path / "shared-two")


def test_distinct_scenes_reuse_pixels_under_new_ids(tmp_path: Path) -> None:
    summary = make_fake_bucket(
        tmp_path, images=40, image_size=48, distinct_scenes=3, splits=("train",)
    )
    jpegs = [p.read_bytes() for p in (tmp_path / "open-images-dataset" / "train").glob("*.jpg")]
    assert len(jpegs) == 40 and len(set(jpegs)) == 3
    rows = read_rows(tmp_path, "train")
    assert (
        len({row["MaskPath"] for row in rows})
        == len(rows)
        == summary["splits"]["train"]["instances"]
    )
    assert not (tmp_path / "open-images-dataset" / "validation").exists()
    assert set(summary["splits"]) == {"train"}


def test_splits_do_not_change_each_others_ids(tmp_path: Path) -> None:
    make_fake_bucket(tmp_path / "all", images=8, image_size=48)
    make_fake_bucket(tmp_path / "one", images=8, image_size=48, splits=("test",))
    test_csv = "openimages/v5/test-annotations-object-segmentation.csv"
    assert (tmp_path / "all" / test_csv).read_bytes() == (tmp_path / "one" / test_csv).read_bytes()


def test_local_s3_serves_the_bucket_anonymously(s3, fake_bucket: Path) -> None:
    options = sources.storage_options(s3.metadata_url, s3.endpoint_url)
    assert options["anon"] is True
    fs, path = sources.filesystem(s3.metadata_url, options)
    assert f"{path}/v5/train-masks" in fs.ls(f"{path}/v5")
    key = "v5/validation-annotations-object-segmentation.csv"
    assert fs.cat_file(f"{path}/{key}") == (metadata(fake_bucket) / key).read_bytes()

    # A member read out of a remote zip by range requests, as the fetcher does.
    row = read_rows(fake_bucket, "validation")[0]
    remote_zip = f"{path}/v5/validation-masks/validation-masks-{row['MaskPath'][0]}.zip"
    with fs.open(remote_zip, "rb") as f, zipfile.ZipFile(f) as zf:
        remote_member = zf.read(row["MaskPath"])
    with zipfile.ZipFile(zip_path(fake_bucket, "validation", row["MaskPath"][0])) as zf:
        assert remote_member == zf.read(row["MaskPath"])

    image = f"validation/{row['ImageID']}.jpg"
    images_fs, images_path = sources.filesystem(s3.images_url, s3.storage_options())
    local = (fake_bucket / "open-images-dataset" / image).read_bytes()
    assert images_fs.cat_file(f"{images_path}/{image}") == local


def test_environment_points_oistream_at_the_local_endpoint(s3_env) -> None:
    options = sources.storage_options(s3_env.images_url)
    assert options["endpoint_url"] == s3_env.endpoint_url
    fs, path = sources.filesystem(s3_env.images_url, options)
    assert len(fs.ls(f"{path}/validation")) == 8


def test_local_s3_refuses_a_busy_port(s3) -> None:
    with pytest.raises(OistreamError, match="in use"):
        LocalS3(port=s3.port).start()


def test_source_buckets_are_read_only_and_scratch_buckets_writable(s3) -> None:
    fs, _ = sources.filesystem("s3://", s3.storage_options(), skip_instance_cache=True)
    with pytest.raises(PermissionError):  # the session's fixture data cannot be overwritten
        fs.pipe_file("openimages/v5/classes-segmentation.txt", b"no")
    scratch = s3.make_bucket()
    fs.pipe_file(f"{scratch}/shard.tar", b"yes")
    assert fs.cat_file(f"{scratch}/shard.tar") == b"yes"
    assert s3.make_bucket() != scratch
