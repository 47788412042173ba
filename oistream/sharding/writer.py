"""Shard files and the output location they are published to (DESIGN section 4).

A shard is written to a temporary file and becomes visible under its final name only when it is
complete: a rename on a local disk, a single upload on object storage. Its bytes depend only on
its samples (fixed mtime, owner and member order), so the same plan gives the same bytes.
"""

from __future__ import annotations

import calendar
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import socket
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from oistream import sources
from oistream.errors import OistreamError
from oistream.format import PLAN_RECORD, PROGRESS_FOLDER

# A fixed timestamp (2000-01-01) for every member: reproducible bytes, and no 1970 surprises.
TAR_MTIME = 946_684_800
TAR_OWNER = "oistream"
LEASE_RECORD = f"{PROGRESS_FOLDER}/lease.json"
# A run rewrites its lease this often; one not rewritten for LEASE_EXPIRY_SECONDS is a run that
# is gone (a preempted machine's, whose PID cannot be asked from another host). The margin
# covers a slow storage write and clocks some minutes apart.
LEASE_RENEW_SECONDS = 60.0
LEASE_EXPIRY_SECONDS = 15 * 60.0
_LEASE_TIME = "%Y-%m-%dT%H:%M:%SZ"
# Every name oistream ever writes under an output root: anything else there is someone else's.
_OURS = re.compile(
    r"(?:[a-z]+-[0-9]{6}\.tar|manifest\.json|\..+\.[0-9]+\.partial|.+\.[0-9]+\.tmp"
    rf"|{PROGRESS_FOLDER}/(?:[a-z]+-[0-9]{{6}}\.tar\.json|plan\.json|lease\.json|.+\.[0-9]+\.tmp))"
)
_HASH_BLOCK = 8 * 1024 * 1024


@dataclass
class ShardStats:
    name: str
    samples: int
    instances: int
    bytes: int
    sha256: str


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = 0o444
    info.uname = info.gname = TAR_OWNER
    return info


def _header_parts() -> tuple[bytes, int]:
    """The USTAR header of our members with the name and size fields blank, and the sum of its
    bytes with the checksum field counted as spaces (as the checksum is defined)."""
    header = bytearray(_tar_info("", 0).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING))
    header[0:100] = bytes(100)
    header[124:136] = bytes(12)
    header[148:156] = b" " * 8
    return bytes(header), sum(header)


_HEADER, _HEADER_SUM = _header_parts()
_BLOCK = tarfile.BLOCKSIZE
_ZEROS = bytes(tarfile.RECORDSIZE)


def tar_header(name: str, size: int) -> bytes:
    """The USTAR header ``tarfile`` writes for a member of ours (mode 0444, owner
    ``TAR_OWNER``, mtime ``TAR_MTIME``): the same bytes, without a ``TarInfo`` and its copies
    per member. Names over 100 bytes (split into prefix and name) and sizes over 8 GiB go
    through ``tarfile`` itself."""
    raw = name.encode(tarfile.ENCODING, "surrogateescape")
    if len(raw) > 100 or size >= 8**11 or not name.isascii():
        return _tar_info(name, size).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING)
    size_field = b"%011o\0" % size
    checksum = _HEADER_SUM + sum(raw) + sum(size_field)
    return b"".join(
        (
            raw,
            _HEADER[len(raw) : 124],
            size_field,
            _HEADER[136:148],
            b"%06o\0" % checksum,
            _HEADER[155:],
        )
    )


class _HashingFile:
    """Counts and hashes what the tar stream writes, so nothing is read back to checksum it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


class OutputLocation:
    """A shard folder: a local directory or any fsspec URL (``s3://bucket/prefix``)."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/") or url
        self.options = sources.storage_options(url) if options is None else options
        self.fs, self.root = sources.filesystem(url, self.options)
        self.is_local = sources.is_local(self.fs)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def prepare(self) -> None:
        """Remove partial files of an interrupted run; call only while holding the lease."""
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)
            for leftover in os.listdir(self.root):
                # Partial files of an interrupted run; their shards are redone from scratch.
                if leftover.startswith(".") and leftover.endswith(".partial"):
                    os.remove(os.path.join(self.root, leftover))

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def read_json(self, name: str) -> Any | None:
        """The JSON document ``name``, None when absent; a broken one is an error naming it."""
        try:
            with self.fs.open(self.path(name), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except ValueError as error:
            raise OistreamError(
                f"{self.url}/{name} is not valid JSON ({error}); delete it to redo what it records"
            ) from None

    def listing(self) -> list[str]:
        """Every file under the root, as names relative to it; [] when the root is absent."""
        if not self.fs.exists(self.root):
            return []
        found = self.fs.find(self.root)
        prefix = self.root.rstrip("/") + "/"
        return sorted(f[len(prefix) :] if f.startswith(prefix) else f for f in found)

    def foreign_files(self, names: list[str]) -> list[str]:
        """Files in ``names`` oistream did not write: not its names, or no plan record."""
        if not names:
            return []
        if PLAN_RECORD not in names and LEASE_RECORD not in names:
            return names  # a folder that no run of ours ever claimed
        return [n for n in names if not _OURS.fullmatch(n)]

    def verify(self, stats: dict[str, Any]) -> str | None:
        """Why the published shard does not match its recorded size and sha256, or None."""
        name = stats["name"]
        try:
            size = int(self.fs.size(self.path(name)))
        except FileNotFoundError:
            return "missing"
        if size != stats["bytes"]:
            return f"{size} bytes, recorded {stats['bytes']}"
        digest = hashlib.sha256()
        with self.fs.open(self.path(name), "rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
        if digest.hexdigest() != stats["sha256"]:
            return "sha256 differs from the recorded one"
        return None

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Write ``name`` only if it does not exist; False when it does (someone else's)."""
        if self.is_local:
            final = self.path(name)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                handle = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(handle, "wb") as f:
                f.write(data)
            return True
        if self.fs.exists(self.path(name)):
            return False
        try:
            # A conditional create (If-None-Match: *) where the store has it (S3, s3fs).
            self.fs.pipe_file(self.path(name), data, mode="create")
        except TypeError:  # a filesystem without create mode: the check above must do
            self.fs.pipe_file(self.path(name), data)
        except (FileExistsError, OSError) as error:
            if isinstance(error, FileExistsError) or "PreconditionFailed" in str(error):
                return False
            raise
        return True

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(name))

    def write_json(self, name: str, value: Any) -> None:
        data = (json.dumps(value, indent=1, sort_keys=False) + "\n").encode()
        self.write_bytes(name, data)

    def write_bytes(self, name: str, data: bytes) -> None:
        sources.write_whole(self.fs, self.path(name), data)

    def shard(
        self, name: str, before_publish: Callable[[ShardStats], None] | None = None
    ) -> ShardFile:
        return ShardFile(self, name, before_publish)


class ShardFile:
    """One shard being written; published under its name on a clean exit, discarded otherwise."""

    def __init__(
        self,
        location: OutputLocation,
        name: str,
        before_publish: Callable[[ShardStats], None] | None = None,
    ) -> None:
        self.location = location
        self.name = name
        # Runs after the shard is complete and before it becomes visible: whatever it records
        # (the shard's stats and failures) exists whenever the shard does.
        self.before_publish = before_publish
        self.samples = 0
        self.instances = 0
        self.payload_bytes = 0

    def __enter__(self) -> ShardFile:
        if self.location.is_local:
            # The pid keeps an orphaned worker of a killed run from writing into a rerun's file.
            self.temporary = os.path.join(self.location.root, f".{self.name}.{os.getpid()}.partial")
            raw = open(self.temporary, "wb")
        else:
            raw = tempfile.NamedTemporaryFile(prefix="oistream-", suffix=".tar", delete=False)
            self.temporary = raw.name
        self._raw = raw
        self._hashing = _HashingFile(raw)
        # The bytes tarfile writes in stream mode (``mode="w|"``, USTAR), following
        # webdataset's TarWriter conventions (`key.field` names, fields sorted, mode 0444);
        # written here directly (``tar_header``): tarfile's per-member TarInfo copies and
        # copyfileobj cost more CPU than fetching the member. Importing webdataset instead
        # pulls in torch, which would cost every shard worker 1.4 s and a few hundred MB.
        return self

    def add(self, key: str, fields: dict[str, bytes], instances: int) -> None:
        """Members go in as ``{key}.{field}``, fields sorted, as webdataset expects them."""
        write = self._hashing.write
        payload = 0
        for field in sorted(fields):
            data = fields[field]
            size = len(data)
            payload += size
            write(tar_header(f"{key}.{field}", size))
            write(data)
            if size % _BLOCK:
                write(_ZEROS[: _BLOCK - size % _BLOCK])
        self.samples += 1
        self.instances += instances
        self.payload_bytes += payload

    def _finish_tar(self) -> None:
        """The end of archive as tarfile writes it: two zero blocks, then zeros to a whole
        record (``RECORDSIZE``)."""
        self._hashing.write(_ZEROS[: 2 * _BLOCK])
        remainder = self._hashing.size % tarfile.RECORDSIZE
        if remainder:
            self._hashing.write(_ZEROS[: tarfile.RECORDSIZE - remainder])

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        try:
            if exc_type is None:
                self._finish_tar()
            self._raw.close()
            if exc_type is None:
                if self.before_publish is not None:
                    self.before_publish(self.stats)
                self._publish()
        finally:
            if os.path.exists(self.temporary):
                os.remove(self.temporary)

    def _publish(self) -> None:
        final = self.location.path(self.name)
        if self.location.is_local:
            os.replace(self.temporary, final)
        else:
            self.location.fs.put_file(self.temporary, final)

    @property
    def stats(self) -> ShardStats:
        return ShardStats(
            self.name,
            self.samples,
            self.instances,
            self._hashing.size,
            self._hashing.sha256.hexdigest(),
        )


@dataclass
class Lease:
    """This run's hold on an output root: ``_progress/lease.json`` with host, PID, start and
    the time it was last renewed (``keep_alive``). ``took_over`` is the record of a gone run
    whose lease this one replaced, if any."""

    location: OutputLocation
    record: dict[str, Any]
    took_over: dict[str, Any] | None = None
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    _renewing: threading.Thread | None = dataclasses.field(default=None, repr=False)

    def keep_alive(self, every: float = LEASE_RENEW_SECONDS) -> None:
        """Renew the lease every ``every`` seconds on a thread of its own, until ``release``."""

        def beat() -> None:
            while not self._stop.wait(every):
                # A failed write is tried again at the next beat: the lease only expires after
                # LEASE_EXPIRY_SECONDS, many beats later.
                with contextlib.suppress(Exception):
                    self.renew()

        self._renewing = threading.Thread(target=beat, name="oistream-lease", daemon=True)
        self._renewing.start()

    def renew(self) -> bool:
        """Rewrite the lease with the time now, if it is still ours; whether it was."""
        current = self.location.read_json(LEASE_RECORD)
        if not isinstance(current, dict) or current.get("run") != self.record["run"]:
            return False
        self.record = {**self.record, "renewed": _lease_time(time.time())}
        self.location.write_bytes(LEASE_RECORD, _lease_bytes(self.record))
        return True

    def release(self) -> None:
        """Stop renewing; remove the lease if it is still ours (a run that took over a stale one
        keeps it)."""
        self._stop.set()
        if self._renewing is not None:
            self._renewing.join()
        try:
            current = self.location.read_json(LEASE_RECORD)
        except OistreamError:
            return
        if current is not None and current.get("run") == self.record["run"]:
            self.location.remove(LEASE_RECORD)


def _lease_bytes(record: dict[str, Any]) -> bytes:
    return (json.dumps(record) + "\n").encode()


def _lease_time(seconds: float) -> str:
    return time.strftime(_LEASE_TIME, time.gmtime(seconds))


def _lease_expired(holder: dict[str, Any], now: float) -> bool:
    """Whether ``holder`` was last renewed (or, never renewed, started) over
    LEASE_EXPIRY_SECONDS ago. A lease without a readable time never expires: delete it."""
    stamp = holder.get("renewed", holder.get("started"))
    if not isinstance(stamp, str):
        return False
    try:
        then = calendar.timegm(time.strptime(stamp, _LEASE_TIME))
    except ValueError:
        return False
    return now - then > LEASE_EXPIRY_SECONDS


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as error:
        return error.errno != errno.ESRCH
    return True


def refuse_foreign_files(location: OutputLocation, names: list[str], overwrite: bool) -> None:
    """One line, touching nothing, when ``names`` (the folder's listing) holds files oistream
    did not write and ``overwrite`` does not allow writing among them."""
    foreign = location.foreign_files(names)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise OistreamError(
            f"{location.url} holds files oistream did not write ({shown}); choose an empty "
            "--out, or pass --overwrite to write there anyway"
        )


def refuse_another_plan(
    location: OutputLocation, previous: Any, plan_hash: str, overwrite: bool
) -> bool:
    """True when ``previous`` (the folder's plan record, or None) is another plan's; without
    ``overwrite`` that is one line telling what to do. The same arguments plan differently
    across versions whose plan hash changed, so the line names both causes."""
    differs = isinstance(previous, dict) and previous.get("plan_hash") != plan_hash
    if differs and not overwrite:
        raise OistreamError(
            f"{location.url} holds shards of another selection, or of an oistream version "
            f"that planned differently (plan {str(previous.get('plan_hash', '?'))[:12]}); "
            "choose another --out, or pass --overwrite to replace them"
        )
    return differs


def claim_output(location: OutputLocation, plan_record: dict[str, Any], overwrite: bool) -> Lease:
    """Make ``location`` this run's, or refuse with one line having written and deleted nothing.

    Refused: a folder holding files oistream did not write (unless ``overwrite``), a folder
    holding another plan's shards (unless ``overwrite``, which then rebuilds every shard), and
    a folder leased by a live run. A lease left by a dead process on this host, or not renewed
    for LEASE_EXPIRY_SECONDS (a run on another host that is gone), is taken over.
    Only once the lease is held are partial files removed and the plan recorded.
    """
    names = location.listing()
    refuse_foreign_files(location, names, overwrite)
    previous = location.read_json(PLAN_RECORD) if PLAN_RECORD in names else None
    if previous is not None and not isinstance(previous, dict):
        raise OistreamError(f"{location.url}/{PLAN_RECORD} is not a plan record; delete it")
    refuse_another_plan(location, previous, plan_record["plan_hash"], overwrite)
    lease = _take_lease(location)
    lease.keep_alive()
    try:
        location.prepare()
        if previous is None or previous.get("plan_hash") != plan_record["plan_hash"]:
            # A new plan here: the old progress records describe shards this plan will replace.
            for name in names:
                if name.startswith(f"{PROGRESS_FOLDER}/") and name.endswith(".tar.json"):
                    location.remove(name)
            location.write_json(PLAN_RECORD, plan_record)
    except BaseException:
        lease.release()
        raise
    return lease


def _take_lease(location: OutputLocation) -> Lease:
    now = time.time()
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _lease_time(now),
        "renewed": _lease_time(now),
        "run": uuid.uuid4().hex,
    }
    data = _lease_bytes(record)
    if location.create_exclusive(LEASE_RECORD, data):
        return Lease(location, record)
    holder = location.read_json(LEASE_RECORD)
    if not isinstance(holder, dict):
        holder = {}
    dead_here = (
        holder.get("host") == record["host"]
        and isinstance(holder.get("pid"), int)
        and not _process_alive(holder["pid"])
    )
    if dead_here or _lease_expired(holder, now):  # a dead run, or one gone silent: take over
        location.write_bytes(LEASE_RECORD, data)
        return Lease(location, record, took_over=holder)
    raise OistreamError(
        f"{location.url} is in use by another run (host {holder.get('host', '?')}, "
        f"pid {holder.get('pid', '?')}, since {holder.get('started', '?')}, renewed "
        f"{holder.get('renewed', '?')}); it expires {LEASE_EXPIRY_SECONDS / 60:g} minutes "
        f"after its last renewal; if that run is gone, delete {location.url}/{LEASE_RECORD}"
    )
