"""Shard files and the output location they are published to (DESIGN section 4).

A shard is written to a temporary file and becomes visible under its final name only when it is
complete: a rename on a local disk, a single upload on object storage. Its bytes depend only on
its samples (fixed mtime, owner and member order), so the same plan gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from oistream import sources

# A fixed timestamp (2000-01-01) for every member: reproducible bytes, and no 1970 surprises.
TAR_MTIME = 946_684_800
TAR_OWNER = "oistream"


@dataclass
class ShardStats:
    name: str
    samples: int
    instances: int
    bytes: int
    sha256: str


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
        self.is_local = "file" in _protocols(self.fs)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def prepare(self) -> None:
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)
            for leftover in os.listdir(self.root):
                # Partial files of an interrupted run; their shards are redone from scratch.
                if leftover.startswith(".") and leftover.endswith(".partial"):
                    os.remove(os.path.join(self.root, leftover))

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def read_json(self, name: str) -> Any | None:
        try:
            with self.fs.open(self.path(name), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def write_json(self, name: str, value: Any) -> None:
        data = (json.dumps(value, indent=1, sort_keys=False) + "\n").encode()
        self.write_bytes(name, data)

    def write_bytes(self, name: str, data: bytes) -> None:
        if self.is_local:
            final = self.path(name)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            temporary = f"{final}.{os.getpid()}.tmp"
            with open(temporary, "wb") as f:
                f.write(data)
            os.replace(temporary, final)
        else:
            self.fs.pipe_file(self.path(name), data)

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
        # Plain tarfile in stream mode, following webdataset's TarWriter conventions (USTAR,
        # `key.field` names, fields sorted, mode 0444): importing webdataset pulls in torch,
        # which would cost every shard worker 1.4 s and a few hundred MB.
        self._tar = tarfile.open(fileobj=self._hashing, mode="w|", format=tarfile.USTAR_FORMAT)
        return self

    def add(self, key: str, fields: dict[str, bytes], instances: int) -> None:
        """Members go in as ``{key}.{field}``, fields sorted, as webdataset expects them."""
        for field in sorted(fields):
            data = fields[field]
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size = len(data)
            info.mtime = TAR_MTIME
            info.mode = 0o444
            info.uname = info.gname = TAR_OWNER
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1
        self.instances += instances
        self.payload_bytes += sum(len(v) for v in fields.values())

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        try:
            self._tar.close()
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


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
