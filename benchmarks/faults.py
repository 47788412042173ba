"""Every hostile case of issue 11, run for real, against a clean run of the same selection.

A fake bucket (``--images`` train images) is served by ``oistream.testing.hostileserver`` on
loopback; each case changes one thing (a damaged zip, a lying server, a crafted CSV row, a
foreign file in ``--out``, a pixel bomb in a shard) and runs `oistream shard` (or a pass of the
loader) in a child process, timed, its peak RSS taken from the child itself. The server, not
our code, counts the body bytes it sent. Cases the run must leave for a rerun (transient
failures) are rerun against the honest server, and the images are counted after that rerun.

Printed per case: exit code (of the hostile run; the rerun's after a slash), images sharded /
images expected (a clean run's, less the images the hostile input ruins), bytes sent / bytes
of the clean run, peak RSS, seconds, and the marks:

* every run ends within its time-out (``--timeout``);
* no case loses an image a clean run keeps, other than the hostile one;
* bytes sent <= 1.10 x the clean run's;
* peak RSS < 1 GB for the shard command, < 2 GB for the loader.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/faults.py [--images 48] [--bomb-mib 1024]``
(about three minutes here). Timings are under whatever load the machine has: the load average
is printed beside them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from oistream.testing.fakebucket import make_fake_bucket
from oistream.testing.hostile import (
    BOMB_KINDS,
    crafted_clicks,
    damaged_zips,
    manifest,
    offset_past_end,
    person_row,
    run_child,
    segmentation_csv_path,
    selected_images,
    shard_argv,
    with_bomb,
    zip_url_path,
)
from oistream.testing.hostileserver import HostileServer

SHARD_RSS_MARK = 1 << 30
LOADER_RSS_MARK = 2 << 30
BYTES_MARK = 1.10


@dataclass
class Row:
    case: str
    exit: str
    images: int
    expected: int
    sent: int
    baseline: int  # bytes the mark allows 1.10 x of: the clean run's, plus added input
    peak_rss: int
    seconds: float
    timed_out: bool
    loader: bool = False


@dataclass
class Setup:
    """What a case changes: server behaviour, extra arguments, the out folder before the run."""

    overrides: dict[str, bytes] | None = None
    misbehave: dict[str, str] | None = None
    replace_after: dict[str, tuple[int, bytes]] | None = None
    extra: tuple[str, ...] = ()
    prepare: Callable[[Path], None] | None = None
    lost: int = 0  # images the hostile input ruins for good
    rerun: bool = False  # a transient case: rerun on the honest server, count after it
    rerun_overrides: dict[str, bytes] | None = None
    # Bytes the hostile input adds that any reader must read (rows appended to the CSV): the
    # bytes mark compares against the clean run's bytes plus these.
    added_input: int = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="train images in the fake bucket")
    parser.add_argument("--image-size", type=int, default=240, help="long side in pixels")
    parser.add_argument("--bomb-mib", type=int, default=1024, help="a zip bomb's inflated MiB")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    parser.add_argument("--workdir", help="keep the bucket and outputs here (default: a temp dir)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="oistream-faults-"))
    bucket = work / "bucket"
    if not (bucket / "openimages").exists():
        make_fake_bucket(bucket, images=args.images, seed=0, image_size=args.image_size)
    images = selected_images(bucket)
    prefixes = list(images.values())
    victim = max(sorted(set(prefixes)), key=prefixes.count)
    zip_path = zip_url_path(victim)
    original_zip = (bucket / zip_path.lstrip("/")).read_bytes()
    csv_path = segmentation_csv_path()
    original_csv = (bucket / csv_path.lstrip("/")).read_bytes()
    rows: list[Row] = []

    def run_case(name: str, setup: Setup) -> Row:
        out = work / "out" / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if setup.prepare is not None:
            setup.prepare(out)
        with HostileServer(
            bucket,
            overrides=setup.overrides,
            misbehave=setup.misbehave,
            replace_after=setup.replace_after,
        ) as server:
            argv = shard_argv(server.url, out, "--read-timeout", "1", *setup.extra)
            child = run_child(argv, timeout=args.timeout)
            sent = server.stats.bytes_sent
        exit_text = "timeout" if child.returncode is None else str(child.returncode)
        seconds, peak, timed_out = child.seconds, child.peak_rss_bytes, child.returncode is None
        if setup.rerun:
            with HostileServer(bucket, overrides=setup.rerun_overrides) as server:
                again = run_child(shard_argv(server.url, out), timeout=args.timeout)
            exit_text += f"/{again.returncode}"
            timed_out |= again.returncode is None
            peak = max(peak, again.peak_rss_bytes)
        m = manifest(out)
        done = m["totals"]["samples"] if m else 0
        return Row(
            name,
            exit_text,
            done,
            expected - setup.lost,
            sent,
            clean_bytes + setup.added_input,
            peak,
            seconds,
            timed_out,
        )

    # The clean run: what every other case is measured against.
    expected = clean_bytes = 0
    clean = run_case("clean", Setup())
    expected = clean.images
    clean_bytes = clean.baseline = clean.sent
    clean.expected = expected
    rows.append(clean)

    victim_images = sum(1 for p in prefixes if p == victim)
    damaged = damaged_zips(original_zip)
    past_end, past_member = offset_past_end(original_zip)
    reordered = _reordered(original_zip)
    crafted = "\n".join(
        person_row(f"{0xF0 + n:016x}", f"{n:08x}", crafted_clicks(n)) for n in (4, 8, 10, 40)
    )
    huge_clicks = person_row("f" * 16, "0" * 8, "0.5 0.5 1;" * 1_000_000 + "0.5 0.5 1")
    first_rows = original_csv.split(b"\n")[1:9]

    cases: dict[str, Setup] = {
        f"zip: {kind}": Setup(overrides={zip_path: data}, lost=victim_images)
        for kind, data in damaged.items()
    }
    for kind in BOMB_KINDS:
        bomb, _ = with_bomb(original_zip, args.bomb_mib << 20, kind)
        # The other two are decided from the directory, no byte of the member fetched. A bomb
        # whose declared size is plausible is caught only by inflating it, so its compressed
        # bytes (1 MiB for 1 GiB of zeros) must come, twice: a member that fails to inflate is
        # read again before it is called corrupt (remotezip.fetch_members), since a mangled
        # transfer looks the same. Input the clean zip lacks, read twice.
        extra = max(0, len(bomb) - len(original_zip)) if kind == "plausible_lie" else 0
        cases[f"zip bomb {args.bomb_mib} MiB, {kind}"] = Setup(
            overrides={zip_path: bomb}, lost=1, added_input=2 * extra
        )
    cases.update(
        {
            "member offset past the end": Setup(overrides={zip_path: past_end}, lost=1),
            "server ignores Range": Setup(misbehave={zip_path: "ignore_range"}, rerun=True),
            "wrong Content-Range": Setup(misbehave={zip_path: "wrong_range"}, rerun=True),
            "stall mid-body": Setup(misbehave={zip_path: "stall"}, rerun=True),
            "503 on every request": Setup(misbehave={zip_path: "fail"}, rerun=True),
            "redirect to another host": Setup(
                misbehave={zip_path: "redirect_elsewhere"}, rerun=True
            ),
            "zip replaced mid-run": Setup(
                replace_after={zip_path: (1, reordered)},
                rerun=True,
                rerun_overrides={zip_path: reordered},
            ),
            "unwritable --zip-index-cache": Setup(
                extra=("--zip-index-cache", "/proc/oistream-cache"), rerun=True
            ),
            "crafted Clicks rows": Setup(
                overrides={csv_path: original_csv + crafted.encode() + b"\n"},
                added_input=len(crafted) + 1,
            ),
            "10 MB Clicks row": Setup(
                overrides={csv_path: original_csv + huge_clicks.encode() + b"\n"},
                added_input=len(huge_clicks) + 1,
            ),
            "CSV rows repeated 4x": Setup(
                overrides={csv_path: original_csv + b"\n".join(first_rows * 3) + b"\n"},
                added_input=len(b"\n".join(first_rows * 3)) + 1,
            ),
            "foreign file in --out": Setup(
                prepare=lambda out: (out / "train-000000.tar").write_bytes(b"not ours"),
                lost=expected,
            ),
            "--out leased by a live run": Setup(prepare=_live_lease, lost=expected),
            "complete shard replaced": Setup(prepare=None, rerun=False),
        }
    )
    for name, setup in cases.items():
        if name == "complete shard replaced":
            rows.append(_garbage_shard(work, bucket, args.timeout, expected, run_case))
            continue
        rows.append(run_case(name, setup))
        _progress(rows[-1])

    rows += _loader_cases(work, args.timeout)
    _print_table(rows, clean_bytes, args)
    print(f"(fake bucket: {args.images} train images; victim zip {zip_path}; {past_member})")


def _reordered(data: bytes) -> bytes:
    """The same members in reverse order: another valid zip with another ETag."""
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        members = [(i.filename, source.read(i)) for i in source.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for name, member in reversed(members):
            target.writestr(name, member)
    return out.getvalue()


def _live_lease(out: Path) -> None:
    (out / "_progress").mkdir()
    (out / "_progress" / "plan.json").write_text("{}")
    lease = {"host": socket.gethostname(), "pid": os.getpid(), "started": "now", "run": "x"}
    (out / "_progress" / "lease.json").write_text(json.dumps(lease))


def _garbage_shard(work: Path, bucket: Path, timeout: float, expected: int, run_case) -> Row:
    """A clean run, its first shard overwritten with zeros, then a rerun that must rebuild it."""
    import hashlib

    row = run_case("complete shard replaced", Setup())
    out = work / "out" / "complete shard replaced"
    shard = out / "train-000000.tar"
    shard.write_bytes(bytes(shard.stat().st_size))
    with HostileServer(bucket) as server:
        again = run_child(shard_argv(server.url, out), timeout=timeout)
        sent = server.stats.bytes_sent
    m = manifest(out)
    intact = all(
        hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"]
        for s in m["shards"]
    )
    return Row(
        "complete shard replaced" + ("" if intact else " (SHA MISMATCH)"),
        f"{row.exit}/{again.returncode}",
        m["totals"]["samples"],
        expected,
        sent,
        row.baseline,
        max(row.peak_rss, again.peak_rss_bytes),
        again.seconds,
        again.returncode is None,
    )


_LOADER_CHILD = textwrap.dedent(
    """
    import json, sys, time, warnings
    import oistream.loader as loader
    def peak_rss():  # VmHWM: ru_maxrss would carry over the parent's peak through fork
        status = open("/proc/self/status").read()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", loader.ShardWarning)
        samples = sum(1 for _ in loader.ShardDataset(sys.argv[1], shuffle=0, train=False))
    print(json.dumps({"samples": samples, "seconds": time.perf_counter() - started,
                      "peak_rss": peak_rss()}))
    """
)


def _loader_cases(work: Path, timeout: float) -> list[Row]:
    import gzip

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from shardfactory import FakeInstance, random_samples, sample_members, write_shards, write_tar

    def png(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("1", (width, height)).save(buffer, "PNG")
        return buffer.getvalue()

    rows = []
    cases = {}
    good = random_samples(4, seed=7, max_instances=3)
    bomb = random_samples(1, seed=8)[0]
    bomb.key = "b" * 16
    bomb.instances = [FakeInstance(np.zeros((1, 1)), 1, png=png(13_000, 13_000))] * 40
    cases["loader: 40 masks of 13000x13000"] = [*good[:2], bomb, *good[2:]]
    big = random_samples(1, seed=9)[0]
    big.key = "c" * 16
    buffer = io.BytesIO()
    Image.new("RGB", (9_000, 9_000)).save(buffer, "JPEG", quality=50)
    big.jpeg = buffer.getvalue()
    big.instances = [FakeInstance(np.zeros((4, 4)), 1, png=png(4, 4))] * 200
    cases["loader: 9000x9000 JPEG, 200 masks"] = [*good[:2], big, *good[2:]]
    for name, samples in cases.items():
        folder = work / "loader" / name.split(": ")[1].replace(" ", "_")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write_shards(folder, samples, samples_per_shard=len(samples))
        rows.append(_loader_row(name, folder, len(good), timeout))
        _progress(rows[-1])
    folder = work / "loader" / "gzip"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    plain = write_tar(folder / "x.tar", [m for s in good for m in sample_members(s)])
    (folder / "x.tar").unlink()
    (folder / "train-000000.tar").write_bytes(gzip.compress(plain))
    rows.append(_loader_row("loader: gzip tar named .tar", folder, 0, timeout))
    _progress(rows[-1])
    return rows


def _loader_row(name: str, folder: Path, expected: int, timeout: float) -> Row:
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _LOADER_CHILD, str(folder)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return Row(name, "timeout", 0, expected, 0, 0, 0, time.perf_counter() - started, True, True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return Row(name, str(done.returncode), 0, expected, 0, 0, 0, seconds, False, True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Row(
        name, "0", result["samples"], expected, 0, 0, result["peak_rss"], seconds, False, True
    )


def _progress(row: Row) -> None:
    print(f"  ... {row.case}: exit {row.exit} in {row.seconds:.1f} s", file=sys.stderr, flush=True)


def _print_table(rows: list[Row], clean_bytes: int, args: argparse.Namespace) -> None:
    load = os.getloadavg()
    print(
        f"\nhostile cases (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on "
        f"{os.cpu_count()} CPUs; timings under that load)\n"
    )
    # bytes/clean: sent / (the clean run's bytes + input the case adds, e.g. CSV rows)
    header = f"{'case':<38} {'exit':>6} {'images':>9} {'bytes/clean':>12} {'peak RSS':>9} {'s':>6}"
    print(header)
    print("-" * len(header))
    marks = {"time-out": True, "images": True, "bytes": True, "rss": True}
    for row in rows:
        ratio = row.sent / row.baseline if row.baseline and not row.loader else float("nan")
        rss_mark = LOADER_RSS_MARK if row.loader else SHARD_RSS_MARK
        flags = []
        if row.timed_out:
            marks["time-out"] = False
            flags.append("TIMEOUT")
        if row.images < row.expected:
            marks["images"] = False
            flags.append("LOST")
        if not row.loader and ratio > BYTES_MARK:
            marks["bytes"] = False
            flags.append("BYTES")
        if row.peak_rss >= rss_mark:
            marks["rss"] = False
            flags.append("RSS")
        ratio_text = "-" if row.loader else f"{ratio:.3f}"
        print(
            f"{row.case:<38} {row.exit:>6} {f'{row.images}/{row.expected}':>9} "
            f"{ratio_text:>12} {row.peak_rss / 2**20:>7.0f}MB {row.seconds:>6.1f}"
            + (f"  {' '.join(flags)}" if flags else "")
        )
    print(f"\nclean run: {clean_bytes / 1e6:.2f} MB sent by the server")
    print(
        "marks: "
        f"every run within its {args.timeout:.0f} s time-out: {_yes(marks['time-out'])}; "
        f"no image lost beyond the hostile ones: {_yes(marks['images'])}; "
        f"bytes <= {BYTES_MARK:.2f} x clean: {_yes(marks['bytes'])}; "
        f"peak RSS < 1 GB shard / 2 GB loader: {_yes(marks['rss'])}"
    )


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


if __name__ == "__main__":
    main()
