"""ShardDataset and make_loader: targets, drops and flips, partitioning, S3, hostile shards."""

from __future__ import annotations

import io
import json
import math
import tarfile
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shardfactory import (
    FakeInstance,
    FakeSample,
    corrupt,
    encode_jpeg,
    encode_mask_png,
    hostile_members,
    random_samples,
    write_shards,
    write_tar,
)

from oistream.cli import main
from oistream.errors import OistreamError
from oistream.loader import ShardDataset, ShardWarning, image_id_to_int, make_loader
from oistream.masks import decode_mask_png, reference_assemble_masks
from oistream.transforms import hflip

SAMPLES = 14


@pytest.fixture(scope="module")
def samples() -> list[FakeSample]:
    # Landscape 24x32 images, every third one portrait; masks stored at 1600/1024 of the size.
    return random_samples(SAMPLES, seed=1, size=(24, 32), max_instances=5, portrait_every=3)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory, samples: list[FakeSample]) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shards(root, samples, samples_per_shard=3)  # 5 shards, the last one with 2 samples
    return root


def keys_of(dataset) -> list[str]:
    return [target["image_key"] for _, target in dataset]


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    boxes = []
    for mask in masks:
        rows, cols = torch.nonzero(mask, as_tuple=True)
        boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def assert_consistent(image: torch.Tensor, target: dict) -> None:
    """Shapes and dtypes of torchvision's detection format; boxes tight; fields aligned."""
    height, width = image.shape[1:]
    count = len(target["labels"])
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert target["masks"].dtype == torch.uint8
    assert target["masks"].shape == (count, height, width)
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (count, 4)
    assert target["labels"].dtype == torch.int64
    assert target["area"].shape == (count,) and target["iscrowd"].shape == (count,)
    assert torch.equal(target["boxes"], boxes_from_masks(target["masks"]))
    assert torch.equal(target["area"], target["masks"].flatten(1).sum(1).float())
    assert not target["iscrowd"].any()
    assert int(target["image_id"]) == image_id_to_int(target["image_key"])


def test_targets_equal_the_reference_pipeline(shard_dir, samples):
    """Masks at the image's exact size, equal to Pillow-resize + occlusion loop + boxes."""
    by_key = {sample.key: sample for sample in samples}
    for resolve in (True, False):
        dataset = ShardDataset(shard_dir, shuffle=0, train=False, resolve_occlusion=resolve)
        seen = []
        for image, target in dataset:
            sample = by_key[target["image_key"]]
            seen.append(sample.key)
            assert tuple(image.shape[1:]) == (sample.height, sample.width)
            assert_consistent(image, target)
            decoded = [decode_mask_png(encode_mask_png(i.mask)) for i in sample.instances]
            masks, boxes, kept = reference_assemble_masks(
                decoded, sample.height, sample.width, resolve
            )
            assert np.array_equal(target["masks"].numpy(), masks)
            assert np.array_equal(target["boxes"].numpy(), boxes)
            labels = [sample.instances[k].class_index for k in kept]
            assert target["labels"].tolist() == labels
        assert seen == [sample.key for sample in samples]  # shuffle=0 keeps the order


def test_classes_come_from_the_manifest(shard_dir):
    dataset = ShardDataset(shard_dir, shuffle=0)
    assert dataset.num_classes == 4
    assert dataset.class_names == ["background", "Person", "Car", "Traffic light", "Traffic sign"]
    assert dataset.num_samples == SAMPLES


def test_pattern_list_and_single_tar_sources(shard_dir, samples):
    all_keys = [s.key for s in samples]
    pattern = ShardDataset(f"{shard_dir}/train-{{000000..000004}}.tar", shuffle=0, train=False)
    assert keys_of(pattern) == all_keys
    assert pattern.num_classes == 4  # the manifest next to the shards
    listed = [str(shard_dir / "train-000001.tar"), str(shard_dir / "train-000000.tar")]
    assert keys_of(ShardDataset(listed, shuffle=0, train=False)) == all_keys[3:6] + all_keys[:3]
    single = ShardDataset(str(shard_dir / "train-000002.tar"), shuffle=0, train=False)
    assert keys_of(single) == all_keys[6:9]


def test_without_manifest_classes_are_derived(tmp_path, samples):
    write_shards(tmp_path, samples[:6], manifest=False)
    dataset = ShardDataset(tmp_path, shuffle=0, train=False)
    assert len(keys_of(dataset)) == 6
    used = {i.class_index: i.mid for s in samples[:6] for i in s.instances}
    assert dataset.num_classes == max(used)
    for index, mid in used.items():
        assert dataset.classes[index] == {"index": index, "mid": mid, "name": mid}


def test_bad_sources_are_one_line_errors(tmp_path, shard_dir):
    with pytest.raises(OistreamError, match="no shard folder"):
        ShardDataset(tmp_path / "nowhere")
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(OistreamError, match="format version 2"):
        ShardDataset(tmp_path / "v2")
    (tmp_path / "gap").mkdir()
    gap = {**manifest, "classes": [c for c in manifest["classes"] if c["index"] != 2]}
    (tmp_path / "gap" / "manifest.json").write_text(json.dumps(gap))
    with pytest.raises(OistreamError, match=r"indices 0\.\.K in order"):
        ShardDataset(tmp_path / "gap")
    (tmp_path / "escape").mkdir()
    escaping = {**manifest, "shards": [{"name": "../train-000000.tar", "samples": 3}]}
    (tmp_path / "escape" / "manifest.json").write_text(json.dumps(escaping))
    with pytest.raises(OistreamError, match="bad shard name"):
        ShardDataset(tmp_path / "escape")


def test_empty_and_fully_occluded_instances_are_dropped_in_step(tmp_path):
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    big = np.zeros((31, 47), bool)
    big[5:25, 5:40] = True
    small = np.zeros((31, 47), bool)
    small[10:14, 10:14] = True
    instances = [
        FakeInstance(small, 1),  # covered entirely by the later "big": dropped
        FakeInstance(np.zeros((31, 47), bool), 2),  # no pixels at all: dropped
        FakeInstance(big, 3),
    ]
    samples = [
        FakeSample("00000000000000aa", image, instances),
        FakeSample("00000000000000bb", image, []),  # no instances: an empty target
    ]
    write_shards(tmp_path, samples)
    (image1, first), (image2, empty) = list(ShardDataset(tmp_path, shuffle=0, train=False))
    assert first["labels"].tolist() == [3]
    assert_consistent(image1, first)
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 20, 30)
    assert empty["labels"].shape == (0,) and empty["area"].shape == (0,)
    assert_consistent(image2, empty)
    unresolved = list(ShardDataset(tmp_path, shuffle=0, train=False, resolve_occlusion=False))
    assert unresolved[0][1]["labels"].tolist() == [1, 3]


def test_min_area_drops_small_instances_with_their_labels_and_boxes(shard_dir):
    full = {t["image_key"]: t for _, t in ShardDataset(shard_dir, shuffle=0, train=False)}
    areas = torch.cat([t["area"] for t in full.values()])
    threshold = float(areas.median())
    dropped = 0
    for image, target in ShardDataset(shard_dir, shuffle=0, train=False, min_area=threshold):
        assert_consistent(image, target)
        reference = full[target["image_key"]]
        keep = reference["area"] >= threshold
        assert target["labels"].tolist() == reference["labels"][keep].tolist()
        assert torch.equal(target["masks"], reference["masks"][keep])
        dropped += int((~keep).sum())
    assert dropped > 0


def test_flip_keeps_boxes_tight_and_twice_is_identity(shard_dir):
    for image, target in ShardDataset(shard_dir, shuffle=0, train=False):
        flipped_image, flipped = hflip(image, target)
        assert_consistent(flipped_image, flipped)  # the flipped box is the flipped mask's box
        back_image, back = hflip(flipped_image, flipped)
        assert torch.equal(back_image, image)
        for name in ("boxes", "masks", "labels", "area"):
            assert torch.equal(back[name], target[name])


def test_train_mode_flips_some_samples_and_keeps_them_aligned(shard_dir):
    plain = {t["image_key"]: (i, t) for i, t in ShardDataset(shard_dir, shuffle=0, train=False)}
    outcomes = Counter()
    for image, target in ShardDataset(shard_dir, shuffle=0, train=True, seed=3):
        assert_consistent(image, target)
        reference_image, reference = plain[target["image_key"]]
        if torch.equal(image, reference_image):
            outcomes["kept"] += 1
        else:
            mirrored_image, mirrored = hflip(reference_image, reference)
            assert torch.equal(image, mirrored_image)
            assert torch.equal(target["boxes"], mirrored["boxes"])
            assert torch.equal(target["masks"], mirrored["masks"])
            outcomes["flipped"] += 1
    assert outcomes["kept"] > 0 and outcomes["flipped"] > 0


def test_shuffle_changes_order_not_content(shard_dir, samples):
    all_keys = sorted(s.key for s in samples)
    dataset = ShardDataset(shard_dir, shuffle=5, train=False, seed=7)
    first, second = keys_of(dataset), keys_of(dataset)  # two epochs of one dataset
    assert sorted(first) == sorted(second) == all_keys
    assert first != sorted(first) and first != second


def test_two_workers_give_every_sample_once_per_pass(shard_dir, samples):
    dataset = ShardDataset(shard_dir, shuffle=4, train=True)
    loader = make_loader(dataset, batch_size=3, num_workers=2)
    for _ in range(2):  # persistent workers: the second pass must be whole too
        keys = []
        for images, targets in loader:
            assert isinstance(images, list) and isinstance(targets, list)
            assert 1 <= len(images) == len(targets) <= 3
            orientations = {image.shape[2] >= image.shape[1] for image in images}
            assert len(orientations) == 1  # grouped by aspect
            for image, target in zip(images, targets, strict=True):
                assert_consistent(image, target)
                keys.append(target["image_key"])
        assert sorted(keys) == sorted(s.key for s in samples)


def test_ranks_and_workers_partition_the_samples(shard_dir, samples, monkeypatch):
    """2 ranks x 2 workers: disjoint parts whose union is everything (worker ids simulated
    through webdataset's WORKER / NUM_WORKERS variables, ranks through RANK / WORLD_SIZE)."""
    parts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = ShardDataset(shard_dir, shuffle=10, train=False)
        assert (dataset.rank, dataset.world_size) == (rank, 2)
        for worker in range(2):
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "2")
            parts.append(keys_of(dataset))
    assert all(parts)  # 5 shards over 4 readers: nobody idle
    flat = [key for part in parts for key in part]
    assert sorted(flat) == sorted(s.key for s in samples)  # each exactly once


def test_epoch_mode_yields_exactly_n_per_rank(shard_dir, monkeypatch):
    for rank in range(2):
        dataset = ShardDataset(shard_dir, epoch_samples=7, rank=rank, world_size=2, shuffle=3)
        total = 0
        for worker in range(3):
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "3")
            for image, target in dataset:
                assert_consistent(image, target)
                total += 1
        assert total == 7


def test_epoch_mode_loader_gives_full_batches_of_a_fixed_count(shard_dir):
    dataset = ShardDataset(shard_dir, epoch_samples=10, rank=1, world_size=2)
    loader = make_loader(dataset, batch_size=4, num_workers=2)
    assert len(loader) == math.ceil(10 / 4)
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 3
        assert all(len(images) == 4 for images, _ in batches)


def test_s3_shards_through_forked_workers(s3, shard_dir, samples):
    bucket = s3.make_bucket()
    for path in sorted(shard_dir.iterdir()):
        s3.client.put_object(
            Bucket=bucket.removeprefix("s3://"), Key=f"shards/{path.name}", Body=path.read_bytes()
        )
    dataset = ShardDataset(f"{bucket}/shards", shuffle=0, train=False, endpoint_url=s3.endpoint_url)
    assert dataset.num_classes == 4
    local = {t["image_key"]: t for _, t in ShardDataset(shard_dir, shuffle=0, train=False)}
    keys = []
    for images, targets in make_loader(dataset, batch_size=2, num_workers=2):
        assert len(images) == len(targets)
        for target in targets:
            assert torch.equal(target["masks"], local[target["image_key"]]["masks"])
            keys.append(target["image_key"])
    assert sorted(keys) == sorted(s.key for s in samples)


def test_hostile_shard_is_harmless(tmp_path):
    marker = tmp_path / "unpickled"
    good = random_samples(4, seed=9, max_instances=2)
    for sample in good:  # at least one instance each, so a corrupt mask has a place to be
        if not sample.instances:
            sample.instances.append(FakeInstance(np.ones((5, 5), bool), 1))
    bad_png = random_samples(1, seed=10, max_instances=0)[0]
    bad_png.key = "badpng0000000000"
    broken_png = corrupt(encode_mask_png(np.ones((9, 9), bool)))
    bad_png.instances = [FakeInstance(np.ones((9, 9), bool), 1, png=broken_png)]
    bad_jpeg = random_samples(1, seed=11, max_instances=1)[0]
    bad_jpeg.key = "badjpeg000000000"
    bad_jpeg.jpeg = encode_jpeg(bad_jpeg.image)[:200]  # truncated
    good[0].extra_members = hostile_members(good[0].key, marker)
    out = tmp_path / "shards"
    write_shards(out, [good[0], bad_png, good[1], bad_jpeg, good[2], good[3]], samples_per_shard=6)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = keys_of(ShardDataset(out, shuffle=0, train=False))
    assert keys == [good[0].key, good[1].key, good[2].key, good[3].key]
    assert not marker.exists()  # the pickle was never loaded
    messages = [str(w.message) for w in caught if issubclass(w.category, ShardWarning)]
    shard = str(out / "train-000000.tar")
    for name in ("../evil.jpg", f"{good[0].key}/../../evil2.jpg", "/tmp/oistream-evil.jpg"):
        assert any(repr(name) in m and "rejected" in m for m in messages), name
    assert any("badpng0000000000" in m and shard in m for m in messages)
    assert any("badjpeg000000000" in m and shard in m for m in messages)
    assert not any(".pyd" in m or ".pickle" in m for m in messages)  # silently ignored
    assert any("linked0000000000" in m and "no .jpg member" in m for m in messages)


def test_samples_with_bad_records_are_skipped_with_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    ok = FakeSample("0000000000000001", image, [FakeInstance(np.ones((25, 25), bool), 2)])
    out_of_range = FakeSample("0000000000000002", image, [FakeInstance(np.ones((4, 4), bool), 9)])
    write_shards(tmp_path, [ok, out_of_range])
    # A sample whose mask member is missing, in a second shard without a manifest entry.
    members = [
        ("0000000000000003.jpg", encode_jpeg(image)),
        ("0000000000000003.json", json.dumps({"instances": [{"mask": "000.mask.png"}]}).encode()),
    ]
    write_tar(tmp_path / "extra.tar", members)
    with pytest.warns(ShardWarning) as record:
        dataset = ShardDataset(
            [str(tmp_path / "train-000000.tar"), str(tmp_path / "extra.tar")], shuffle=0
        )
        assert keys_of(dataset) == ["0000000000000001"]
    messages = " | ".join(str(w.message) for w in record)
    assert "0000000000000002" in messages and "class_index 9" in messages
    assert "0000000000000003" in messages and "000.mask.png" in messages


def test_jpeg_size_wins_over_the_json(tmp_path):
    image = np.zeros((10, 14, 3), np.uint8)
    sample = FakeSample("00000000000000cc", image, [FakeInstance(np.ones((15, 22), bool), 1)])
    sample.jpeg = encode_jpeg(np.zeros((12, 18, 3), np.uint8))  # JSON will say 14x10
    write_shards(tmp_path, [sample])
    with pytest.warns(ShardWarning, match="JSON says 14x10, the JPEG is 18x12"):
        ((decoded, target),) = list(ShardDataset(tmp_path, shuffle=0, train=False))
    assert decoded.shape == (3, 12, 18) and target["masks"].shape == (1, 12, 18)


def test_non_jpeg_image_member_still_decodes(tmp_path):
    image = np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    sample = FakeSample("00000000000000dd", image, [], jpeg=buffer.getvalue())
    write_shards(tmp_path, [sample])
    ((decoded, _),) = list(ShardDataset(tmp_path, shuffle=0, train=False))
    assert np.array_equal(decoded.permute(1, 2, 0).numpy(), image)  # lossless: exact


@pytest.fixture(scope="module")
def written_shards(s3, fake_bucket, tmp_path_factory) -> Path:
    """Shards that `oistream shard` wrote from the fake bucket (train split, 4 classes)."""
    out = tmp_path_factory.mktemp("written") / "shards"
    args = ["shard", "--classes", "Person", "Car", "Traffic light", "Traffic sign"]
    args += ["--split", "train", "--out", str(out), "--metadata", "s3://openimages"]
    args += ["--endpoint-url", s3.endpoint_url, "--samples-per-shard", "5", "--quiet"]
    assert main(args) == 0
    return out


def json_records(folder: Path) -> dict[str, dict]:
    """Every sample's JSON record in the shards of ``folder``, by key, read with tarfile."""
    records = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for info in tar:
                if info.name.endswith(".json"):
                    records[info.name[: -len(".json")]] = json.load(tar.extractfile(info))
    return records


def test_shards_from_the_writer_match_the_bucket(written_shards, fake_bucket):
    """End to end: masks out of the bucket's zips, through the writer and the loader, equal
    the reference pipeline applied to the zips' PNGs; labels follow the manifest's classes."""
    manifest = json.loads((written_shards / "manifest.json").read_text())
    class_of = {c["mid"]: c["index"] for c in manifest["classes"]}
    records = json_records(written_shards)
    dataset = ShardDataset(written_shards, shuffle=0, train=False)
    assert dataset.class_names[1:] == ["Person", "Car", "Traffic light", "Traffic sign"]
    masks_root = fake_bucket / "openimages" / "v5" / "train-masks"
    count = 0
    for image, target in dataset:
        count += 1
        assert_consistent(image, target)
        key = target["image_key"]
        with Image.open(fake_bucket / "open-images-dataset" / "train" / f"{key}.jpg") as jpeg:
            assert tuple(image.shape[1:]) == (jpeg.height, jpeg.width)
        instances = records[key]["instances"]
        with zipfile.ZipFile(masks_root / f"train-masks-{key[0]}.zip") as archive:
            pngs = [archive.read(instance["mask_path"]) for instance in instances]
        masks, boxes, kept = reference_assemble_masks(
            [decode_mask_png(png) for png in pngs], image.shape[1], image.shape[2]
        )
        assert np.array_equal(target["masks"].numpy(), masks)
        assert np.array_equal(target["boxes"].numpy(), boxes)
        assert target["labels"].tolist() == [class_of[instances[k]["label"]] for k in kept]
    assert count == len(records) == manifest["totals"]["samples"] > 0


def _batch_keys(batches) -> list[tuple]:
    """What a batch is, for equality: its keys, flips (via the boxes) and image bytes' sum."""
    return [
        tuple(
            (t["image_key"], t["boxes"].sum().item(), int(i.sum())) for i, t in zip(*b, strict=True)
        )
        for b in batches
    ]


@pytest.mark.parametrize(("workers", "stop_at"), [(0, 3), (2, 3), (2, 4)])
def test_a_loader_resumed_mid_epoch_yields_the_rest_of_the_epoch(shard_dir, workers, stop_at):
    """state_dict() after k batches; a fresh loader given it yields exactly the batches the
    uninterrupted loader yields after k, in order, with the same flips; and the epoch after."""

    def fresh():
        dataset = ShardDataset(shard_dir, epoch_samples=14, shuffle=5, seed=7)
        return make_loader(dataset, batch_size=2, num_workers=workers)

    whole = fresh()
    first = _batch_keys(list(whole)) + _batch_keys(list(whole))  # epochs 0 and 1
    interrupted = fresh()
    taken = iter(interrupted)
    for _ in range(stop_at):
        next(taken)
    state = interrupted.state_dict()
    assert state["epoch"] == 0 and state["batches"] == stop_at
    del taken, interrupted

    resumed = fresh()
    resumed.load_state_dict(state)
    rest = _batch_keys(list(resumed))
    assert rest == first[stop_at:7]
    assert _batch_keys(list(resumed)) == first[7:]  # the next epoch is the ordinary one


def test_a_dataset_position_seeks_without_workers(shard_dir):
    dataset = ShardDataset(shard_dir, shuffle=4, seed=3)
    everything = keys_of(dataset)
    again = ShardDataset(shard_dir, shuffle=4, seed=3)
    stream = iter(again)
    head = [next(stream)[1]["image_key"] for _ in range(5)]
    state = again.state_dict()
    resumed = ShardDataset(shard_dir, shuffle=4, seed=3)
    resumed.load_state_dict(state)
    assert head + keys_of(resumed) == everything
