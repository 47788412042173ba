"""Hostile inputs for tests and benchmarks/faults.py: damaged zips, zip bombs, crafted CSV rows,
and `oistream shard` runs in a child process (optionally under an address-space limit).

Every damaged zip is made from a real one of the fake bucket by patching the bytes the
attack is about, so the rest of the zip stays as the writer made it.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from oistream.sharding.remotezip import _CENTRAL_HEADER, _END_RECORD

CLASSES = ["Person", "Car", "Traffic light", "Traffic sign"]
SPLIT = "train"


def zip_url_path(prefix: str, split: str = SPLIT) -> str:
    """The URL path of a mask zip under a server rooted at a fake bucket."""
    return f"/openimages/v5/{split}-masks/{split}-masks-{prefix}.zip"


def end_record_offset(data: bytes) -> int:
    """Where the (last) end of central directory record starts."""
    return data.rfind(zipfile.stringEndArchive)


def _patch_end(data: bytes, **fields: int) -> bytes:
    """The zip with end-record fields replaced (names as in zipfile.structEndArchive)."""
    at = end_record_offset(data)
    names = ["sig", "disk", "cd_disk", "disk_entries", "entries", "cd_size", "cd_offset", "clen"]
    values = dict(zip(names, _END_RECORD.unpack_from(data, at), strict=True))
    values.update(fields)
    record = _END_RECORD.pack(*(values[n] for n in names))
    return data[:at] + record + data[at + _END_RECORD.size :]


def _central_entries(data: bytes) -> list[tuple[int, str]]:
    """(position of the entry, member name) for each central directory entry."""
    at = end_record_offset(data)
    fields = _END_RECORD.unpack_from(data, at)
    position, stop = fields[6], fields[6] + fields[5]
    entries = []
    while position < stop:
        header = _CENTRAL_HEADER.unpack_from(data, position)
        name_length, extra, comment = header[12], header[13], header[14]
        name = data[position + 46 : position + 46 + name_length].decode()
        entries.append((position, name))
        position += 46 + name_length + extra + comment
    return entries


def offset_past_end(data: bytes) -> tuple[bytes, str]:
    """The first member's header offset pointed past the end of the zip; and its name."""
    position, name = _central_entries(data)[0]
    offset_field = position + 42  # relative offset of the local header
    patched = data[:offset_field] + struct.pack("<I", len(data) + 4096) + data[offset_field + 4 :]
    return patched, name


BOMB_KINDS = ("declared", "small_lie", "plausible_lie")


def with_bomb(data: bytes, inflated: int, kind: str = "declared") -> tuple[bytes, str]:
    """The zip with its first member replaced by ``inflated`` zero bytes, deflated; its name.

    ``declared``: the directory declares the inflated size (over any sane cap). ``small_lie``:
    it declares the original PNG's size, far below the compressed size. ``plausible_lie``: it
    declares twice the compressed size, so only inflating shows the lie.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        infos = source.infolist()
        contents = {i.filename: source.read(i) for i in infos}
    target = infos[0].filename
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as bombed:
        for info in infos:
            if info.filename != target:
                bombed.writestr(info.filename, contents[info.filename])
                continue
            with bombed.open(target, "w", force_zip64=True) as member:
                zeros = bytes(1 << 20)
                for _ in range(inflated >> 20):
                    member.write(zeros)
    result = out.getvalue()
    if kind != "declared":
        # Declare another size (and the original PNG's CRC) in the central directory.
        for position, name in _central_entries(result):
            if name == target:
                compressed = struct.unpack_from("<I", result, position + 20)[0]
                declared = len(contents[target]) if kind == "small_lie" else 2 * compressed
                crc = zlib.crc32(contents[target])
                head = struct.pack("<I", crc)
                result = result[: position + 16] + head + result[position + 20 :]
                size = struct.pack("<I", declared)
                result = result[: position + 24] + size + result[position + 28 :]
    return result, target


def fake_end_in_comment(data: bytes) -> bytes:
    """A second end record hidden at the end of the comment, claiming a directory of junk."""
    fake = _END_RECORD.pack(zipfile.stringEndArchive, 0, 0, 1, 1, 46, 0, 0)
    at = end_record_offset(data)
    return _patch_end(data[: at + _END_RECORD.size], clen=len(fake)) + fake


def damaged_zips(data: bytes) -> dict[str, bytes]:
    """Every way the issue lists for a mask zip not to be a zip, by name."""
    fields = _END_RECORD.unpack_from(data, end_record_offset(data))
    cd_offset, cd_size = fields[6], fields[5]
    return {
        "html_error_page": b"<html><body><h1>502 Bad Gateway</h1></body></html>\n",
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "cut_directory": data[: cd_offset + cd_size // 2] + data[end_record_offset(data) :],
        "wrong_entry_count": _patch_end(data, entries=fields[4] + 7, disk_entries=fields[3] + 7),
        "fake_end_in_comment": fake_end_in_comment(data),
        "directory_beyond_end": _patch_end(data, cd_offset=len(data) + 3_370_000_000 % 2**31),
    }


def shard_argv(server_url: str, out: Path, *extra: str) -> list[str]:
    """`oistream shard` arguments for the four street classes, reading from ``server_url``."""
    return [
        "shard",
        "--classes",
        *CLASSES,
        "--split",
        SPLIT,
        "--out",
        str(out),
        "--images",
        f"{server_url}/open-images-dataset",
        "--metadata",
        f"{server_url}/openimages",
        "--samples-per-shard",
        "4",
        "--processes",
        "1",
        "--quiet",
        *extra,
    ]


@dataclass
class ChildRun:
    returncode: int | None  # None: killed at the time-out
    stderr: str
    peak_rss_bytes: int
    seconds: float = 0.0


def run_child(argv: list[str], address_space: int | None = None, timeout: float = 120) -> ChildRun:
    """The oistream command line with ``argv`` in a child, optionally under RLIMIT_AS; its exit
    code, stderr (without the RSS line), peak RSS and wall seconds."""
    limit = ""
    if address_space is not None:
        limit = (
            "import resource; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({address_space}, {address_space})); "
        )
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of a big
    # parent (a test session with torch loaded) would report the parent's peak as its own.
    script = (
        f"import sys, resource; {limit}from oistream.cli import main; code = main(sys.argv[1:]); "
        "sys.stderr.write('\\nPEAK_RSS_KB %s\\n' % "
        "open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); sys.exit(code)"
    )
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else ""
        return ChildRun(None, stderr, 0, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    peak = 0
    lines = []
    for line in done.stderr.splitlines():
        if line.startswith("PEAK_RSS_KB "):
            peak = int(line.split()[1]) * 1024
        elif line.strip():
            lines.append(line)
    return ChildRun(done.returncode, "\n".join(lines), peak, seconds)


def manifest(out: Path) -> dict | None:
    """The run's manifest.json, None when it wrote none."""
    with contextlib.suppress(FileNotFoundError):
        return json.loads((out / "manifest.json").read_text())
    return None


def segmentation_csv_path(split: str = SPLIT) -> str:
    """The URL path of a split's segmentation CSV under a server rooted at a fake bucket."""
    return f"/openimages/v5/{split}-annotations-object-segmentation.csv"


def person_row(image_id: str, box_id: str, clicks: str) -> str:
    """A well-formed Person row of the segmentation CSV with the given Clicks field."""
    mask_path = f"{image_id}_m01g317_{box_id}.png"
    return f"{mask_path},{image_id},/m/01g317,{box_id},0.1,0.5,0.2,0.6,0.9,{clicks}"


def crafted_clicks(clicks: int) -> str:
    """Digits that split many ways, ending in a stray character: a backtracking trigger."""
    return ";".join(["11111111 11111111 1"] * clicks) + " x"


def selected_images(bucket: Path, split: str = SPLIT) -> dict[str, str]:
    """ImageID -> zip prefix of every image carrying a selected class, from the CSV itself."""
    import csv

    mids = {"/m/01g317", "/m/0k4j", "/m/015qff", "/m/01mqdt"}
    path = bucket / "openimages" / "v5" / f"{split}-annotations-object-segmentation.csv"
    with open(path, newline="") as f:
        return {r["ImageID"]: r["ImageID"][0] for r in csv.DictReader(f) if r["LabelName"] in mids}
