"""The run folder ``--out`` at any fsspec URL: every file in it is published whole.

Files are written locally first, then made visible in one step: ``os.replace`` of a finished
file in the same folder for a local run, one PUT of the finished file (``put_file``/
``pipe_file``; s3fs completes a multipart upload only at its end) for object storage. Nothing
ever appends to a remote object: ``metrics.jsonl`` is kept in memory and rewritten whole (it
is small) at each checkpoint and at most every ``METRICS_PUBLISH_S`` seconds, so every line
logged before the last checkpoint is in the bucket.

Checkpoints are ``checkpoints/step-NNNNNNN.pt`` with a record beside them,
``step-NNNNNNN.pt.json`` = ``{"format", "step", "bytes", "sha256"}``, published after the
checkpoint itself: a checkpoint without its record, or whose bytes do not match it, is torn or
foreign and is never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec

from oistream import sources

from .errors import TrainError

CHECKPOINT_FORMAT = "oistream-train-checkpoint-1"
METRICS_PUBLISH_S = 30.0  # object storage: metrics.jsonl is rewritten at most this often
_STEP_FILE = re.compile(r"step-(\d{7,})\.pt$")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


class RunDir:
    """``--out``: a local folder or any fsspec URL, with the same endpoint and credential
    conventions as ``oistream shard`` (``oistream.sources.storage_options``)."""

    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        self.url = url.rstrip("/") or url
        protocol = fsspec.core.split_protocol(self.url)[0]
        self.remote = protocol not in (None, "file", "local")
        if self.remote:
            self.fs, self.root = sources.filesystem(
                self.url, sources.storage_options(self.url, endpoint_url)
            )
            self._staging = tempfile.mkdtemp(prefix="oistream-run-")
        else:
            self.fs, self.root = None, os.path.abspath(self.url)
            self._staging = None
        self._metrics: list[str] = []
        self._metrics_published = 0.0
        self._metrics_synced = False  # the local file holds exactly self._metrics

    # -- names --

    def __str__(self) -> str:
        return self.url

    def join(self, *parts: str) -> str:
        """The URL (or path) of a file in the run folder, as the user would write it."""
        return "/".join([self.url, *parts])

    def _remote_path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def staging(self, name: str) -> Path:
        """A local path to write ``name`` into before ``publish``: in the folder itself for a
        local run (a temporary name beside it), in a private temporary folder otherwise."""
        if self._staging is None:
            path = Path(self.root) / f"{name}.partial"
        else:
            path = Path(self._staging) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # -- writing --

    def prepare(self) -> None:
        """Create the folder (local) or check that the bucket takes a write (remote): a wrong
        endpoint or a read-only bucket fails here, before any training."""
        if not self.remote:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as error:
                raise TrainError(f"cannot create the run folder {self.url}: {error}") from None
            return
        self.publish_bytes(".oistream-run", b"oistream trainer run folder\n")

    def publish(self, staged: Path, name: str) -> str:
        """Make the finished local file ``staged`` visible as ``name``, whole, in one step."""
        if self.remote:
            self.fs.put_file(str(staged), self._remote_path(name))
            staged.unlink(missing_ok=True)
        else:
            final = Path(self.root) / name
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
        return self.join(name)

    def publish_bytes(self, name: str, data: bytes) -> str:
        if self.remote:
            self.fs.pipe_file(self._remote_path(name), data)
            return self.join(name)
        staged = self.staging(name)
        staged.write_bytes(data)
        return self.publish(staged, name)

    def read_bytes(self, name: str) -> bytes | None:
        """The file's bytes, or None if it is not there."""
        try:
            if self.remote:
                return self.fs.cat_file(self._remote_path(name))
            return (Path(self.root) / name).read_bytes()
        except FileNotFoundError:
            return None

    def listdir(self, folder: str) -> list[str]:
        """Base names in a sub-folder (none if it does not exist)."""
        try:
            if self.remote:
                self.fs.invalidate_cache()
                entries = self.fs.ls(self._remote_path(folder), detail=False)
                return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
            return os.listdir(Path(self.root) / folder)
        except FileNotFoundError:
            return []

    def size(self, name: str) -> int | None:
        try:
            if self.remote:
                return int(self.fs.info(self._remote_path(name))["size"])
            return (Path(self.root) / name).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.remote:
                self.fs.rm_file(self._remote_path(name))
            else:
                (Path(self.root) / name).unlink()

    def fetch(self, name: str) -> Path:
        """A local copy of ``name`` (the file itself for a local run)."""
        if not self.remote:
            return Path(self.root) / name
        local = self.staging(name)
        self.fs.get_file(self._remote_path(name), str(local))
        return local

    def close(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)

    # -- metrics.jsonl --

    def resume_metrics(self, up_to_step: int | None) -> None:
        """Start from the folder's metrics.jsonl, without lines logged after ``up_to_step``
        (those steps are trained again and logged again); None starts empty."""
        self._metrics = []
        self._metrics_synced = False
        if up_to_step is None:
            return
        data = self.read_bytes("metrics.jsonl") or b""
        for line in data.decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn last line of a local file
            step = record.get("step", record.get("eval", {}).get("step"))
            if isinstance(step, int) and step <= up_to_step:
                self._metrics.append(line)

    def log(self, record: dict[str, Any], *, force: bool = False) -> None:
        """Add a metrics line; local runs append at once, remote ones publish now and then."""
        line = json.dumps(record, sort_keys=True)
        self._metrics.append(line)
        if not self.remote:
            path = Path(self.root) / "metrics.jsonl"
            if not self._metrics_synced or not path.exists():
                # The first line of this process: rewrite whole, dropping lines an earlier
                # process logged after its last checkpoint (they are logged again).
                self.publish_bytes("metrics.jsonl", self._text())
                self._metrics_synced = True
            else:
                with path.open("a") as stream:
                    stream.write(line + "\n")
            return
        self.flush_metrics(force=force)

    def flush_metrics(self, *, force: bool = True) -> None:
        if not self.remote or not self._metrics:
            return
        if force or time.monotonic() - self._metrics_published >= METRICS_PUBLISH_S:
            self.publish_bytes("metrics.jsonl", self._text())
            self._metrics_published = time.monotonic()

    def _text(self) -> bytes:
        return "".join(line + "\n" for line in self._metrics).encode()

    # -- checkpoints --

    def checkpoint_name(self, step: int) -> str:
        return f"checkpoints/step-{step:07d}.pt"

    def publish_checkpoint(self, staged: Path, step: int) -> str:
        """Publish a finished checkpoint, then its record (size and sha256)."""
        name = self.checkpoint_name(step)
        record = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "bytes": staged.stat().st_size,
            "sha256": sha256_of(staged),
        }
        where = self.publish(staged, name)
        self.publish_bytes(f"{name}.json", json.dumps(record).encode())
        return where

    def checkpoints(self) -> list[tuple[int, str]]:
        """``(step, name)`` of the checkpoints that have a record, newest first."""
        found = []
        for base in self.listdir("checkpoints"):
            match = _STEP_FILE.match(base.removesuffix(".json"))
            if base.endswith(".pt.json") and match:
                found.append((int(match.group(1)), f"checkpoints/{base.removesuffix('.json')}"))
        return sorted(found, reverse=True)

    def verified(self, name: str) -> Path | None:
        """A local copy of checkpoint ``name`` if its bytes match its record, else None."""
        raw = self.read_bytes(f"{name}.json")
        try:
            record = json.loads(raw or b"")
            expected_size, expected_sha = int(record["bytes"]), str(record["sha256"])
            if record.get("format") != CHECKPOINT_FORMAT:
                return None
        except (ValueError, KeyError, TypeError):
            return None
        if self.size(name) != expected_size:
            return None
        local = self.fetch(name)
        if sha256_of(local) != expected_sha:
            if self.remote:
                local.unlink(missing_ok=True)
            return None
        return local

    def latest_checkpoint(self) -> tuple[int, str, Path] | None:
        """The newest checkpoint whose bytes match its record (torn ones are skipped with a
        note on stderr), as ``(step, URL, local path)``; None if there is none."""
        for step, name in self.checkpoints():
            local = self.verified(name)
            if local is not None:
                return step, self.join(name), local
            print(
                f"skipping checkpoint {self.join(name)}: its size or sha256 does not match "
                "its record (torn or foreign)",
                file=sys.stderr,
            )
        return None

    def prune_checkpoints(self, keep: int, newest: int) -> None:
        """Delete all but the ``keep`` newest checkpoints; called only once the checkpoint
        of step ``newest`` is published, which is never deleted."""
        for index, (step, name) in enumerate(self.checkpoints()):
            if index >= keep and step != newest:
                self.delete(f"{name}.json")  # the record first: a half-deleted one is torn
                self.delete(name)
