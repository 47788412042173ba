"""`oistream export coco`: pycocotools loads it, and its masks are the loader's masks."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from oistream.cli import main

CLASSES = ["Person", "Car", "Traffic light", "Traffic sign"]


@pytest.fixture(scope="module")
def shard_folder(s3, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "validation"
    mp = pytest.MonkeyPatch()
    for name, value in s3.env().items():
        mp.setenv(name, value)
    try:
        args = ["shard", "--classes", *CLASSES, "--split", "validation", "--out", str(out)]
        args += ["--metadata", "s3://openimages", "--processes", "1", "--quiet"]
        args += ["--samples-per-shard", "3"]
        assert main(args) == 0
    finally:
        mp.undo()
    return out


def _tar_members(folder):
    members = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                members[info.name] = tar.extractfile(info).read()
    return members


def test_coco_export_loads_and_matches_the_loader(shard_folder, tmp_path, capsys):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from oistream import ShardDataset, image_id_to_int

    out = tmp_path / "coco"
    assert main(["export", "coco", str(shard_folder), "--out", str(out)]) == 0
    assert "annotations" in capsys.readouterr().out
    coco = COCO(str(out / "annotations.json"))
    manifest = json.loads((shard_folder / "manifest.json").read_text())
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [
        (c["index"], c["name"]) for c in manifest["classes"][1:]
    ]
    assert len(coco.getImgIds()) == manifest["totals"]["samples"]
    members = _tar_members(shard_folder)

    dataset = ShardDataset(str(shard_folder), shuffle=0, train=False, resolve_occlusion=False)
    compared = 0
    for image, target in dataset:
        key = target["image_key"]
        info = coco.loadImgs(image_id_to_int(key))[0]
        assert info["file_name"] == f"{key}.jpg" and info["ImageID"] == key
        assert (info["height"], info["width"]) == tuple(image.shape[1:])
        # The JPEG, byte for byte.
        assert (out / "images" / info["file_name"]).read_bytes() == members[f"{key}.jpg"]
        annotations = sorted(
            coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]])), key=lambda a: a["id"]
        )
        assert [a["category_id"] for a in annotations] == target["labels"].tolist()
        masks = target["masks"].numpy()
        assert len(annotations) == len(masks)
        for annotation, expected in zip(annotations, masks, strict=True):
            decoded = coco.annToMask(annotation)
            assert np.array_equal(decoded, expected)  # pixel for pixel
            assert annotation["area"] == expected.sum() and annotation["iscrowd"] == 0
            x, y, w, h = annotation["bbox"]
            rows, cols = np.nonzero(expected)
            assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            assert mask_utils.decode(annotation["segmentation"]).shape == expected.shape
            compared += 1
    assert compared == len(coco.getAnnIds()) > 0


def test_coco_export_from_s3_without_images(shard_folder, s3_env, tmp_path):
    import s3fs

    bucket = s3_env.make_bucket()
    fs = s3fs.S3FileSystem(**s3_env.storage_options())
    for path in shard_folder.iterdir():
        if path.is_file():
            fs.put_file(str(path), f"{bucket}/validation/{path.name}")
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert main(["export", "coco", str(shard_folder), "--out", str(local), "--no-images"]) == 0
    assert (
        main(["export", "coco", f"{bucket}/validation", "--out", str(remote), "--no-images"]) == 0
    )
    document = json.loads((remote / "annotations.json").read_text())
    assert document["images"] == json.loads((local / "annotations.json").read_text())["images"]
    assert (remote / "annotations.json").read_bytes().replace(
        f"{bucket}/validation".encode(), b""
    ) == (local / "annotations.json").read_bytes().replace(str(shard_folder).encode(), b"")
    assert not (remote / "images").exists()


def test_coco_export_of_a_folder_without_manifest_is_one_line(tmp_path, capsys):
    assert main(["export", "coco", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.json" in err[0]


def test_coco_export_skips_members_whose_names_leave_the_folder(shard_folder, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    manifest = json.loads((shard_folder / "manifest.json").read_text())
    first = manifest["shards"][0]["name"]
    buffer = io.BytesIO()
    with (
        tarfile.open(shard_folder / first) as source,
        tarfile.open(fileobj=buffer, mode="w") as tar,
    ):
        for info in source.getmembers():
            data = source.extractfile(info).read()
            if info.name.endswith(".jpg"):
                evil = tarfile.TarInfo("../../escape.jpg")
                evil.size = len(data)
                tar.addfile(evil, io.BytesIO(data))
            tar.addfile(info, io.BytesIO(data))
    (folder / first).write_bytes(buffer.getvalue())
    manifest["shards"] = manifest["shards"][:1]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out" / "coco"
    assert main(["export", "coco", str(folder), "--out", str(out)]) == 0
    assert not list(tmp_path.rglob("escape.jpg"))
    document = json.loads((out / "annotations.json").read_text())
    assert len(document["images"]) == manifest["shards"][0]["samples"]
