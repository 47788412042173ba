"""The metadata cache, --dry-run, --image-ids, --classes-file, several splits, and the CLI's
help and error lines (issue 14), against moto on loopback."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest
from test_shard import CLASSES, csv_rows, folder_bytes, shard_args

from oistream.cli import main
from oistream.sharding.cache import MetadataCache
from oistream.sharding.options import DEFAULT_CACHE
from oistream.sharding.run import ShardOptions, format_summary, run_shard, run_splits
from oistream.sharding.selection import read_image_ids
from oistream.testing.faultproxy import FaultProxy

CSV_KEY = "v5/validation-annotations-object-segmentation.csv"


def _options(tmp_path: Path, out: str, **extra) -> ShardOptions:
    values = {
        "metadata": "s3://openimages",
        "samples_per_shard": 3,
        "processes": 1,
        "show_progress": False,
        "cache": str(tmp_path / "cache"),
    }
    split = extra.pop("split", "validation")
    values.update(extra)
    return ShardOptions(CLASSES, split, out, **values)


@pytest.fixture
def proxied(s3, s3_env, monkeypatch):
    """A counting proxy in front of moto; every S3 client of the test goes through it."""
    with FaultProxy(s3.endpoint_url, keep_log=True) as proxy:
        monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", proxy.endpoint_url)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        yield proxy


def _get_log(proxy: FaultProxy, prefix: str) -> list[tuple]:
    return [e for e in proxy.stats.log if e[0] == "GET" and e[1].startswith(prefix)]


def _gets(proxy: FaultProxy, prefix: str) -> tuple[int, int]:
    """(GET requests, body bytes sent) whose path starts with ``prefix``."""
    entries = _get_log(proxy, prefix)
    return len(entries), sum(e[4] for e in entries)


def test_second_run_moves_no_metadata_body_bytes(proxied, fake_bucket, tmp_path):
    first = run_shard(_options(tmp_path, str(tmp_path / "a")))
    zips = "/openimages/v5/validation-masks/"
    first_zip_gets = set(_get_log(proxied, zips))
    catalog_gets = [e for e in _get_log(proxied, "/openimages/") if not e[1].startswith(zips)]
    csv_size = (fake_bucket / "openimages" / CSV_KEY).stat().st_size
    assert sum(e[4] for e in catalog_gets) > csv_size
    assert first.catalog_bytes >= csv_size  # the summary's moved bytes include the CSV
    assert first.bytes_requested >= first.catalog_bytes + first.directory_bytes
    # The summary's request count is the server's: class lists, CSV, images check, zips, images.
    assert first.requests == proxied.stats.requests
    proxied.reset_stats()
    second = run_shard(_options(tmp_path, str(tmp_path / "b")))
    assert second.requests == proxied.stats.requests
    second_zip_gets = set(_get_log(proxied, zips))
    # No class list or CSV body; of the zips only the members, none of the directory reads.
    assert [e for e in _get_log(proxied, "/openimages/") if not e[1].startswith(zips)] == []
    assert second_zip_gets < first_zip_gets
    directory_reads = first_zip_gets - second_zip_gets
    assert sum(e[4] for e in directory_reads) == first.directory_bytes > 0
    assert second.catalog_bytes == second.directory_bytes == 0
    assert second.cached_bytes >= csv_size
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    assert "came from the cache" in format_summary(second, "b")
    # Another selection of the same split: still nothing but HEADs for its metadata.
    proxied.reset_stats()
    other = run_shard(dataclasses.replace(_options(tmp_path, str(tmp_path / "c")), classes=["Car"]))
    assert [e for e in _get_log(proxied, "/openimages/") if not e[1].startswith(zips)] == []
    assert other.catalog_bytes == other.directory_bytes == 0


def test_an_entry_whose_etag_changed_is_refetched(s3_env, fake_bucket, tmp_path):
    bucket = "metadata-etag"
    s3_env.make_bucket(bucket)
    client = s3_env.client
    root = fake_bucket / "openimages"
    for path in root.rglob("*"):
        if path.is_file():
            client.put_object(
                Bucket=bucket, Key=path.relative_to(root).as_posix(), Body=path.read_bytes()
            )
    options = _options(tmp_path, str(tmp_path / "a"), metadata=f"s3://{bucket}")
    run_shard(options)
    text = (root / CSV_KEY).read_bytes()
    # Same size, other bytes: only the ETag tells the cached copy is stale.
    row = next(iter(csv_rows(fake_bucket, "validation").values()))[0]
    old = f"{row['BoxID']},{row['BoxXMin']}".encode()
    new_value = row["BoxXMin"][:-1] + ("1" if row["BoxXMin"][-1] != "1" else "2")
    changed = text.replace(old, f"{row['BoxID']},{new_value}".encode(), 1)
    assert changed != text and len(changed) == len(text)
    client.put_object(Bucket=bucket, Key=CSV_KEY, Body=changed)
    report = run_shard(dataclasses.replace(options, out=str(tmp_path / "b")))
    assert report.catalog_bytes == len(changed)  # the CSV again, the class lists from cache
    cache = MetadataCache(tmp_path / "cache")
    with cache.open(f"s3://{bucket}/{CSV_KEY}", s3_env.storage_options()) as file:
        assert file.read() == changed
    assert cache.stats.hits == 1
    # The shards changed with it: the cached copy was not used.
    assert folder_bytes(tmp_path / "a") != folder_bytes(tmp_path / "b")


def test_dry_run_fetches_nothing_writes_nothing_and_counts_as_the_run(
    proxied, fake_bucket, tmp_path
):
    out = tmp_path / "out"
    dry = run_shard(_options(tmp_path, str(out), dry_run=True))
    assert _gets(proxied, "/open-images-dataset/") == (0, 0)  # HEADs only
    assert not out.exists()
    proxied.reset_stats()
    again = run_shard(_options(tmp_path, str(out), dry_run=True))  # warm cache: no GET at all
    assert _gets(proxied, "/") == (0, 0)
    assert again.estimate == dry.estimate and again.planned == dry.planned

    proxied.reset_stats()
    real = run_shard(_options(tmp_path, str(out)))
    totals = real.manifest["totals"]
    member_gets = _get_log(proxied, "/openimages/v5/validation-masks/")  # directories cached
    assert dry.planned == {
        "shards": totals["shards"],
        "samples": totals["samples"],
        "images_per_class": totals["images_per_class"],
        "instances_per_class": totals["instances_per_class"],
    }
    estimate = dry.estimate
    assert estimate.image_requests == totals["samples"] == estimate.images_sampled  # all 8 HEADed
    image_bytes = sum(
        (fake_bucket / "open-images-dataset" / "validation" / f"{i}.jpg").stat().st_size
        for i in csv_rows(fake_bucket, "validation")
    )
    assert estimate.image_bytes == image_bytes
    # The mask spans exactly as the shard jobs asked for them.
    assert (estimate.mask_requests, estimate.mask_bytes) == (
        len(member_gets),
        sum(e[4] for e in member_gets),
    )
    assert estimate.mask_bytes > 0


def test_dry_run_on_the_command_line_prints_counts(s3_env, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(shard_args("validation", out, "--dry-run", "--cache", str(tmp_path / "c"))) == 0
    printed = capsys.readouterr().out
    assert "dry run, validation" in printed and "Person" in printed and "nothing fetched" in printed
    assert not out.exists()


def _ids(fake_bucket: Path) -> list[str]:
    return sorted(csv_rows(fake_bucket, "validation"))[:3]


@pytest.mark.parametrize("form", ["txt", "csv", "json-objects", "json-strings"])
def test_image_ids_in_each_file_form(form, fake_bucket, tmp_path):
    ids = _ids(fake_bucket)
    path = tmp_path / f"ids.{form.split('-')[0]}"
    if form == "txt":
        path.write_text("# wanted\n" + "\n".join([ids[0], f"validation/{ids[1]}", ids[2]]) + "\n\n")
    elif form == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Subset", "ImageID"])
            writer.writerows([["validation", i] for i in ids])
    elif form == "json-objects":
        path.write_text(json.dumps([{"ImageID": i, "note": "x"} for i in ids]))
    else:
        path.write_text(json.dumps(ids))
    assert read_image_ids(str(path), None, "validation") == set(ids)
    if form == "txt":  # a split prefix counts only for its split
        assert read_image_ids(str(path), None, "train") == {ids[0], ids[2]}


@pytest.mark.parametrize(
    ("content", "words"),
    [("0123456789abcdeX\n", "not an ImageID"), ('{"x": 1}', "ImageID"), ("a,b\n1,2\n", "column")],
)
def test_bad_image_id_files_give_one_line(content, words, s3_env, tmp_path, capsys):
    path = tmp_path / "ids.txt"
    path.write_text(content)
    assert main(shard_args("validation", tmp_path / "x", "--image-ids", str(path))) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
    assert not (tmp_path / "x").exists()


def test_image_ids_limit_the_selection(s3_env, fake_bucket, tmp_path):
    ids = _ids(fake_bucket)
    path = tmp_path / "ids.csv"
    path.write_text("ImageID\n" + "\n".join([*ids, "ffffffffffffffff"]) + "\n")
    out = tmp_path / "out"
    assert main(shard_args("validation", out, "--image-ids", str(path))) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    written = set()
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            written |= {m.name.split(".")[0] for m in tar.getmembers()}
    assert written == set(ids) and manifest["totals"]["samples"] == 3
    assert manifest["selection"]["image_ids"]["count"] == 4


def test_classes_file_and_a_warning_for_a_class_without_images(s3_env, tmp_path, capsys):
    path = tmp_path / "classes.txt"
    path.write_text("# mine\nPerson\n/m/0k4j\n\nBird\n")
    out = tmp_path / "out"
    args = shard_args("validation", out)
    args[args.index("--classes") : args.index("--split")] = ["--classes-file", str(path)]
    assert main(args) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "Bird" in warnings[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == ["background", "Person", "Car", "Bird"]
    assert manifest["totals"]["images_per_class"]["Bird"] == 0
    assert manifest["totals"]["images_per_class"]["Person"] > 0
    assert "Bird 0 (0)" in captured.out  # images (instances) per class in the summary


def test_two_splits_in_one_command_equal_two_runs(s3_env, tmp_path):
    both = tmp_path / "both"
    reports = run_splits(_options(tmp_path, str(both), split=["validation", "test"]))
    assert [r.split for r in reports] == ["validation", "test"]
    for split in ("validation", "test"):
        alone = tmp_path / f"alone-{split}"
        run_shard(_options(tmp_path, str(alone), split=split))
        assert folder_bytes(both / split) == folder_bytes(alone)
        assert (both / split / "_progress" / "plan.json").read_bytes() == (
            alone / "_progress" / "plan.json"
        ).read_bytes()


def test_no_metadata_file_is_read_twice_in_one_command(proxied, tmp_path):
    """Two splits with evaluation annotations and --expand-hierarchy, no cache folder: the
    hierarchy and the class lists are wanted by several steps, each read once; no whole file
    is asked for twice (the zips are read by ranges, each range once)."""
    options = _options(tmp_path, str(tmp_path / "both"), split=["validation", "test"])
    options = dataclasses.replace(options, cache=None, expand_hierarchy=True)
    reports = run_splits(options)
    assert all(r.manifest["totals"]["samples"] > 0 for r in reports)
    asked = [(e[1], e[2]) for e in _get_log(proxied, "/openimages/")]  # (path, range)
    assert len(asked) == len(set(asked)), sorted(a for a in asked if asked.count(a) > 1)
    whole = [path for path, _ in asked if not path.endswith(".zip")]
    assert "/openimages/2018_04/bbox_labels_600_hierarchy.json" in whole
    heads = [e[1] for e in proxied.stats.log if e[0] == "HEAD" and not e[1].endswith(".zip")]
    assert len(heads) == len(set(heads)), heads


def test_a_run_rejected_before_fetching_leaves_out_untouched(s3_env, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(shard_args("validation", out, "--executor", "dask")) == 1
    assert "--scheduler" in capsys.readouterr().err
    assert not out.exists()
    # ...and the corrected command is not refused.
    assert main(shard_args("validation", out)) == 0


def test_every_unknown_class_is_reported(s3_env, tmp_path, capsys):
    args = shard_args("validation", tmp_path / "x")
    args[args.index("Person")] = "Persn"
    args[args.index("Car")] = "Carr"
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'Persn'" in err and "'Carr'" in err and "Person" in err and "Car" in err


def test_classes_suggests_as_shard_does_and_counts(s3_env, fake_bucket, capsys, monkeypatch):
    monkeypatch.setenv("OISTREAM_METADATA", "s3://openimages")  # no --metadata needed
    assert main(["classes", "Persn"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "closest: Person" in err
    assert main(["classes", "traffic", "--counts", "--split", "validation"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [r for rs in csv_rows(fake_bucket, "validation").values() for r in rs]
    for line in lines[1:]:
        mid, _, images, instances = line.split("\t")
        mine = [r for r in rows if r["LabelName"] == mid]
        assert int(instances) == len(mine) and int(images) == len({r["ImageID"] for r in mine})
    assert len(lines) == 3
    assert main(["classes", "--counts"]) == 1
    assert "--split" in capsys.readouterr().err


def test_plain_oistream_lists_the_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("classes", "shard", "inspect", "show", "export", "train", "fake-bucket"):
        assert command in out


@pytest.mark.parametrize(
    "command", [["shard"], ["classes"], ["inspect"], ["show"], ["export", "coco"], ["fake-bucket"]]
)
def test_every_help_shows_an_example_and_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "example:" in text and f"oistream {' '.join(command)}" in text
    if command == ["shard"]:
        for default in ("default: 1000", "default: 0", "default: local", "default: 256"):
            assert default in text
        assert "CPUs" in text and "$XDG_CACHE_HOME/oistream" in text
        assert "OISTREAM_METADATA" in text and "OISTREAM_IMAGES" in text


def test_an_unwritable_cache_folder_named_is_refused_the_default_one_skipped(
    s3_env, tmp_path, monkeypatch, capsys
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "out"
    assert main(shard_args("validation", out, "--cache", str(blocker / "cache"))) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a writable folder" in err
    assert not out.exists()
    # The default folder ($XDG_CACHE_HOME/oistream) unwritable: a warning, and a run without it.
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    report = run_shard(_options(tmp_path, str(out), cache=DEFAULT_CACHE))
    assert "not writable" in capsys.readouterr().err
    assert report.manifest["failures"] == [] and report.catalog_bytes > 0
    run_shard(_options(tmp_path, str(tmp_path / "ref"), cache=None))  # --no-cache
    assert folder_bytes(out) == folder_bytes(tmp_path / "ref")


class _RecordingFilesystem:
    """Answers ``info`` as told and records what ``open`` was asked."""

    protocol = ("s3", "s3a")

    def __init__(self, info: dict) -> None:
        self._info = info
        self.opened: list[dict] = []

    def info(self, path: str) -> dict:
        return dict(self._info)

    def open(self, path: str, mode: str, **kwargs) -> io.BytesIO:
        self.opened.append(kwargs)
        return io.BytesIO(b"a,b\n")


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({"size": 4, "ETag": '"e"'}, {"size": 4}),  # cached on the way
        ({"size": 4}, {"size": 4}),  # nothing to validate against: not cached
        ({"size": None, "ETag": '"e"'}, {}),  # no size: the file finds it itself
    ],
)
def test_a_fetched_entry_is_opened_with_the_size_its_head_gave(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, info: dict, expected: dict
) -> None:
    fs = _RecordingFilesystem(info)
    monkeypatch.setattr("oistream.sources.filesystem", lambda url, options: (fs, "b/key"))
    with MetadataCache(str(tmp_path)).open("s3://b/key", {}) as file:
        assert file.read() == b"a,b\n"
    assert fs.opened == [expected]


def test_a_csv_over_http_is_one_streamed_get_of_exactly_its_bytes(tmp_path: Path) -> None:
    """fsspec's random-access HTTP file read the CSV in ranges one after another, fetching
    blocks twice (9 GETs, 1.57x the bytes for 64.7 MB); it is one streamed GET now, with no
    HEAD before it (nothing is cached to validate), and the second run reads the cached copy
    after one HEAD."""
    from oistream.sharding import catalog
    from oistream.testing.hostileserver import HostileServer

    rows = [catalog.HEADER]
    for i in range(90_000):  # ~11 MB: more than fsspec's 5 MB block and the 8 MiB read blocks
        image = f"{i:016x}"
        label = "/m/01g317" if i % 7 == 0 else "/m/0k4j"
        rows.append(f"{image}_m01g317_{i:08x}.png,{image},{label},{i:08x},0.1,0.9,0.2,0.8,0.7,")
    data = ("\n".join(rows) + "\n").encode()
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "rows.csv").write_bytes(data)
    cache = MetadataCache(str(tmp_path / "cache"))
    with HostileServer(tmp_path / "meta") as server:
        url = f"{server.url}/rows.csv"
        tables = []
        for _ in range(2):
            tables.append(
                catalog.read_segmentations(
                    url, ["/m/01g317"], {}, opener=lambda: cache.open(url, {})
                )
            )
        log = server.stats.log
    gets = [entry for entry in log if entry[0] == "GET"]
    assert len(gets) == 1 and gets[0][2] is None  # one GET, no Range
    assert server.stats.bytes_by_path["/rows.csv"] == len(data)
    heads = [i for i, entry in enumerate(log) if entry[0] == "HEAD"]
    assert len(heads) == 1 and heads[0] > log.index(gets[0])  # the second run's check only
    assert len(tables[0].rows) == len(tables[1].rows) == len(range(0, 90_000, 7))


def test_a_whole_file_over_http_survives_failures_resets_and_cut_bodies(s3, fake_bucket, tmp_path):
    """fsspec's HTTP filesystem retries nothing; the metadata cache's HTTP reads do: a 503 or
    a dropped connection is tried again, a body cut short is read on from where it stopped (a
    ranged GET pinned to the first answer's ETag), and what arrives is the file, byte for byte."""
    import collections

    expected = (fake_bucket / "openimages" / CSV_KEY).read_bytes()
    faults: collections.Counter[str] = collections.Counter()
    resumed: list[tuple] = []
    # Which requests meet which fault depends on where cut bodies end, so reads go on until
    # each kind has been met. At most 3 faults per request: 8 in a row (giving up) cannot be.
    for run in range(20):
        with FaultProxy(
            s3.endpoint_url,
            fail_rate=0.25,
            reset_rate=0.15,
            truncate_rate=0.2,
            seed=run,
            max_faults_per_request=3,
            keep_log=True,
        ) as proxy:
            url = f"{proxy.endpoint_url}/openimages/{CSV_KEY}"
            with MetadataCache(str(tmp_path / f"cache{run}")).open(url, {}) as file:
                assert file.read() == expected
            faults.update(proxy.stats.faults)
            resumed += [entry for entry in proxy.stats.log if entry[0] == "GET" and entry[2]]
        if faults["fail"] and faults["reset"] and faults["truncate"] and resumed:
            break
    assert faults["fail"] and faults["reset"] and faults["truncate"], faults
    assert resumed and all(entry[2].startswith("bytes=") for entry in resumed)


def test_a_resumed_read_answered_with_the_whole_object_fails_and_caches_nothing(tmp_path):
    """A server that ignores Range answers the resumed GET with the object from its start:
    appending that would corrupt the file, so the read fails (and no cache entry is made).
    Where a cut body ends depends on timing: reads go on until one was cut after its start."""
    from oistream.testing.hostileserver import HostileServer

    (tmp_path / "meta").mkdir()
    data = bytes(range(256)) * 4096  # 1 MiB
    (tmp_path / "meta" / "rows.csv").write_bytes(data)
    refused = None
    with HostileServer(tmp_path / "meta", misbehave={"/rows.csv": "ignore_range"}) as server:
        for seed in range(20):
            cache_dir = tmp_path / f"cache{seed}"
            with FaultProxy(server.url, truncate_rate=0.5, seed=seed) as proxy:
                url = f"{proxy.endpoint_url}/rows.csv"
                try:
                    with MetadataCache(str(cache_dir)).open(url, {}) as file:
                        assert file.read() == data  # never resumed past its start
                except Exception as error:  # an AssertionError above fails the check below
                    refused = error
                    break
    assert refused is not None and "to resume" in str(refused), refused
    assert not [p for p in cache_dir.rglob("*") if p.is_file()]


def test_the_csv_is_opened_while_the_class_lists_are_read(s3, s3_env, tmp_path, monkeypatch):
    """The CSV's request needs nothing from the class lists: 200 ms away, it starts before the
    class list's GET has ended, not after it."""
    with FaultProxy(s3.endpoint_url, latency=0.2) as proxy:
        monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", proxy.endpoint_url)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        proxy.reset_stats(
            kinds=[
                ("csv", f"GET /openimages/{CSV_KEY}".encode()),
                ("classes", b"GET /openimages/v5/classes-segmentation.txt"),
            ]
        )
        run_shard(_options(tmp_path, str(tmp_path / "out"), dry_run=True))
        stats = proxy.stats
    assert stats.first_start_by_kind["csv"] < stats.last_end_by_kind["classes"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_summary_counts_requests_and_retries_as_the_server_saw_them_under_faults(
    s3, s3_env, tmp_path, monkeypatch, seed
):
    """Failed, reset and cut-short requests are requests too, and each is retried once: the
    summary's counts equal the server's on a first run and on a second (cache validation by
    HEAD). At most two faults per request, so nothing gives up and every fault is a retry."""
    with FaultProxy(
        s3.endpoint_url,
        fail_rate=0.1,
        reset_rate=0.05,
        truncate_rate=0.05,
        seed=seed,
        max_faults_per_request=2,
    ) as proxy:
        monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", proxy.endpoint_url)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        for out in ("a", "b"):
            proxy.reset_stats()
            report = run_shard(_options(tmp_path, str(tmp_path / out)))
            assert report.errors == []
            assert report.requests == proxy.stats.requests
            assert report.retries == sum(proxy.stats.faults.values())
        assert proxy.stats.faults  # these seeds meet faults in the second run too
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
