"""`oistream shard` against a server that lies, stalls and serves damaged zips (issue 11).

Each case asserts the exit code, the manifest's samples and failures against a clean run of
the same selection, and the bytes the server sent; memory cases run in a child process under
an address-space limit so that a regression fails fast instead of swapping.
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oistream.cli import main
from oistream.testing.hostile import (
    BOMB_KINDS,
    damaged_zips,
    manifest,
    offset_past_end,
    run_child,
    selected_images,
    shard_argv,
    with_bomb,
    zip_url_path,
)
from oistream.testing.hostileserver import HostileServer


@pytest.fixture(scope="module")
def clean(fake_bucket: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A clean run's manifest and the bytes the server sent for it."""
    out = tmp_path_factory.mktemp("clean") / "out"
    with HostileServer(fake_bucket) as server:
        assert main(shard_argv(server.url, out)) == 0
        sent = server.stats.bytes_sent
    return {"manifest": manifest(out), "bytes": sent}


@pytest.fixture(scope="module")
def victim(fake_bucket: Path) -> str:
    """The zip prefix holding the masks of the most selected images."""
    prefixes = list(selected_images(fake_bucket).values())
    return max(sorted(set(prefixes)), key=prefixes.count)


def zip_bytes(bucket: Path, prefix: str) -> bytes:
    return (bucket / zip_url_path(prefix).lstrip("/")).read_bytes()


def images_of(bucket: Path, prefix: str) -> set[str]:
    return {i for i, p in selected_images(bucket).items() if p == prefix}


def sample_ids(m: dict, out: Path) -> set[str]:
    import tarfile

    ids = set()
    for shard in m["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            ids |= {n.split(".")[0] for n in tar.getnames()}
    return ids


@pytest.mark.parametrize("case", list(damaged_zips(b"PK\x05\x06" + bytes(18))))
def test_a_zip_that_is_not_a_zip_fails_only_its_images(
    fake_bucket, tmp_path, clean, victim, case, capsys
):
    bad = damaged_zips(zip_bytes(fake_bucket, victim))[case]
    out = tmp_path / "out"
    with HostileServer(fake_bucket, overrides={zip_url_path(victim): bad}) as server:
        assert main(shard_argv(server.url, out)) == 0
        sent = server.stats
    m = manifest(out)
    lost = images_of(fake_bucket, victim)
    assert {f["image_id"] for f in m["failures"]} == lost
    assert all(f"train-masks-{victim}.zip is unreadable" in f["reason"] for f in m["failures"])
    assert m["totals"]["samples"] == clean["manifest"]["totals"]["samples"] - len(lost)
    assert sent.bytes_sent <= 1.10 * clean["bytes"]
    # The failure is permanent and baked in: a rerun finds every shard complete.
    with HostileServer(fake_bucket, overrides={zip_url_path(victim): bad}) as server:
        assert main(shard_argv(server.url, out)) == 0
        assert server.stats.gets_by_path.get(zip_url_path(victim), 0) == 0


def test_a_member_placed_past_the_end_fails_its_image_without_a_request(
    fake_bucket, tmp_path, clean, victim
):
    bad, member = offset_past_end(zip_bytes(fake_bucket, victim))
    out = tmp_path / "out"
    with HostileServer(fake_bucket, overrides={zip_url_path(victim): bad}) as server:
        assert main(shard_argv(server.url, out)) == 0
        log = server.stats.log
    m = manifest(out)
    assert [f["image_id"] for f in m["failures"]] == [member.split("_")[0]]
    assert "lies outside the zip" in m["failures"][0]["reason"]
    assert m["totals"]["samples"] == clean["manifest"]["totals"]["samples"] - 1
    ranges = [r for method, path, r, _, _ in log if path == zip_url_path(victim) and r]
    # Every range inside the zip: a suffix range (its tail, "bytes=-N") is by its nature.
    assert all(r.startswith("bytes=-") or int(r.split("-")[1]) < len(bad) for r in ranges)


@pytest.mark.parametrize("kind", BOMB_KINDS)
def test_a_zip_bomb_fails_its_image_in_bounded_memory(fake_bucket, tmp_path, clean, victim, kind):
    # 512 MiB of zeros deflate to 0.5 MB; the child may not map more than 1.5 GB in all, so
    # inflating the bomb whole (as main did, trusting the declared size) would fail the run.
    bad, member = with_bomb(zip_bytes(fake_bucket, victim), 512 << 20, kind)
    out = tmp_path / "out"
    with HostileServer(fake_bucket, overrides={zip_url_path(victim): bad}) as server:
        child = run_child(shard_argv(server.url, out), address_space=1_500 << 20)
    assert child.returncode == 0, child.stderr
    m = manifest(out)
    assert [f["image_id"] for f in m["failures"]] == [member.split("_")[0]]
    reason = m["failures"][0]["reason"]
    expected = {
        "declared": "over the cap",  # decided from the directory: no request for it
        "small_lie": "cannot inflate to",  # likewise: more compressed bytes than declared
        "plausible_lie": "decompressed to",  # inflated, bounded by the declared size
    }
    assert expected[kind] in reason
    assert m["totals"]["samples"] == clean["manifest"]["totals"]["samples"] - 1
    assert child.peak_rss_bytes < 1 << 30


@pytest.mark.parametrize("behaviour", ["ignore_range", "wrong_range", "fail", "stall"])
def test_a_misbehaving_zip_server_leaves_shards_for_a_rerun(
    fake_bucket, tmp_path, clean, victim, behaviour, capsys
):
    out = tmp_path / "out"
    path = zip_url_path(victim)
    options = ["--read-timeout", "0.3", "--attempt-timeout", "5"]
    with HostileServer(fake_bucket, misbehave={path: behaviour}) as server:
        assert main(shard_argv(server.url, out, *options)) == 1
        stats = server.stats
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "rerun the same command" in error
    assert manifest(out) is None
    # Nothing of that zip's images was baked as a failure into a complete shard.
    for record in (out / "_progress").glob("train-*.json"):
        failures = json.loads(record.read_text())["failures"]
        assert not {f["image_id"] for f in failures} & images_of(fake_bucket, victim)
    assert stats.bytes_sent <= 1.10 * clean["bytes"]
    if behaviour in ("ignore_range", "wrong_range"):
        assert stats.gets_by_path[path] == 1  # refused at once, not retried
    else:  # every attempt made, each cut short: the tail's GET fails, or stalls
        assert len([e for e in stats.log if e[:2] == ("GET", path)]) == 8
    with HostileServer(fake_bucket) as server:
        assert main(shard_argv(server.url, out)) == 0
    assert manifest(out)["totals"] == clean["manifest"]["totals"]


@pytest.mark.timeout(120)  # the server stalls for 600 s: a run that waits on it fails here
@pytest.mark.parametrize(
    "path",
    ["/openimages/v5/train-annotations-object-segmentation.csv", "/openimages/v5/*classes*"],
)
def test_a_stalled_metadata_body_is_read_on_from_where_it_stopped(
    fake_bucket, tmp_path, path, clean
):
    """The CSV or class list stops mid-body (half of every answer, then nothing): each stall
    costs ``--read-timeout``, then the read goes on from the first byte it lacks, by a ranged
    GET, and the run ends complete instead of hanging or starting the file again."""
    out = tmp_path / "out"
    options = ["--read-timeout", "0.3", "--no-cache"]
    with HostileServer(fake_bucket, misbehave={path: "stall"}) as server:
        assert main(shard_argv(server.url, out, *options)) == 0
        stalled = [e for e in server.stats.log if fnmatch.fnmatchcase(e[1], path)]
    resumed = [e for e in stalled if e[0] == "GET" and e[2]]
    assert resumed and all(e[2].startswith("bytes=") and e[2].endswith("-") for e in resumed)
    assert manifest(out)["totals"] == clean["manifest"]["totals"]


def test_a_metadata_server_failing_every_request_ends_the_run_in_one_line(
    fake_bucket, tmp_path, capsys
):
    """503 for every request of the class list: tried as often as the fetcher tries a member,
    then one line and exit 1, nothing written."""
    out = tmp_path / "out"
    path = "/openimages/v5/classes-segmentation.txt"
    with HostileServer(fake_bucket, misbehave={path: "fail"}) as server:
        assert main(shard_argv(server.url, out, "--no-cache")) == 1
        asked = [e for e in server.stats.log if e[1] == path]
    assert len(asked) >= 8
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert "cannot read" in error and "rerun" in error, error
    assert not out.exists() or not list(out.glob("*.tar"))


@pytest.mark.timeout(120)  # a HEAD is answered after 600 s: a run that waits fails here
def test_an_images_server_that_never_answers_a_head_serves_the_run(fake_bucket, tmp_path, clean):
    """The parent's reachability check asks for an image's first byte by GET, as the shard
    jobs ask for images: a server (or a proxy before it) that leaves HEADs unanswered costs
    the run nothing. It used to HEAD, and fsspec waited out the read time-out, then GOT."""
    out = tmp_path / "out"
    with HostileServer(fake_bucket, misbehave={"/open-images-dataset/*": "stall_head"}) as server:
        assert main(shard_argv(server.url, out, "--read-timeout", "0.5")) == 0
        images = [e for e in server.stats.log if "open-images" in e[1]]
    assert images and not [e for e in images if e[0] == "HEAD"]
    assert [e[2] for e in images].count("bytes=0-0") == 1  # the check, once
    assert manifest(out)["totals"] == clean["manifest"]["totals"]


def test_range_ignored_on_a_big_zip_is_abandoned_after_the_headers(fake_bucket, tmp_path, victim):
    # Pad the zip with 32 MB in front of its members (a real train zip is 2 GB): a fetcher
    # that read the whole answer before checking it would pull all of it.
    original = zip_bytes(fake_bucket, victim)
    padding = os.urandom(32 << 20)
    padded = padding + original  # a zip with data before it: offsets shift, zipfile agrees
    out = tmp_path / "out"
    path = zip_url_path(victim)
    with HostileServer(
        fake_bucket, overrides={path: padded}, misbehave={path: "ignore_range"}
    ) as server:
        assert main(shard_argv(server.url, out)) == 1
        sent = server.stats.bytes_by_path[path]
    assert sent < len(padded) // 4


def test_an_object_replaced_mid_run_is_transient_not_corrupt(fake_bucket, tmp_path, clean, victim):
    import io
    import zipfile

    original = zip_bytes(fake_bucket, victim)
    # The same members in another order: a valid zip with other offsets and another ETag.
    with zipfile.ZipFile(io.BytesIO(original)) as source:
        members = [(i.filename, source.read(i)) for i in source.infolist()]
    replaced = io.BytesIO()
    with zipfile.ZipFile(replaced, "w") as target:
        for name, data in reversed(members):
            target.writestr(name, data)
    path = zip_url_path(victim)
    out = tmp_path / "out"
    # The directory read is one GET (the tail holds it); every later GET sees the new zip.
    with HostileServer(fake_bucket, replace_after={path: (1, replaced.getvalue())}) as server:
        assert main(shard_argv(server.url, out)) == 1
    assert manifest(out) is None
    for record in (out / "_progress").glob("train-*.json"):
        assert "corrupt" not in record.read_text()
    with HostileServer(fake_bucket, overrides={path: replaced.getvalue()}) as server:
        assert main(shard_argv(server.url, out)) == 0
    assert manifest(out)["totals"] == clean["manifest"]["totals"]


def test_a_redirect_to_another_host_is_not_followed(fake_bucket, tmp_path, victim, capsys):
    path = zip_url_path(victim)
    out = tmp_path / "out"
    with HostileServer(fake_bucket, misbehave={path: "redirect_elsewhere"}) as server:
        assert main(shard_argv(server.url, out)) == 1
        log = server.stats.log
    assert not [entry for entry in log if entry[4].startswith("localhost")]
    assert "redirect to another host" in capsys.readouterr().err


def test_an_unwritable_zip_index_cache_is_refused_at_start(fake_bucket, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "out"
    with HostileServer(fake_bucket) as server:
        argv = shard_argv(server.url, out, "--zip-index-cache", str(blocker / "cache"))
        assert main(argv) == 1
        assert server.stats.requests == 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--zip-index-cache" in error[0]
    assert not out.exists()


# --- the output folder ------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "name", ["train-000000.tar", "manifest.json", ".train-000000.tar.4242.partial", "notes.txt"]
)
def test_an_out_holding_foreign_files_is_refused_untouched(fake_bucket, tmp_path, name, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"somebody else's work")
    before = snapshot(out)
    with HostileServer(fake_bucket) as server:
        assert main(shard_argv(server.url, out)) == 1
        assert main(shard_argv(server.url, out, "--overwrite")) == 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "did not write" in error[0] and name in error[0]
    after = snapshot(out)
    if name == "notes.txt":  # not one of our names: --overwrite leaves it alone
        assert after[name] == before[name]


def test_a_second_run_is_kept_off_by_the_lease_and_deletes_nothing(fake_bucket, tmp_path, capsys):
    out = tmp_path / "out"
    with HostileServer(fake_bucket) as server:
        assert main(shard_argv(server.url, out)) == 0
        # A first run still at work: its lease (a live process on this host) and a partial.
        lease = {"host": socket.gethostname(), "pid": os.getppid(), "started": "now", "run": "x"}
        (out / "_progress" / "lease.json").write_text(json.dumps(lease))
        (out / ".train-000001.tar.999999.partial").write_bytes(b"half a shard")
        (out / "train-000001.tar").unlink()
        before = snapshot(out)
        assert main(shard_argv(server.url, out)) == 1
        assert snapshot(out) == before
        assert "in use by another run" in capsys.readouterr().err
        # Once that process is gone its lease is stale: the next run takes over and finishes.
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        lease["pid"] = dead.pid
        (out / "_progress" / "lease.json").write_text(json.dumps(lease))
        assert main(shard_argv(server.url, out)) == 0
    assert not (out / ".train-000001.tar.999999.partial").exists()
    assert not (out / "_progress" / "lease.json").exists()
    assert (out / "train-000001.tar").exists()


def test_a_rerun_on_another_machine_takes_over_a_silent_lease(fake_bucket, tmp_path, capsys):
    """A spot machine preempted mid-run leaves its lease; 16 minutes unrenewed, a rerun on
    another host takes over, says so in one warning, and finishes the same shards."""
    out = tmp_path / "out"
    with HostileServer(fake_bucket) as server:
        assert main(shard_argv(server.url, out)) == 0
        (out / "train-000001.tar").unlink()
        then = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 16 * 60))
        lease = {"host": "spot-7", "pid": 4242, "started": then, "renewed": then, "run": "x"}
        (out / "_progress" / "lease.json").write_text(json.dumps(lease))
        capsys.readouterr()
        assert main(shard_argv(server.url, out)) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "host spot-7 (pid 4242)" in warnings[0], warnings
    assert not (out / "_progress" / "lease.json").exists()
    assert (out / "train-000001.tar").exists()


def test_a_complete_shard_replaced_by_garbage_is_rebuilt(fake_bucket, tmp_path):
    import hashlib

    out = tmp_path / "out"
    with HostileServer(fake_bucket) as server:
        assert main(shard_argv(server.url, out)) == 0
        good = (out / "train-000000.tar").read_bytes()
        (out / "train-000000.tar").write_bytes(b"\0" * len(good))  # same size, other bytes
        assert main(shard_argv(server.url, out)) == 0
    assert (out / "train-000000.tar").read_bytes() == good
    for shard in manifest(out)["shards"]:
        assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]


def test_a_broken_progress_record_is_named(fake_bucket, tmp_path, capsys):
    out = tmp_path / "out"
    with HostileServer(fake_bucket) as server:
        assert main(shard_argv(server.url, out)) == 0
        (out / "_progress" / "train-000000.tar.json").write_text('{"stats": ')
        assert main(shard_argv(server.url, out)) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "_progress/train-000000.tar.json" in error[0]
    assert "unexpected" not in error[0]


def test_one_shard_built_here_records_the_same_failures_as_shards_built_apart(
    fake_bucket, tmp_path, victim
):
    """A selection in one shard, built in this process, fetches its images beside the zips'
    directories: a zip that is not a zip and an image that is not a JPEG still fail exactly the
    images they failed when the same selection was cut into shards of four."""
    images = selected_images(fake_bucket)
    not_a_jpeg = sorted(i for i in images if i[0] != victim)[0]
    overrides = {
        zip_url_path(victim): b"<html>not a zip</html>",
        f"/open-images-dataset/train/{not_a_jpeg}.jpg": b"not a jpeg",
    }
    with HostileServer(fake_bucket, overrides=overrides) as server:
        assert main(shard_argv(server.url, tmp_path / "apart")) == 0
        assert main(shard_argv(server.url, tmp_path / "one", "--samples-per-shard", "1000")) == 0
    apart, one = manifest(tmp_path / "apart"), manifest(tmp_path / "one")
    assert len(one["shards"]) == 1 < len(apart["shards"])

    def failed(m: dict) -> dict[str, str]:
        return {f["image_id"]: f["reason"] for f in m["failures"]}

    assert failed(one) == failed(apart)
    assert not_a_jpeg in failed(one) and any(i[0] == victim for i in failed(one))
    assert one["totals"]["samples"] == apart["totals"]["samples"]
