"""`oistream shard` end to end against moto's S3 server holding the fake bucket."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import webdataset as wds

from oistream.cli import main
from oistream.sharding.run import ShardOptions, run_shard
from oistream.testing.faultproxy import FaultProxy

CLASSES = ["Person", "Car", "Traffic light", "Traffic sign"]
CLASS_MIDS = {"/m/01g317", "/m/0k4j", "/m/015qff", "/m/01mqdt"}


def shard_args(split: str, out: Path | str, *extra: str) -> list[str]:
    return [
        "shard",
        "--classes",
        *CLASSES,
        "--split",
        split,
        "--out",
        str(out),
        "--metadata",
        "s3://openimages",
        "--samples-per-shard",
        "3",
        "--processes",
        "1",  # in-process: quick; the pool is exercised where a test asks for 2
        "--quiet",
        *extra,
    ]


def read_tar(path: Path | bytes) -> list[tuple[str, bytes]]:
    fileobj = io.BytesIO(path) if isinstance(path, bytes) else open(path, "rb")  # noqa: SIM115
    with fileobj, tarfile.open(fileobj=fileobj, mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file a run leaves, by name: shards, manifest and progress records."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "plan.json"
    }


def csv_rows(bucket: Path, split: str) -> dict[str, list[dict]]:
    by_image: dict[str, list[dict]] = {}
    path = bucket / "openimages" / "v5" / f"{split}-annotations-object-segmentation.csv"
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["LabelName"] in CLASS_MIDS:
                by_image.setdefault(row["ImageID"], []).append(row)
    return by_image


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_shards_hold_the_source_bytes_and_csv(s3_env, fake_bucket, tmp_path, split):
    out = tmp_path / split
    assert main(shard_args(split, out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    rows = csv_rows(fake_bucket, split)
    assert manifest["totals"]["samples"] == len(rows)  # every image carrying a selected class
    assert [c["name"] for c in manifest["classes"]] == ["background", *CLASSES]
    assert manifest["failures"] == []
    seen = set()
    for shard in manifest["shards"]:
        members = read_tar(out / shard["name"])
        assert sum(len(data) for _, data in members) < shard["bytes"]
        records = {name: data for name, data in members}
        for name, data in members:
            if not name.endswith(".json"):
                continue
            image_id = name.split(".")[0]
            seen.add(image_id)
            record = json.loads(data)
            source_image = fake_bucket / "open-images-dataset" / split / f"{image_id}.jpg"
            assert records[f"{image_id}.jpg"] == source_image.read_bytes()
            assert (record["image_id"], record["split"]) == (image_id, split)
            expected = rows[image_id]
            assert [x["mask_path"] for x in record["instances"]] == [
                r["MaskPath"] for r in expected
            ]
            zip_path = (
                fake_bucket
                / "openimages"
                / "v5"
                / f"{split}-masks"
                / f"{split}-masks-{image_id[0]}.zip"
            )
            with zipfile.ZipFile(zip_path) as masks:
                for k, (instance, row) in enumerate(
                    zip(record["instances"], expected, strict=True)
                ):
                    assert instance["mask"] == f"{k:03d}.mask.png"
                    assert records[f"{image_id}.{k:03d}.mask.png"] == masks.read(row["MaskPath"])
                    box = [float(row[c]) for c in ("BoxXMin", "BoxYMin", "BoxXMax", "BoxYMax")]
                    assert instance["box"] == pytest.approx(box)
                    assert instance["label"] == row["LabelName"]
                    assert manifest["classes"][instance["class_index"]]["mid"] == row["LabelName"]
    assert seen == set(rows)


def test_reproducible_and_readable_by_webdataset_and_tar(s3_env, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(shard_args("train", first, "--processes", "2")) == 0
    assert main(shard_args("train", second, "--processes", "1", "--concurrency", "7")) == 0
    assert folder_bytes(first) == folder_bytes(second)

    shards = sorted(str(p) for p in first.glob("train-*.tar"))
    keys = [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)]
    manifest = json.loads((first / "manifest.json").read_text())
    assert len(keys) == len(set(keys)) == manifest["totals"]["samples"]
    listing = subprocess.run(["tar", "-tf", shards[0]], capture_output=True, text=True, check=True)
    names = listing.stdout.split()
    assert names[0].endswith(".000.mask.png") and any(n.endswith(".jpg") for n in names)


def test_rerun_skips_complete_shards_and_redoes_the_rest(s3_env, tmp_path):
    out = tmp_path / "out"
    assert main(shard_args("train", out)) == 0
    reference = folder_bytes(out)
    victim = sorted(out.glob("train-*.tar"))[1]
    victim.unlink()
    (out / "manifest.json").unlink()
    kept = sorted(out.glob("train-*.tar"))[0]
    kept_mtime = kept.stat().st_mtime_ns
    assert main(shard_args("train", out)) == 0
    assert folder_bytes(out) == reference
    assert kept.stat().st_mtime_ns == kept_mtime  # not rewritten


def test_kill_9_then_rerun_gives_identical_result(s3, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "out"
    env = {**os.environ, **s3.env()}

    def command(folder: Path, processes: str = "2") -> list[str]:
        args = shard_args("train", folder, "--concurrency", "1", "--processes", processes)
        args[args.index("--samples-per-shard") + 1] = "1"  # many shards: a run to interrupt
        return [sys.executable, "-m", "oistream", *args]

    run = subprocess.Popen(command(out), env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("train-*.tar")) and time.monotonic() < deadline:
            assert run.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.05)
    finally:
        os.kill(run.pid, signal.SIGKILL)  # the parent alone, as the OOM killer would
        run.wait()
    assert not (out / "manifest.json").exists(), "the run finished before the kill"
    # Its orphaned workers notice and exit by themselves.
    deadline = time.monotonic() + 30
    while _group_alive(run.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(run.pid), "worker processes outlived the killed run"
    rerun = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    subprocess.run(command(reference, processes="1"), env=env, check=True, timeout=300)
    assert folder_bytes(out) == folder_bytes(reference)
    assert not list(out.glob(".*.partial"))


def test_ctrl_c_stops_the_run_and_its_workers_with_one_line(s3, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, **s3.env()}
    args = shard_args("train", out, "--concurrency", "1", "--processes", "2")
    args[args.index("--samples-per-shard") + 1] = "1"  # many shards: a run to interrupt
    run = subprocess.Popen(
        [sys.executable, "-m", "oistream", *args],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("train-*.tar")) and time.monotonic() < deadline:
            assert run.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)  # as a terminal sends it: to the whole group
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130
    # No worker's traceback either, not even from one still importing when the signal came.
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        "oistream shard: interrupted; rerun the same command to resume"
    )
    deadline = time.monotonic() + 30
    while _group_alive(run.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(run.pid), "worker processes outlived the interrupted run"
    assert not (out / "manifest.json").exists()


def test_shard_workers_are_born_ignoring_ctrl_c() -> None:
    from oistream.sharding import executors

    before = signal.getsignal(signal.SIGINT)
    with executors._sigint_ignored():
        # What a worker spawned now starts with, before any of our code runs in it.
        child = subprocess.run(
            [sys.executable, "-c", "import signal as s; print(s.getsignal(s.SIGINT) == s.SIG_IGN)"],
            capture_output=True,
            text=True,
            check=True,
        )
    assert child.stdout.strip() == "True"
    assert signal.getsignal(signal.SIGINT) is before  # the parent's own handler is back


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _broken_copy(fake_bucket: Path, root: Path) -> dict[str, str]:
    """Copies the bucket under other bucket names, with one image deleted, one mask corrupted
    (valid zip, CRC matching the damaged bytes) and one member removed from its zip."""
    images, metadata = root / "broken-images", root / "broken-metadata"
    shutil.copytree(fake_bucket / "open-images-dataset", images)
    shutil.copytree(fake_bucket / "openimages", metadata)
    rows = list(csv_rows(fake_bucket, "validation").items())
    deleted_image, corrupt_image, unzipped_image = rows[0][0], rows[1][0], rows[2][0]
    (images / "validation" / f"{deleted_image}.jpg").unlink()
    corrupt_mask = rows[1][1][0]["MaskPath"]
    missing_mask = rows[2][1][0]["MaskPath"]
    for target, action in ((corrupt_mask, "corrupt"), (missing_mask, "drop")):
        zip_path = metadata / "v5" / "validation-masks" / f"validation-masks-{target[0]}.zip"
        with zipfile.ZipFile(zip_path) as source:
            entries = [(info, source.read(info)) for info in source.infolist()]
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as rewritten:
            for info, data in entries:
                if info.filename == target and action == "drop":
                    continue
                if info.filename == target:
                    data = data[:40] + bytes(b ^ 0x5A for b in data[40:80]) + data[80:]
                rewritten.writestr(info, data)
    return {
        deleted_image: "image",
        corrupt_image: "corrupt",
        unzipped_image: "missing from its zip",
    }


def test_failures_are_recorded_and_the_samples_left_out(s3_env, fake_bucket, tmp_path):
    expected = _broken_copy(fake_bucket, tmp_path / "tree")
    s3_env.upload_tree(tmp_path / "tree")
    out = tmp_path / "out"
    args = shard_args("validation", out, "--images", "s3://broken-images")
    args[args.index("s3://openimages")] = "s3://broken-metadata"
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    failures = {f["image_id"]: f["reason"] for f in manifest["failures"]}
    assert set(failures) == set(expected)
    for image_id, words in expected.items():
        assert words in failures[image_id]
    written = {name.split(".")[0] for shard in out.glob("*.tar") for name, _ in read_tar(shard)}
    assert not written & set(expected)
    assert manifest["totals"]["samples"] == len(csv_rows(fake_bucket, "validation")) - 3


def test_faults_on_the_wire_still_give_complete_correct_shards(s3, s3_env, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    assert main(shard_args("test", clean)) == 0
    with FaultProxy(
        s3.endpoint_url, fail_rate=0.2, reset_rate=0.1, truncate_rate=0.1, seed=3
    ) as proxy:
        monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", proxy.endpoint_url)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        faulty = tmp_path / "faulty"
        assert main(shard_args("test", faulty)) == 0
        faults = proxy.stats.faults
    assert folder_bytes(faulty) == folder_bytes(clean)
    assert faults.get("fail", 0) > 0 and faults.get("reset", 0) + faults.get("truncate", 0) > 0


def test_output_to_s3(s3_env, tmp_path):
    local = tmp_path / "local"
    assert main(shard_args("validation", local)) == 0
    bucket = s3_env.make_bucket()
    out = f"{bucket}/shards/validation"
    assert main(shard_args("validation", out)) == 0
    import s3fs

    fs = s3fs.S3FileSystem(**s3_env.storage_options())
    remote_manifest = json.loads(fs.cat(f"{out}/manifest.json"))
    assert remote_manifest == json.loads((local / "manifest.json").read_text())
    for shard in remote_manifest["shards"]:
        assert fs.cat(f"{out}/{shard['name']}") == (local / shard["name"]).read_bytes()
    assert not [p for p in fs.find(out) if p.endswith(".partial")]


def test_dask_executor_gives_identical_shards(s3_env, tmp_path):
    distributed = pytest.importorskip("distributed")
    local = tmp_path / "local"
    assert main(shard_args("validation", local)) == 0
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        out = tmp_path / "dask"
        report = run_shard(
            ShardOptions(
                classes=CLASSES,
                split="validation",
                out=str(out),
                metadata="s3://openimages",
                samples_per_shard=3,
                executor="dask",
                scheduler=cluster.scheduler_address,
                show_progress=False,
            )
        )
    assert report.shards_built == len(report.manifest["shards"]) > 1
    assert folder_bytes(out) == folder_bytes(local)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_class_gives_one_line_with_closest_names(s3_env, tmp_path, capsys):
    args = shard_args("train", tmp_path / "x")
    args[args.index("Car")] = "Persn"
    assert main(args) == 1
    line = _error_line(capsys)
    assert "Persn" in line and "Person" in line
    assert not (tmp_path / "x").exists()


def test_unreachable_endpoint_gives_one_line(s3_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert main(shard_args("train", tmp_path / "x")) == 1
    assert "openimages" in _error_line(capsys)


def test_wrong_images_bucket_stops_at_once(s3_env, tmp_path, capsys):
    assert main(shard_args("train", tmp_path / "x", "--images", "s3://no-such-bucket")) == 1
    assert "no-such-bucket" in _error_line(capsys)


def test_another_plan_into_the_same_folder_is_refused(s3_env, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(shard_args("validation", out)) == 0
    before = folder_bytes(out)
    assert main(shard_args("validation", out, "--seed", "5")) == 1
    line = _error_line(capsys)
    assert "another selection" in line and "version" in line and "--overwrite" in line
    assert folder_bytes(out) == before


@pytest.mark.parametrize(
    "args",
    [
        ["shard", "--classes", "Person", "--split", "nope", "--out", "x"],
        ["shard", "--classes", "Person", "--split", "train", "--out", "x", "--per-class", "0"],
        ["shard", "--split", "train", "--out", "x"],
    ],
)
def test_bad_arguments_give_one_line(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    _error_line(capsys)


def test_zip_index_cache_spares_a_rerun_the_directories(s3_env, tmp_path):
    cache = tmp_path / "cache"
    common = {
        "metadata": "s3://openimages",
        "samples_per_shard": 3,
        "processes": 1,
        "show_progress": False,
        "cache": str(cache),
    }
    first = run_shard(ShardOptions(CLASSES, "validation", str(tmp_path / "a"), **common))
    assert list(cache.iterdir())
    second = run_shard(ShardOptions(CLASSES, "validation", str(tmp_path / "b"), **common))
    assert first.directory_bytes > 0
    assert second.directory_bytes == 0
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")


def test_workers_started_before_the_plan_serve_every_split_with_the_same_bytes(s3_env, tmp_path):
    pooled, here = tmp_path / "pooled", tmp_path / "here"
    both = ("--split", "train", "validation")
    assert main([*shard_args("train", pooled, "--processes", "2"), *both]) == 0
    assert main([*shard_args("train", here, "--processes", "1"), *both]) == 0
    assert folder_bytes(pooled) == folder_bytes(here)
    assert {p.name for p in pooled.iterdir()} >= {"train", "validation"}


@pytest.mark.parametrize(
    ("changes", "started"),
    [
        ({}, 2),  # no limit: as many shards as the split has
        ({"max_images": 3}, 0),  # one shard at most: built in this process
        ({"max_images": 4}, 2),
        ({"per_class": 1}, 0),  # 2 classes x 1 image fit one shard of 3
        ({"per_class": 2}, 2),
        ({"per_class": 1, "expand_hierarchy": True}, 2),  # subclasses add images
        ({"dry_run": True}, 0),
        ({"executor": "dask", "scheduler": "tcp://x:1"}, 0),
        ({"processes": 1}, 0),
    ],
)
def test_workers_start_before_the_plan_only_when_more_than_one_shard_can_be_built(
    changes: dict, started: int
) -> None:
    from oistream.sharding.options import ShardOptions
    from oistream.sharding.run import _local_processes

    options = ShardOptions(
        classes=["Person", "Car"], split="train", out="x", samples_per_shard=3, processes=2
    )
    assert _local_processes(dataclasses.replace(options, **changes)) == started


def test_the_located_members_come_out_of_the_event_loop_without_being_formatted() -> None:
    """asyncio.run formats its main task (result included) when it puts SIGINT's handler
    back; a run's located members are returned without that."""
    import asyncio

    from oistream.sharding.run import _run_event_loop

    class Counted:
        formatted = 0

        def __repr__(self) -> str:
            Counted.formatted += 1
            return "Counted()"

    async def result() -> Counted:
        return Counted()

    handler_is_default = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    asyncio.run(result())
    if handler_is_default:  # the cost the helper avoids is there to avoid
        assert Counted.formatted > 0
    Counted.formatted = 0
    assert isinstance(_run_event_loop(result()), Counted)
    assert Counted.formatted == 0


@contextlib.contextmanager
def _each_image_timed(
    s3, fake_bucket: Path, split: str, latency: float, monkeypatch
) -> Iterator[tuple[FaultProxy, list[str]]]:
    """A proxy adding ``latency`` in front of the fake bucket's S3 server, for the runs in the
    block: each image of ``split`` is a request kind of its own (named by its ID), the mask
    zips' GETs are kind "zips". Yields the proxy and the image IDs."""
    images = sorted(p.stem for p in (fake_bucket / "open-images-dataset" / split).iterdir())
    kinds = [(i, f"GET /open-images-dataset/{split}/{i}.jpg ".encode()) for i in images]
    with FaultProxy(s3.endpoint_url, latency=latency) as proxy:
        monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", proxy.endpoint_url)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        proxy.reset_stats(kinds=[*kinds, ("zips", f"GET /openimages/v5/{split}-masks/".encode())])
        yield proxy, images


def test_one_shard_built_here_fetches_its_images_and_masks_while_the_directories_are_read(
    s3, s3_env, fake_bucket, tmp_path, monkeypatch
):
    """A selection that fits one shard, built in this process: its images are asked for while
    the zips' directories are read (they need nothing of them), each zip's masks once its
    directory is in, so the job asks for no mask itself; and the shard is the one a run
    without that gives, byte for byte."""
    from oistream.sharding import run, shardjob

    asked_by_the_job: list[int] = []
    fetch_members = shardjob.fetch_members

    async def counted(fetcher, fs, path, members, *args, **kwargs):
        asked_by_the_job.append(len(members))
        return await fetch_members(fetcher, fs, path, members, *args, **kwargs)

    monkeypatch.setattr(shardjob, "fetch_members", counted)

    def one_shard(out: Path) -> list[str]:  # the last --samples-per-shard counts
        return shard_args("validation", out, "--samples-per-shard", "1000")

    # One kind per image: the images check asks the first planned one for its first byte
    # before any directory is read, so the kind to time is an image asked for once.
    latency = 0.2
    with _each_image_timed(s3, fake_bucket, "validation", latency, monkeypatch) as (proxy, images):
        assert main(one_shard(tmp_path / "ahead")) == 0
        stats = proxy.stats
        assert asked_by_the_job == []
        monkeypatch.setattr(run, "PREFETCH_BYTES", 0)
        assert main(one_shard(tmp_path / "after")) == 0
        assert sum(asked_by_the_job) > 0
    # A directory is read a round trip or two after its zip's first request (the tail, then the
    # directory unless the tail held it): the images were asked for well within the first.
    first = stats.first_start_by_kind
    asked_once = [first[i] for i in images if stats.requests_by_kind.get(i) == 1]
    assert asked_once and min(asked_once) - first["zips"] < latency / 2
    assert folder_bytes(tmp_path / "ahead") == folder_bytes(tmp_path / "after")
    assert len(list((tmp_path / "ahead").glob("*.tar"))) == 1


def test_the_workers_first_shards_arrive_with_their_images_fetched_while_the_directories_are_read(
    s3, s3_env, fake_bucket, tmp_path, monkeypatch
):
    """Shards built by worker processes: the first shard of each worker has its images asked
    for while the zips' directories are read, and carries them to its worker; no image is
    asked for twice, the later shards' images only once the directories are in, and the
    shards are those of a run without it, byte for byte."""
    from oistream.sharding import run

    latency = 0.2
    with _each_image_timed(s3, fake_bucket, "train", latency, monkeypatch) as (proxy, _):
        assert main(shard_args("train", tmp_path / "ahead", "--processes", "2")) == 0
        stats = proxy.stats
        monkeypatch.setattr(run, "PREFETCH_BYTES", 0)
        assert main(shard_args("train", tmp_path / "after", "--processes", "2")) == 0
    assert folder_bytes(tmp_path / "ahead") == folder_bytes(tmp_path / "after")

    def shard_images(tar: Path) -> list[str]:
        with tarfile.open(tar) as archive:
            return [Path(m.name).name.split(".")[0] for m in archive if m.name.endswith(".jpg")]

    tars = sorted((tmp_path / "ahead").glob("*.tar"))
    assert len(tars) > 2
    first = stats.first_start_by_kind
    # The images check asks the first planned image for its first byte, beside the
    # directories: every other image is asked for once.
    asked = {i: stats.requests_by_kind.get(i, 0) for t in tars for i in shard_images(t)}
    assert sorted(asked.values())[:-1] == [1] * (len(asked) - 1)
    # A directory is in a round trip or two after its zip's first request.
    for tar in tars[:2]:
        assert all(first[i] - first["zips"] < latency / 2 for i in shard_images(tar))
    for tar in tars[2:]:
        assert all(first[i] - first["zips"] > latency for i in shard_images(tar) if asked[i] == 1)


def test_a_train_shard_run_never_imports_pandas(fake_bucket: Path, tmp_path: Path) -> None:
    """The catalog's rows are numpy columns (``rows.Rows``): importing pandas cost a 1% run
    0.4-0.5 s of CPU, for a few table operations. Only evaluation annotations (validation and
    test) read their CSVs with pandas."""
    code = (
        "import sys; from oistream.sharding.run import run_shard; "
        "from oistream.sharding.options import ShardOptions; "
        "root, out = sys.argv[1:]; "
        "report = run_shard(ShardOptions(['Person', 'Car'], 'train', out, "
        "images=root + '/open-images-dataset', metadata=root + '/openimages', max_images=6, "
        "samples_per_shard=3, processes=1, show_progress=False, cache=None)); "
        "print(report.manifest['totals']['samples'], 'pandas' in sys.modules)"
    )
    args = [sys.executable, "-c", code, str(fake_bucket), str(tmp_path / "out")]
    ran = subprocess.run(args, check=True, capture_output=True, text=True)
    assert ran.stdout.split() == ["6", "False"]
    assert len(list((tmp_path / "out").glob("*.tar"))) == 2


def test_the_shard_command_reads_its_class_lists_before_importing_numpy() -> None:
    """numpy (0.1-0.2 s) comes with the CSV's modules, which a run imports on a thread while
    its class lists are read: the command's modules, class file and class lists do without."""
    code = (
        "import sys, oistream.cli, oistream.sharding.run, oistream.sharding.shardjob; "
        "from oistream.sharding import classes, selection; "
        "before = 'numpy' in sys.modules; "
        "from oistream.sharding.preimport import import_in_background; "
        "import_in_background('oistream.sharding.plan'); "
        "from oistream.sharding import plan; "
        "sys.exit(2 * before + ('numpy' not in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_shard_command_leaves_botocore_to_s3fs() -> None:
    """botocore (with urllib3 and dateutil, ~0.15 s of imports) is s3fs's: the plain-HTTP
    shard path never loads it, and its errors are classified once s3fs has loaded it."""
    code = (
        "import sys, oistream.cli, oistream.sharding.run, oistream.sharding.shardjob; "
        "print(sorted(m for m in ('botocore', 'urllib3', 'dateutil') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert loaded.stdout.decode().strip() == "[]"


@pytest.mark.timeout(30)  # a close() that waited for the open would hang here
def test_a_csv_opened_ahead_and_never_used_is_closed_without_waiting_for_its_server():
    """The CSV is opened while the class lists are read; when the run stops before using it
    (an unknown class), stopping must not wait for a slow server, and the file, once open,
    is closed all the same."""
    import threading

    from oistream.sharding.run import _OpenAhead

    answer, closed = threading.Event(), threading.Event()

    class Opened:
        def close(self) -> None:
            closed.set()

    def open_slowly() -> Opened:
        answer.wait()
        return Opened()

    ahead = _OpenAhead(open_slowly)
    ahead.close()  # returns while the open is still waiting for its answer
    assert not closed.is_set()
    answer.set()
    assert closed.wait(10)
