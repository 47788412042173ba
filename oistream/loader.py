"""Shards -> the (image, target) pairs torchvision's Mask R-CNN takes as they are (DESIGN 5).

Data flow, one webdataset pipeline per DataLoader worker:

    shard URLs -> split by rank -> split by worker -> open (fsspec, in the worker)
      -> tar members (safe names, known fields only) -> samples (group by key)
      -> shuffle buffer (raw bytes) -> decode + assemble masks -> drop small -> random flip

Two epoch modes:

* ``epoch_samples=None``: each sample exactly once per pass, shards partitioned across
  ranks x workers. Ranks may get different numbers of samples (and a worker with no shard gets
  none), which is fine for evaluation and single-process training.
* ``epoch_samples=n``: shards are resampled with replacement and every rank yields exactly ``n``
  samples per epoch, so DDP ranks never wait for each other.

Resumable (DESIGN 5): each worker's stream (``_Stream``) keeps its position as plain data, and
``ShardDataset.state_dict()`` / ``make_loader(...).state_dict()`` return it (per worker: shards
of the epoch's sequence started, samples taken from the current one, the names of the samples
in the shuffle buffer and aspect buckets, the shuffle's and flip's RNG states).
``load_state_dict(state)`` makes the next epoch seek there: only the current shard (read up
to the position without decoding) and the shards holding the buffered samples are read again.

Remote shards can be cached on local disk (``shard_cache=DIR``, bounded by
``shard_cache_bytes``, least recently used first out): a shard is copied as it streams in and
kept only if its size and sha256 match the manifest.

Untrusted shards are data: only ``.jpg``, ``.json`` and ``.NNN.mask.png`` members are read at all
(a pickle is never even loaded into memory), names that are absolute or contain ``..`` are
rejected with a warning, and a sample whose image or mask does not decode is skipped with a
warning naming its key and shard.

Fork safety: s3fs is not fork-safe, so no filesystem object is ever kept by a ``ShardDataset``.
The manifest is read in the parent through a throwaway, uncached filesystem; each worker opens
its own (``skip_instance_cache=True``) the first time it reads a shard. Forked workers are
therefore safe (fsspec also resets its IO loop in a forked child), and fork is what
``make_loader`` uses unless told otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import math
import os
import posixpath
import random
import re
import signal
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import braceexpand
import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from torchvision.io import ImageReadMode, decode_jpeg

from oistream import headers, sources, tarstream
from oistream.errors import OistreamError, one_line
from oistream.format import (
    IMAGE_FIELD,
    JSON_FIELD,
    MASK_FIELD_PATTERN,
    is_safe_member_name,
    member_field,
    read_manifest,
)
from oistream.masks import TORCHVISION_DEPRECATION, assemble_instances, decode_mask_png, warm_up
from oistream.transforms import RandomHorizontalFlip, drop_small_instances, hflip

__all__ = [
    "ShardCache",
    "ShardDataset",
    "ShardLoader",
    "ShardWarning",
    "image_id_to_int",
    "make_loader",
]

# Remote shards are read front to back; large read-ahead blocks keep requests few.
REMOTE_BLOCK_SIZE = 8 * 2**20
# Bytes one sample may make the loader hold, counted from headers before anything is decoded:
# the RGB image (3 x H x W), each mask at its own size, and the N x H x W mask planes. A real
# Open Images sample (at most 1024 px, a few dozen 1600 px masks) stays under ~0.2 G; a
# crafted one (40 masks of 13000 x 13000, or a 9000 x 9000 JPEG with 200 tiny masks) asks for
# 7-16 G and is skipped with a ShardWarning.
DEFAULT_PIXEL_BUDGET = 2**30
# What a compressed stream starts with: gzip, bzip2, xz, zstd. Shard format v1 is a plain tar.
_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}

Target = dict[str, Any]
Sample = tuple[torch.Tensor, Target]


class ShardWarning(UserWarning):
    """A shard member or sample was skipped; the message names it and its shard."""


def _warn(message: str) -> None:
    warnings.warn(message, ShardWarning, stacklevel=2)


def _warn_and_continue(exception: Exception) -> bool:
    """webdataset handler: report the exception, keep the stream going."""
    _warn(f"skipping a damaged shard member: {exception}")
    return True


def image_id_to_int(image_key: str) -> int:
    """A stable non-negative 63-bit integer for an ImageID (COCO tools want integer ids)."""
    digest = hashlib.blake2b(image_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _wanted_member(name: str, url: str) -> bool:
    """Which tar members to read: decided before the member's data is read."""
    if not is_safe_member_name(name):
        _warn(f"rejected member {name!r} in {url}: its name leaves the shard's folder")
        return False
    return member_field(name) is not None


def distributed_rank_and_world_size() -> tuple[int, int]:
    """torch.distributed's rank and world size if it is initialised, else RANK / WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# --- Where the shards are ------------------------------------------------------------------


def _throwaway_filesystem(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    """A filesystem for one look in the parent process, kept out of fsspec's instance cache so
    that no worker can ever be handed it."""
    return sources.filesystem(url, options, skip_instance_cache=True)


def _parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def resolve_source(
    source: str | os.PathLike | Sequence[str], options: dict[str, Any]
) -> tuple[list[str], dict[str, Any] | None]:
    """Shard URLs and the manifest (None if there is none) of a folder, pattern, tar or list."""
    if isinstance(source, (list, tuple)):
        urls = [url for item in source for url in braceexpand.braceexpand(os.fspath(item))]
        if not urls:
            raise OistreamError("no shards given")
        return urls, read_manifest(_parent(urls[0]), options)
    text = os.fspath(source)
    if "{" in text or text.endswith(".tar"):
        urls = list(braceexpand.braceexpand(text))
        return urls, read_manifest(_parent(urls[0]), options)

    folder = text.rstrip("/") or text
    manifest = read_manifest(folder, options)
    if manifest is not None:
        # read_manifest checked that every name stays inside the folder.
        names = [shard["name"] for shard in manifest.get("shards", [])]
        urls = [sources.join(folder, name) for name in names]
    else:
        fs, path = _throwaway_filesystem(folder, options)
        if not fs.isdir(path):
            raise OistreamError(f"no shard folder, tar or pattern at {text}")
        protocol = fsspec.core.split_protocol(folder)[0]
        found = sorted(fs.glob(f"{path.rstrip('/')}/*.tar"))
        urls = [f"{protocol}://{p}" if protocol else p for p in found]
    if not urls:
        raise OistreamError(f"no shards in {text}")
    return urls, manifest


# --- Reading shards (runs in the worker) ---------------------------------------------------


class _ShardOpener:
    """Opens shard URLs in the process that reads them, one filesystem per protocol, created
    here (after any fork) and never shared with another process. With a ``ShardCache`` a
    remote shard is read from the cache when a verified copy is there, else streamed and
    copied into it on the way."""

    def __init__(self, options: dict[str, Any], cache: ShardCache | None = None) -> None:
        self.options = options
        self.cache = cache
        self.filesystems: dict[str, Any] = {}

    def open(self, url: str) -> BinaryIO:
        protocol, path = fsspec.core.split_protocol(url)
        if protocol in (None, "file", "local"):
            return open(path, "rb", buffering=2**20)  # the caller closes it
        if self.cache is not None:
            cached = self.cache.lookup(url)
            if cached is not None:
                return cached
        fs = self.filesystems.get(protocol)
        if fs is None:
            fs, _ = sources.filesystem(url, self.options, skip_instance_cache=True)
            self.filesystems[protocol] = fs
        stream = fs.open(
            fs._strip_protocol(url), "rb", block_size=REMOTE_BLOCK_SIZE, cache_type="readahead"
        )
        if self.cache is not None:
            return self.cache.tee(url, stream)
        return stream


class ShardCache:
    """A local folder of remote shards, filled as they stream in, bounded in bytes (LRU).

    Only a complete copy whose size and sha256 match the manifest's record is ever kept (it is
    written under a temporary name and renamed); shards without such a record are not cached.
    File names are a hash of the URL plus the shard's base name, so no URL can name a path
    outside the folder. Use order is the files' modification time (touched on every hit).
    """

    def __init__(
        self, folder: str | os.PathLike, max_bytes: int | None, records: dict[str, dict]
    ) -> None:
        self.folder = os.fspath(folder)
        self.max_bytes = max_bytes
        self.records = records  # shard URL -> {"bytes", "sha256"} from the manifest
        os.makedirs(self.folder, exist_ok=True)

    def path(self, url: str) -> str:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        base = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(url))[-100:]
        return os.path.join(self.folder, f"{digest}-{base}")

    def lookup(self, url: str) -> BinaryIO | None:
        """The cached copy of ``url`` opened for reading, or None (a miss)."""
        record = self.records.get(url)
        path = self.path(url)
        try:
            if record is None or os.path.getsize(path) != int(record["bytes"]):
                return None
            os.utime(path)  # most recently used
            return open(path, "rb", buffering=2**20)
        except OSError:
            return None

    def tee(self, url: str, stream: BinaryIO) -> BinaryIO:
        record = self.records.get(url)
        if record is None or not record.get("sha256"):
            return stream  # nothing to verify a copy against: stream only
        return _TeeToCache(stream, self, url, record)

    def admit(self, partial: str, url: str) -> None:
        """Publish a verified copy, then evict the least recently used beyond the budget."""
        final = self.path(url)
        os.replace(partial, final)
        if self.max_bytes is None:
            return
        entries = []
        for entry in os.scandir(self.folder):
            if entry.is_file() and not entry.name.endswith(".partial"):
                info = entry.stat()
                entries.append((info.st_mtime, info.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path != final or size > self.max_bytes:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                total -= size


class _TeeToCache(io.RawIOBase):
    """A remote shard stream that copies what is read into the cache; the copy is admitted
    only when the whole shard was read (``finish``) and its size and sha256 match."""

    def __init__(self, stream: BinaryIO, cache: ShardCache, url: str, record: dict) -> None:
        super().__init__()
        self.stream, self.cache, self.url, self.record = stream, cache, url, record
        self.partial = f"{cache.path(url)}.{os.getpid()}.partial"
        self.copy: BinaryIO | None = open(self.partial, "wb")  # noqa: SIM115 (closed in finish/close)
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.stream.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Back to the start (the reader peeks at the magic bytes) restarts the copy; any
        other jump would leave a hole in it, so the copy is given up."""
        position = self.stream.seek(offset, whence)
        if position == 0 and self.copy is not None:
            self.copy.seek(0)
            self.copy.truncate()
            self.digest, self.size = hashlib.sha256(), 0
        elif position != self.size:
            self._drop_copy()
        return position

    def _drop_copy(self) -> None:
        if self.copy is not None:
            self.copy.close()
            self.copy = None
            with contextlib.suppress(OSError):
                os.unlink(self.partial)

    def readinto(self, buffer: Any) -> int:
        data = self.stream.read(len(buffer))
        self._keep(data)
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self._keep(data)
        return data

    def _keep(self, data: bytes) -> None:
        if self.copy is not None and data:
            self.copy.write(data)
            self.digest.update(data)
            self.size += len(data)

    def finish(self) -> None:
        """The reader reached the shard's end: read what it left (tar padding) and admit."""
        while self.read(2**20):
            pass
        if self.copy is None:
            return
        self.copy.close()
        self.copy = None
        complete = self.size == int(self.record["bytes"])
        if complete and self.digest.hexdigest() == self.record["sha256"]:
            self.cache.admit(self.partial, self.url)
        else:
            _warn(f"not caching {self.url}: its bytes do not match the manifest's size and sha256")
            with contextlib.suppress(OSError):
                os.unlink(self.partial)

    def close(self) -> None:
        self._drop_copy()  # abandoned before the end: no copy
        self.stream.close()
        super().close()


def _read_members(
    shards: Iterable[dict[str, Any]], opener: _ShardOpener, give_up_after: int
) -> Iterator[dict[str, Any]]:
    """Tar members ({"fname", "data", "__url__"}) of each shard, then an end-of-shard marker
    ({}) so that no sample is ever joined across two shards.

    ``give_up_after`` consecutive shards without a readable member end the stream with an
    error: a resampled (endless) stream over unreadable shards would otherwise spin forever.
    """
    barren = 0
    for shard in shards:
        url = shard["url"]
        produced = False
        try:
            with opener.open(url) as stream:
                # webdataset opens tars with mode "r|*", which would inflate a compressed one
                # whole-heartedly (a gzip bomb): format v1 is uncompressed, so refuse it.
                # The stream may not seek (a remote or cached stream): the head is handed back
                # in front of the rest instead.
                head = stream.read(6)
                for magic, kind in _COMPRESSED_MAGIC.items():
                    if head.startswith(magic):
                        raise _BadSample(f"it is {kind}-compressed, not a format v1 (plain) tar")
                members = tarstream.iter_members(
                    tarstream.PrefixedStream(head, stream),
                    functools.partial(_wanted_member, url=url),
                )
                for name, data in members:
                    produced = True
                    yield {"fname": name, "data": data, "__url__": url}
                finish = getattr(stream, "finish", None)
                if finish is not None:
                    finish()  # the whole shard was read: the cache may keep it
        except Exception as error:  # a missing, truncated or non-tar shard: note it, go on
            _warn(f"cannot read shard {url} to the end: {type(error).__name__}: {error}")
        yield {}
        barren = 0 if produced else barren + 1
        if barren >= give_up_after:
            raise OistreamError(f"{barren} shards in a row had no readable sample (last: {url})")


def _split_by_rank(shards: Iterable[dict], rank: int, world_size: int) -> Iterator[dict]:
    return itertools.islice(shards, rank, None, world_size)


class _BadSample(Exception):
    pass


def decode_image(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 [3, H, W] RGB.

    torchvision's libjpeg-turbo decoder, which measured faster than Pillow on this project's CPU
    and returns the [3, H, W] layout directly. A JPEG's size comes from its header
    (``headers.jpeg_size``, ~0.1 ms less than Pillow's ``open``) and must be under Pillow's
    MAX_IMAGE_PIXELS, the decompression bomb limit; anything else that has no JPEG frame
    header goes through Pillow, which refuses bombs and decodes what is not really a JPEG.
    """
    if _checked_jpeg_size(data) is not None:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        with torchvision_decoders_unwarned():
            return decode_jpeg(encoded, mode=ImageReadMode.RGB)
    with _open_header(data) as probe:
        if probe.format != "JPEG":
            rgb = np.asarray(probe.convert("RGB"))
            return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with torchvision_decoders_unwarned():
        return decode_jpeg(encoded, mode=ImageReadMode.RGB)


def encoded_jpeg(data: bytes) -> tuple[torch.Tensor, tuple[int, int]]:
    """JPEG bytes as a 1-D uint8 tensor and (H, W) from the header, checked as ``decode_image``
    checks them; decoding is left to the consumer (nvJPEG on the GPU)."""
    size = _checked_jpeg_size(data)
    if size is None:
        with _open_header(data) as probe:
            if probe.format != "JPEG":
                raise _BadSample(
                    f"image is {probe.format}, not JPEG: GPU decoding takes JPEGs only"
                )
            size = probe.size
    width, height = size
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), (height, width)


def _checked_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, refused over the bomb limit; None when the
    header does not say (Pillow then judges the bytes)."""
    size = headers.jpeg_size(data)
    if size is not None:
        _refuse_bomb(*size)
    return size


def _refuse_bomb(width: int, height: int) -> None:
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise _BadSample(f"image of {width}x{height} pixels is over Pillow's limit")


def _open_header(data: bytes) -> Image.Image:
    """Pillow's view of the image, its header parsed and nothing decoded yet; decompression
    bombs (over MAX_IMAGE_PIXELS) are refused here, before any decoder sees them."""
    probe = Image.open(io.BytesIO(data))
    try:
        _refuse_bomb(*probe.size)
    except _BadSample:
        probe.close()
        raise
    return probe


@contextlib.contextmanager
def torchvision_decoders_unwarned() -> Iterator[None]:
    """torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec (another
    dependency); they still work, and the CPU one is the faster one here. Only that warning is
    silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", TORCHVISION_DEPRECATION, DeprecationWarning)
        yield


def _short(error: Exception) -> str:
    # torchvision prefixes its messages with the C++ source location; the last part is the news.
    # Without the type name: the callers put it in front (it came twice before).
    return one_line(error, with_type=False).rsplit(", ", 1)[-1]


# --- The dataset -----------------------------------------------------------------------------


class ShardDataset(IterableDataset):
    """Format-v1 shards as (image uint8 [3, H, W], target) in torchvision's detection format.

    ``target``: ``boxes`` float32 [N, 4] xyxy pixels (tight boxes of the final masks),
    ``labels`` int64 [N] (1..K, the manifest's class indices), ``masks`` uint8 [N, H, W] at the
    image's exact size, ``image_id`` int64 (a stable hash of the ImageID), ``image_key`` (the
    ImageID string), ``area`` float32 [N] (mask pixels), ``iscrowd`` int64 [N] zeros.

    ``source``: a shard folder or URL (reads ``manifest.json``; without one, every ``*.tar`` in
    it), a brace pattern (``shards/train-{000000..000003}.tar``), a single tar, or a list of tar
    URLs; local or any fsspec URL (``s3://``). Rank and world size are read when the dataset is
    built (torch.distributed if initialised, else RANK / WORLD_SIZE) unless given.
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str],
        *,
        shuffle: int = 1000,
        resolve_occlusion: bool = True,
        train: bool = True,
        min_area: float = 0.0,
        epoch_samples: int | None = None,
        storage_options: dict[str, Any] | None = None,
        seed: int = 0,
        endpoint_url: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        decode_images: bool = True,
        pixel_budget: int = DEFAULT_PIXEL_BUDGET,
        shard_cache: str | os.PathLike | None = None,
        shard_cache_bytes: int | None = None,
    ) -> None:
        super().__init__()
        # Samples whose headers promise more than this many bytes decoded are skipped.
        self.pixel_budget = int(pixel_budget)
        # False hands over each JPEG undecoded (a 1-D uint8 tensor, its size in
        # target["image_size"]) for a batched GPU decode in the main process.
        self.decode_images = decode_images
        first = os.fspath(source[0] if isinstance(source, (list, tuple)) and source else source)
        # Plain, picklable data only: workers build their own filesystems from it.
        if storage_options is None:
            self.storage_options = sources.storage_options(first, endpoint_url)
        else:
            self.storage_options = dict(storage_options)
            if endpoint_url:
                self.storage_options["endpoint_url"] = endpoint_url
        self.urls, manifest = resolve_source(source, self.storage_options)
        self.source = source
        self.shuffle = int(shuffle)
        self.resolve_occlusion = resolve_occlusion
        self.train = train
        self.min_area = float(min_area)
        if epoch_samples is not None and epoch_samples < 1:
            raise ValueError("epoch_samples must be positive (or None for one pass over the data)")
        self.epoch_samples = epoch_samples
        self.seed = int(seed)
        detected_rank, detected_world = distributed_rank_and_world_size()
        self.rank = detected_rank if rank is None else int(rank)
        self.world_size = detected_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self._manifest_classes = manifest.get("classes") if manifest else None
        self._derived_classes: list[dict[str, Any]] | None = None
        self.num_samples: int | None = (
            sum(int(s.get("samples", 0)) for s in manifest["shards"])
            if manifest and len(manifest.get("shards", [])) == len(self.urls)
            else None
        )
        self.flip = RandomHorizontalFlip(0.5)
        self._epoch = -1
        # Remote shards with a manifest record (bytes, sha256) can be cached; local ones never.
        records = {
            str(r["name"]): r
            for r in (manifest or {}).get("shards", [])
            if isinstance(r, dict) and "name" in r
        }
        self.shard_cache = os.fspath(shard_cache) if shard_cache is not None else None
        self.shard_cache_bytes = shard_cache_bytes
        self._shard_records = {
            url: records[posixpath.basename(url)]
            for url in self.urls
            if posixpath.basename(url) in records
        }
        self._resume: dict[str, Any] | None = None  # a position to seek to (load_state_dict)
        self._live: _Stream | None = None  # the in-process iteration, for state_dict()

    # -- classes --

    @property
    def classes(self) -> list[dict[str, Any]]:
        """``[{"index", "mid", "name"}]``, index 0 = background: the manifest's, or (without a
        manifest) derived from the samples' JSON once, on first use, with MIDs as names."""
        if self._manifest_classes is not None:
            return self._manifest_classes
        if self._derived_classes is None:
            self._derived_classes = self._derive_classes()
        return self._derived_classes

    @property
    def num_classes(self) -> int:
        """K, the number of object classes (background not counted)."""
        return len(self.classes) - 1

    @property
    def class_names(self) -> list[str]:
        """Names by class index (``class_names[0] == "background"``)."""
        return [entry["name"] for entry in sorted(self.classes, key=lambda c: c["index"])]

    def _derive_classes(self) -> list[dict[str, Any]]:
        mids: dict[int, str] = {}
        members = _read_members(
            ({"url": url} for url in self.urls),
            _ShardOpener(self.storage_options),
            give_up_after=len(self.urls) + 1,
        )
        for member in members:
            if member and member["fname"].endswith(".json"):
                try:
                    for instance in json.loads(member["data"]).get("instances", []):
                        mids.setdefault(int(instance["class_index"]), str(instance["label"]))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a broken record: the sample itself is reported when it is read
        classes = [{"index": 0, "mid": None, "name": "background"}]
        for index in range(1, max(mids, default=0) + 1):
            mid = mids.get(index, "")
            classes.append({"index": index, "mid": mid, "name": mid or f"class {index}"})
        return classes

    # -- iteration --

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle the next iteration uses (else each one advances it)."""
        self._epoch = epoch - 1

    def __iter__(self) -> Iterator[Sample]:
        _, _, worker, num_workers = wds.utils.pytorch_worker_info()
        stream = self._stream(worker, num_workers)
        self._live = stream
        samples = (sample for _, sample in stream.samples())
        if self.epoch_samples is not None:
            count = _share(self.epoch_samples, worker, num_workers) - stream.yielded
            samples = itertools.islice(samples, max(count, 0))
        return samples

    # -- position (resume without replay) --

    def state_dict(self) -> dict[str, Any]:
        """Where the in-process iteration (``num_workers=0``) stands: ``{"epoch", "workers":
        {0: position}}``. Through DataLoader workers use ``make_loader(...).state_dict()``."""
        if self._live is None:
            return {"epoch": self._epoch + 1, "batches": 0, "workers": {}}
        return {"epoch": self._live.epoch, "batches": 0, "workers": {0: self._live.position()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Seek the next iteration to ``state`` (from ``state_dict``): the next ``iter()``
        continues epoch ``state["epoch"]`` where it stood, reading again only the shard it was
        in and the shards its shuffle buffer holds samples of; nothing before is decoded."""
        if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
            raise ValueError("not a ShardDataset state (no 'epoch')")
        self.set_epoch(state["epoch"])
        self._resume = dict(state) if state.get("workers") else None

    def _stream(self, worker: int, num_workers: int, offset_from_resume: bool = False) -> _Stream:
        """Advance the epoch and build this worker's stream, seeking if a position is pending.

        ``offset_from_resume``: the worker plays role ``(worker + batches) % num_workers`` of
        the saved run, so that a DataLoader (which starts at worker 0) hands out batches in the
        order the interrupted one would have.
        """
        self._epoch += 1
        role, position = worker, None
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == self._epoch:
            saved_workers = int(resume.get("num_workers", num_workers))
            if saved_workers != num_workers:
                raise ValueError(
                    f"the loader position was saved with {saved_workers} workers, this loader "
                    f"has {num_workers}"
                )
            if offset_from_resume:
                role = (worker + int(resume.get("batches", 0))) % num_workers
            workers = resume["workers"]
            position = workers.get(role, workers.get(str(role)))
        return _Stream(self, self._epoch, role, num_workers, position)

    def _shard_sequence(self, epoch: int, role: int, roles: int) -> Iterator[str]:
        """The shards one worker reads in an epoch: a pure function of the seeds, so a position
        is just how many of them were started."""
        if self.epoch_samples is None:
            # Same shard order on every rank (seeded by seed and epoch only), then partitioned.
            order = list(self.urls)
            if self.shuffle > 0:
                random.Random(wds.utils.make_seed(self.seed, epoch)).shuffle(order)
            mine = itertools.islice(order, self.rank, None, self.world_size)
            return itertools.islice(mine, role, None, roles)
        rng = random.Random(wds.utils.make_seed(self.seed, epoch, self.rank, role, 1))
        return (rng.choice(self.urls) for _ in itertools.count())

    def _opener(self) -> _ShardOpener:
        cache = None
        if self.shard_cache is not None:
            cache = ShardCache(self.shard_cache, self.shard_cache_bytes, self._shard_records)
        return _ShardOpener(self.storage_options, cache)

    def read_sample(self, key: str | None = None) -> Sample:
        """The sample with ImageID ``key`` (the first one if None), ground truth as ``train=False``
        gives it, found by reading the shards in order; only that sample is decoded."""
        members = _read_members(
            ({"url": url} for url in self.urls),
            _ShardOpener(self.storage_options),
            give_up_after=len(self.urls) + 1,
        )
        for raw in wds.tariterators.group_by_keys(members, handler=_warn_and_continue):
            if key is None or raw["__key__"] == key:
                try:
                    return self.assemble(raw)
                except Exception as error:
                    raise OistreamError(
                        f"sample {raw['__key__']} in {raw['__url__']} cannot be decoded: "
                        f"{type(error).__name__}: {_short(error)}"
                    ) from None
        where = self.source if isinstance(self.source, str) else f"{len(self.urls)} shards"
        if key is None:
            raise OistreamError(f"no samples in {where}")
        raise OistreamError(f"no sample with key {key} in {where}")

    # -- one sample --

    def _decode_sample(self, raw: dict[str, Any]) -> Sample | None:
        key, url = raw.get("__key__"), raw.get("__url__")
        try:
            return self.assemble(raw)
        except Exception as error:  # untrusted bytes can fail in many ways; skip, say which
            _warn(f"skipping sample {key} in {url}: {type(error).__name__}: {_short(error)}")
            return None

    def _check_budget(self, raw: dict[str, Any], instances: list[Any]) -> None:
        """Refuse a sample whose headers promise more decoded bytes than ``pixel_budget``."""
        width, height = _image_size(raw["jpg"], "the image")
        total = 3 * width * height + len(instances) * width * height
        for instance in instances:
            field = instance.get("mask") if isinstance(instance, dict) else None
            if isinstance(field, str) and field in raw:
                mask_width, mask_height = _image_size(raw[field], f"mask {field}")
                total += mask_width * mask_height
            if total > self.pixel_budget:
                break
        if total > self.pixel_budget:
            raise _BadSample(
                f"{len(instances)} masks on a {width}x{height} image would take over "
                f"{total / 2**20:.0f} MiB decoded, over the pixel budget of "
                f"{self.pixel_budget / 2**20:.0f} MiB"
            )

    def assemble(self, raw: dict[str, Any]) -> Sample:
        """One sample's members (``jpg``, ``json``, ``NNN.mask.png`` bytes) -> (image, target)."""
        key = str(raw["__key__"])
        for field in (IMAGE_FIELD, JSON_FIELD):
            if field not in raw:
                raise _BadSample(f"no .{field} member")
        record = json.loads(raw["json"])
        instances = record.get("instances", [])
        if not isinstance(instances, list):
            raise _BadSample("'instances' is not a list")
        self._check_budget(raw, instances)
        if self.decode_images:
            image = decode_image(raw["jpg"])
            height, width = int(image.shape[1]), int(image.shape[2])
        else:
            image, (height, width) = encoded_jpeg(raw["jpg"])
        if (record.get("width"), record.get("height")) != (width, height):
            # The JPEG is the truth: masks are resized to what the model will see.
            _warn(
                f"sample {key} in {raw.get('__url__')}: JSON says "
                f"{record.get('width')}x{record.get('height')}, the JPEG is {width}x{height}"
            )

        max_label = self.num_classes if self._manifest_classes is not None else None
        masks, labels = [], []
        for instance in instances:
            field = instance["mask"]
            if (
                not isinstance(field, str)
                or not MASK_FIELD_PATTERN.fullmatch(field)
                or field not in raw
            ):
                raise _BadSample(f"mask member {field!r} is missing")
            label = instance.get("class_index")
            if type(label) is not int:  # 1.9 or true must not quietly become class 1
                raise _BadSample(f"class_index {label!r} is not an integer")
            if label < 1 or (max_label is not None and label > max_label):
                raise _BadSample(f"class_index {label} is outside 1..{max_label}")
            masks.append(decode_mask_png(raw[field]))
            labels.append(label)

        planes, boxes, areas, kept = assemble_instances(
            masks, height, width, self.resolve_occlusion
        )
        masks_tensor = torch.from_numpy(planes)
        count = len(kept)
        target: Target = {
            "boxes": torch.from_numpy(boxes),
            # numpy's fancy index: a tenth of torch's cost on a handful of labels.
            "labels": torch.from_numpy(np.asarray(labels, np.int64)[kept]),
            "masks": masks_tensor,
            "image_id": torch.tensor(image_id_to_int(key), dtype=torch.int64),
            "image_key": key,
            "area": torch.from_numpy(areas),
            "iscrowd": torch.zeros(count, dtype=torch.int64),
        }
        if not self.decode_images:
            target["image_size"] = (height, width)
        return image, drop_small_instances(target, self.min_area)


def _image_size(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) from an image's header, nothing decoded: PNG and JPEG headers read
    directly, anything else by Pillow."""
    size = headers.image_size(data)
    if size is not None:
        return size
    try:
        with Image.open(io.BytesIO(data)) as probe:
            return probe.size
    except Exception as error:
        raise _BadSample(
            f"{what} has no readable image header: {type(error).__name__}: {_short(error)}"
        ) from None


class _Stream:
    """One worker's samples for one epoch, with a position that can be saved and restored.

    Pipeline: shard sequence -> raw samples (``(draw, index)`` names each: the ``draw``-th shard
    of the sequence, the ``index``-th sample in it) -> shuffle buffer of raw bytes -> decode ->
    random flip. The position is plain data: shards started, samples taken from the current
    one, the names of the samples in the shuffle buffer (and in the batcher's buckets), the
    shuffle's RNG state and the flip generator's state. Restoring reads again the current shard
    up to the position (undecoded) and the samples the buffer held; nothing else.
    """

    def __init__(
        self,
        dataset: ShardDataset,
        epoch: int,
        role: int,
        roles: int,
        position: dict[str, Any] | None,
    ) -> None:
        self.ds = dataset
        self.epoch, self.role = epoch, role
        self.seed = wds.utils.make_seed(dataset.seed, epoch, dataset.rank, role)
        self.opener = dataset._opener()
        self.urls = dataset._shard_sequence(epoch, role, roles)
        self.started: list[str] = []  # the shards of the sequence drawn so far
        self.taken = 0  # samples read from the current (last started) shard
        self.barren = 0
        self.buffer: list[tuple[int, int, dict[str, Any]]] = []
        self.rng = random.Random(self.seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.yielded = 0  # decoded samples handed on this epoch
        self.batches = 0  # batches handed on (the batcher counts)
        self.buckets: dict[bool, list[tuple[tuple[int, int, bool], Sample]]] = {True: [], False: []}
        self._current: Iterator[tuple[int, dict[str, Any]]] | None = None
        if position is not None:
            self._restore(position)

    # -- reading --

    def _shard_samples(self, url: str) -> Iterator[dict[str, Any]]:
        members = _read_members([{"url": url}], self.opener, give_up_after=2)
        return wds.tariterators.group_by_keys(members, handler=_warn_and_continue)

    def _raw(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        give_up_after = max(16, 2 * len(self.ds.urls))
        while True:
            if self._current is None:
                url = next(self.urls, None)
                if url is None:
                    return
                self.started.append(url)
                self.taken = 0
                self._current = enumerate(self._shard_samples(url))
            draw = len(self.started) - 1
            produced = False
            for index, raw in self._current:
                self.taken = index + 1
                produced = True
                yield draw, index, raw
            self._current = None
            self.barren = 0 if produced else self.barren + 1
            if self.barren >= give_up_after:
                raise OistreamError(
                    f"{self.barren} shards in a row had no readable sample "
                    f"(last: {self.started[-1]})"
                )

    def _shuffled(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """webdataset's shuffle (same buffer discipline), with its state kept on ``self``."""
        source = self._raw()
        size = self.ds.shuffle
        if size <= 0:
            yield from source
            return
        initial = min(100, size)
        for item in source:
            self.buffer.append(item)
            if len(self.buffer) < size:
                extra = next(source, None)
                if extra is not None:
                    self.buffer.append(extra)
            if len(self.buffer) >= initial:
                yield self._pick()
        while self.buffer:
            yield self._pick()

    def _pick(self) -> tuple[int, int, dict[str, Any]]:
        k = self.rng.randint(0, len(self.buffer) - 1)
        item = self.buffer[k]
        self.buffer[k] = self.buffer[-1]
        self.buffer.pop()
        return item

    def samples(self) -> Iterator[tuple[tuple[int, int, bool], Sample]]:
        """``((draw, index, flipped), sample)`` for each sample that decodes."""
        for draw, index, raw in self._shuffled():
            sample = self.ds._decode_sample(raw)
            if sample is None:
                continue
            flipped = False
            if self.ds.train:
                flipped = bool(torch.rand((), generator=self.generator).item() < self.ds.flip.p)
                if flipped:
                    sample = hflip(*sample)
            self.yielded += 1
            yield (draw, index, flipped), sample

    # -- position --

    def position(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "role": self.role,
            "epoch": self.epoch,
            "shards": len(self.started),
            "taken": self.taken,
            "buffer": [[draw, index] for draw, index, _ in self.buffer],
            "rng": [version, list(internal), gauss],
            "flip": self.generator.get_state(),
            "yielded": self.yielded,
            "batches": self.batches,
            "buckets": {
                name: [list(ident) for ident, _ in self.buckets[wide]]
                for name, wide in (("wide", True), ("tall", False))
            },
        }

    def _restore(self, position: dict[str, Any]) -> None:
        count = int(position["shards"])
        self.started = list(itertools.islice(self.urls, count))
        if len(self.started) != count:
            raise ValueError("the loader position lies past the end of its shard sequence")
        self.taken = int(position["taken"])
        bucketed = {
            wide: [tuple(ident) for ident in position["buckets"][name]]
            for name, wide in (("wide", True), ("tall", False))
        }
        wanted: dict[int, set[int]] = {}
        names = [(int(d), int(i)) for d, i in position["buffer"]]
        names += [(int(ident[0]), int(ident[1])) for ids in bucketed.values() for ident in ids]
        for draw, index in names:
            wanted.setdefault(draw, set()).add(index)
        found: dict[tuple[int, int], dict[str, Any]] = {}
        current = count - 1
        # A resampled sequence draws the same shard again and again: read each one once.
        by_url: dict[str, dict[int, list[int]]] = {}
        for draw in sorted(wanted):
            if draw != current:
                for index in wanted[draw]:
                    by_url.setdefault(self.started[draw], {}).setdefault(index, []).append(draw)
        for url, indices in by_url.items():
            last = max(indices)
            for index, raw in enumerate(self._shard_samples(url)):
                for draw in indices.get(index, ()):
                    found[(draw, index)] = raw
                if index >= last:
                    break
        if current >= 0:
            # Skip the current shard's samples up to the position (undecoded), then read on.
            samples = enumerate(self._shard_samples(self.started[current]))
            if self.taken > 0:
                for index, raw in samples:
                    if index in wanted.get(current, ()):
                        found[(current, index)] = raw
                    if index + 1 >= self.taken:
                        break
            self._current = samples
        missing = [name for name in names if name not in found]
        if missing:
            _warn(f"{len(missing)} samples of the saved position could not be read again")
        self.buffer = [
            (d, i, found[(d, i)]) for d, i in names[: len(position["buffer"])] if (d, i) in found
        ]
        version, internal, gauss = position["rng"]
        self.rng.setstate((int(version), tuple(int(x) for x in internal), gauss))
        self.generator.set_state(position["flip"])
        self.yielded = int(position["yielded"])
        self.batches = int(position["batches"])
        for wide, idents in bucketed.items():
            for draw, index, flipped in idents:
                if (draw, index) not in found:
                    continue
                sample = self.ds._decode_sample(found[(draw, index)])
                if sample is not None:
                    self.buckets[wide].append(
                        ((draw, index, bool(flipped)), hflip(*sample) if flipped else sample)
                    )


def _share(total: int, index: int, parts: int) -> int:
    """Part ``index``'s share when ``total`` items are dealt out to ``parts`` parts."""
    return total // parts + (1 if index < total % parts else 0)


# --- Batching ----------------------------------------------------------------------------------


def _batches(
    samples: Iterable[Sample], batch_size: int, group_by_aspect: bool, flush: bool
) -> Iterator[tuple[list[torch.Tensor], list[Target]]]:
    """Lists of ``batch_size`` samples; with ``group_by_aspect`` landscape (W >= H) and portrait
    images fill separate buckets and a bucket is emitted when full (detectron2's
    AspectRatioGroupedDataset). ``flush`` emits the leftovers at the end."""
    buckets: dict[bool, list[Sample]] = {True: [], False: []}
    for sample in samples:
        height, width = sample[1].get("image_size") or sample[0].shape[-2:]
        bucket = buckets[bool(width >= height) or not group_by_aspect]
        bucket.append(sample)
        if len(bucket) == batch_size:
            yield [s[0] for s in bucket], [s[1] for s in bucket]
            bucket.clear()
    if flush:
        for bucket in buckets.values():
            if bucket:
                yield [s[0] for s in bucket], [s[1] for s in bucket]


class _BatchedShards(IterableDataset):
    """Batches are built inside each worker: one IPC message per batch, not per sample.

    In epoch mode every rank yields exactly ``ceil(epoch_samples / batch_size)`` full batches
    (the shard stream is endless, so the count never depends on how the aspect buckets fill).
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, group_by_aspect: bool) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.group_by_aspect = group_by_aspect

    def batches_per_rank(self) -> int | None:
        samples = self.dataset.epoch_samples
        return None if samples is None else math.ceil(samples / self.batch_size)

    def __len__(self) -> int:
        count = self.batches_per_rank()
        if count is None:
            raise TypeError("a one-pass ShardDataset has no fixed number of batches")
        return count

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[Target], dict[str, Any]]]:
        """``(images, targets, position)``: the position is this worker's after the batch."""
        count = self.batches_per_rank()
        _, _, worker, num_workers = wds.utils.pytorch_worker_info()
        if count is None:
            for images, targets in _batches(
                self.dataset, self.batch_size, self.group_by_aspect, flush=True
            ):
                yield images, targets, {}
            return
        stream = self.dataset._stream(worker, num_workers, offset_from_resume=True)
        remaining = _share(count, stream.role, num_workers) - stream.batches
        buckets = stream.buckets
        for ident, sample in stream.samples():
            if remaining <= 0:
                return
            height, width = sample[1].get("image_size") or sample[0].shape[-2:]
            bucket = buckets[bool(width >= height) or not self.group_by_aspect]
            bucket.append((ident, sample))
            if len(bucket) == self.batch_size:
                images = [s[0] for _, s in bucket]
                targets = [s[1] for _, s in bucket]
                bucket.clear()
                stream.batches += 1
                remaining -= 1
                yield images, targets, stream.position()


def _keep_batch(batch: Any) -> Any:
    return batch


def _seed_worker(worker_id: int) -> None:
    """Distinct Python and NumPy RNGs per worker (torch's is already distinct), for any user
    code that draws from them; the loader's own draws are seeded by rank, worker and epoch."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    # Ctrl-C reaches the whole process group: the main process decides when to stop (a
    # trainer finishes its step first) and ends the workers. A scheduler's SIGTERM to the
    # group must still end a worker (DataLoader shutdown and multiprocessing's exit terminate
    # workers with it), but quietly: exit status 0 does not make torch's SIGCHLD handler abort
    # the main process in the middle of its step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)
    # Load the mask kernel (numba's on-disk cache: compiled once per machine) before the first
    # batch, so that batch is not seconds late.
    warm_up()


def _exit_quietly(number: int, frame: Any) -> None:
    os._exit(0)


class ShardLoader(DataLoader):
    """``make_loader``'s DataLoader: batches are ``(images, targets)``; its position can be
    saved (``state_dict``) and restored (``load_state_dict``) to resume an epoch mid-way.

    The state is plain data (ints, lists, one small tensor per worker), for ``torch.save``:
    ``{"epoch", "batches" (taken this epoch), "num_workers", "workers": {role: position}}``,
    each worker's position being the one after the last batch *taken from the loader* (not
    the ones prefetched). Restoring needs the same dataset, batch size and number of workers;
    the resumed epoch yields exactly the batches the interrupted one had left, in the same
    order, and the work to seek is one shard plus the shuffle buffer's samples per worker.
    """

    def __init__(self, batched: _BatchedShards, **options: Any) -> None:
        super().__init__(batched, **options)
        self._position: dict[str, Any] = {"epoch": None, "batches": 0, "workers": {}}

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[Target]]]:  # type: ignore[override]
        for images, targets, position in super().__iter__():
            if position:
                if position["epoch"] != self._position["epoch"]:
                    self._position = {"epoch": position["epoch"], "batches": 0, "workers": {}}
                self._position["workers"][int(position["role"])] = position
                self._position["batches"] += 1
            yield images, targets

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands (see the class); an epoch fully taken reads as the next
        epoch's start."""
        batched: _BatchedShards = self.dataset  # type: ignore[assignment]
        workers = max(self.num_workers, 1)
        state = self._position
        if state["epoch"] is None:
            return {
                "epoch": batched.dataset._epoch + 1,
                "batches": 0,
                "workers": {},
                "num_workers": workers,
            }
        total = batched.batches_per_rank()
        if total is not None and state["batches"] >= total:
            return {
                "epoch": state["epoch"] + 1,
                "batches": 0,
                "workers": {},
                "num_workers": workers,
            }
        return {**state, "workers": dict(state["workers"]), "num_workers": workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` on the next ``iter()`` (call it before the first one)."""
        if getattr(self, "_iterator", None) is not None:
            raise RuntimeError("load_state_dict must be called before the loader is iterated")
        batched: _BatchedShards = self.dataset  # type: ignore[assignment]
        if batched.batches_per_rank() is None and state.get("workers"):
            raise ValueError("a one-pass loader (epoch_samples=None) cannot seek mid-epoch")
        saved = int(state.get("num_workers", max(self.num_workers, 1)))
        if state.get("workers") and saved != max(self.num_workers, 1):
            raise ValueError(
                f"the loader position was saved with {saved} workers, this loader has "
                f"{max(self.num_workers, 1)}: use the same number of workers"
            )
        batched.dataset.load_state_dict(state)
        self._position = {
            "epoch": state["epoch"] if state.get("workers") else None,
            "batches": int(state.get("batches", 0)),
            "workers": {int(k): v for k, v in state.get("workers", {}).items()},
        }


def make_loader(
    dataset: ShardDataset,
    batch_size: int,
    num_workers: int = 0,
    group_by_aspect: bool = True,
    **dataloader_kwargs: Any,
) -> ShardLoader:
    """A DataLoader yielding ``(list of images, list of targets)`` batches.

    Workers are forked (the default on Linux): safe with s3fs because the dataset holds no
    filesystem object and each worker opens its own (pass ``multiprocessing_context="spawn"``
    to choose otherwise). Workers persist across epochs so each epoch reshuffles differently.
    In epoch mode ``len(loader)`` is the number of batches per rank, and the loader's
    ``state_dict()`` / ``load_state_dict()`` save and restore its position mid-epoch (the
    convention of torchdata's ``StatefulDataLoader``): see ``ShardLoader``.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    options: dict[str, Any] = {
        "batch_size": None,
        "collate_fn": _keep_batch,
        "num_workers": num_workers,
        "worker_init_fn": _seed_worker,
    }
    if num_workers > 0:
        options["persistent_workers"] = True
    else:
        warm_up()  # the main process decodes: load the kernel now, as each worker does
    options.update(dataloader_kwargs)
    return ShardLoader(_BatchedShards(dataset, batch_size, group_by_aspect), **options)
