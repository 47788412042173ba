"""Build one shard: fetch its images and mask members concurrently, write them in plan order.

This runs wherever the executor puts it (a local worker process or a Dask worker), so it takes
only plain, picklable data and opens its own filesystems: s3fs is not fork-safe.
"""

from __future__ import annotations

import asyncio
import io
import json
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from oistream import headers, sources
from oistream.format import progress_name
from oistream.sharding.fetch import (
    Fetcher,
    MissingObject,
    ObjectTooLarge,
    RetryPolicy,
)
from oistream.sharding.options import (
    DEFAULT_ATTEMPT_TIMEOUT,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_MEMBER_BYTES,
    DEFAULT_READ_TIMEOUT,
)
from oistream.sharding.remotezip import CorruptMember, ZipMember, fetch_members
from oistream.sharding.specs import SampleSpec, ShardSpec
from oistream.sharding.writer import OutputLocation, ShardStats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_START = b"\xff\xd8"
JPEG_END = b"\xff\xd9"


@dataclass
class JobContext:
    """What every shard task needs to know, as plain data."""

    split: str
    images_root: str
    metadata_root: str
    out_url: str
    images_options: dict[str, Any]
    metadata_options: dict[str, Any]
    out_options: dict[str, Any]
    concurrency: int = DEFAULT_CONCURRENCY
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    read_timeout: float = DEFAULT_READ_TIMEOUT
    attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT


@dataclass
class ShardTask:
    spec: ShardSpec
    # mask_path -> where it sits in its zip; a mask absent here is missing from its zip.
    members: dict[str, ZipMember]
    # zip prefix -> why that whole zip could not be read (missing object, bad central directory)
    zip_errors: dict[str, str] = field(default_factory=dict)
    # zip prefix -> why it could not be read this time: the shard is left for a rerun
    zip_transient: dict[str, str] = field(default_factory=dict)
    # zip prefix -> (size, ETag) its directory was read under
    zip_objects: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    # image_id -> the image's bytes, and mask path -> the mask's PNG bytes, fetched ahead
    # (``prefetch.ShardPrefetch``); the job fetches the rest
    images: dict[str, bytes] = field(default_factory=dict)
    masks: dict[str, bytes] = field(default_factory=dict)


@dataclass
class ShardResult:
    stats: ShardStats
    failures: list[dict[str, str]]
    payload_bytes: int = 0
    requests: int = 0
    retries: int = 0
    bytes_requested: int = 0
    mean_in_flight: float = 0.0
    seconds: float = 0.0


class SampleFailure(Exception):
    """A problem with one image or one of its masks: recorded in the manifest, sample left out."""


class ShardIncomplete(Exception):
    """A transient or environmental problem: the shard is not published, a rerun redoes it."""


ProgressCallback = Callable[[int, int, int], None]  # (samples done, bytes written, failures)


def build_shard(
    task: ShardTask, context: JobContext, progress: ProgressCallback | None = None
) -> ShardResult:
    """Fetch one shard's images and mask members (one event loop, ``context.concurrency``
    requests in flight), write the tar in plan order and publish it with its progress record.

    Per-image failures (a missing image or mask, a corrupt member) leave that image out and are
    returned in ``ShardResult.failures``; anything else raises and leaves no shard behind.
    ``progress(samples, bytes, failures)`` is called as images complete. A fresh event loop
    and filesystems per call; ``ShardRunner`` keeps them across the shards of one process.
    """
    with ShardRunner() as runner:
        return runner.build(task, context, progress)


class ShardRunner:
    """Builds shards one after another on one event loop, keeping the filesystems it opened
    (and so their pools of open connections) from one shard to the next.

    A process that builds many shards would otherwise open ``concurrency`` new connections
    (TCP, and TLS on real storage) per filesystem per shard and ramp its window up again each
    time. Not thread-safe: one runner per thread. ``close`` (or leaving a ``with`` block)
    closes the filesystems and the loop.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._filesystems: dict[str, Any] = {}

    def __enter__(self) -> ShardRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def build(
        self, task: ShardTask, context: JobContext, progress: ProgressCallback | None = None
    ) -> ShardResult:
        """``build_shard`` on this runner's loop and filesystems."""
        return self._loop.run_until_complete(_build_shard(task, context, progress, self._open))

    async def _open(self, root: str, options: dict[str, Any]) -> Any:
        key = json.dumps([root, options], sort_keys=True, default=repr)
        fs = self._filesystems.get(key)
        if fs is None:
            fs = self._filesystems[key] = await sources.open_async_filesystem(root, options)
        return fs

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            for fs in self._filesystems.values():
                self._loop.run_until_complete(sources.close_async_filesystem(fs))
            self._filesystems.clear()
            leftover = asyncio.all_tasks(self._loop)
            for task in leftover:
                task.cancel()
            if leftover:
                self._loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
        finally:
            self._loop.close()


async def _build_shard(
    task: ShardTask,
    context: JobContext,
    progress: ProgressCallback | None,
    open_filesystem: Callable[[str, dict[str, Any]], Awaitable[Any]],
) -> ShardResult:
    loop = asyncio.get_running_loop()
    started = loop.time()
    images_fs = await open_filesystem(context.images_root, context.images_options)
    metadata_fs = await open_filesystem(context.metadata_root, context.metadata_options)
    fetcher = Fetcher(
        concurrency=context.concurrency,
        retry=RetryPolicy(timeout=context.attempt_timeout, read_timeout=context.read_timeout),
    )
    location = OutputLocation(context.out_url, context.out_options)

    async def fetch_sample(sample: SampleSpec) -> dict[str, bytes]:
        return await _fetch_sample(sample, task, context, fetcher, images_fs, metadata_fs)

    failures: list[dict[str, str]] = []
    samples = iter(task.spec.samples)
    # Samples are fetched up to `lookahead` ahead of the one being written: enough to keep the
    # fetcher's slots full (a sample is about two requests), bounded so memory stays flat.
    lookahead = max(8, context.concurrency)
    pending: deque[asyncio.Task[dict[str, bytes]]] = deque()
    specs: deque[SampleSpec] = deque()

    def schedule_next() -> None:
        sample = next(samples, None)
        if sample is not None:
            specs.append(sample)
            pending.append(asyncio.ensure_future(fetch_sample(sample)))

    def record_progress(stats: ShardStats) -> None:
        location.write_json(
            progress_name(task.spec.name),
            {"stats": asdict(stats), "failures": failures, "payload_bytes": shard.payload_bytes},
        )

    for _ in range(lookahead):
        schedule_next()
    try:
        with location.shard(task.spec.name, record_progress) as shard:
            while pending:
                sample = specs.popleft()
                try:
                    fields = await pending.popleft()
                except SampleFailure as failure:
                    failures.append({"image_id": sample.image_id, "reason": str(failure)})
                    fields = None
                schedule_next()
                if fields is not None:
                    shard.add(sample.image_id, fields, instances=len(sample.masks))
                if progress is not None:
                    progress(
                        1, sum(len(v) for v in fields.values()) if fields else 0, fields is None
                    )
    finally:
        for leftover in pending:
            leftover.cancel()
        if pending:
            # Let the cancelled fetches unwind (their requests released) before the next shard.
            await asyncio.gather(*pending, return_exceptions=True)
    stats = fetcher.stats
    return ShardResult(
        stats=shard.stats,
        failures=failures,
        payload_bytes=shard.payload_bytes,
        requests=stats.requests,
        retries=stats.retries,
        bytes_requested=stats.bytes,
        mean_in_flight=stats.mean_in_flight,
        seconds=loop.time() - started,
    )


async def _fetch_sample(
    sample: SampleSpec,
    task: ShardTask,
    context: JobContext,
    fetcher: Fetcher,
    images_fs: Any,
    metadata_fs: Any,
) -> dict[str, bytes]:
    prefix = sample.image_id[0]
    if prefix in task.zip_transient:
        raise ShardIncomplete(f"{sample.image_id}: {task.zip_transient[prefix]}")
    given: dict[str, bytes | Exception] = {}
    needed = []
    for _, mask_path in sample.masks:
        prefetched_mask = task.masks.pop(mask_path, None)
        if prefetched_mask is not None:
            given[mask_path] = prefetched_mask
            continue
        member = task.members.get(mask_path)
        if member is None:
            zip_error = task.zip_errors.get(prefix)
            if zip_error:
                raise SampleFailure(f"mask {mask_path}: {zip_error}")
            raise SampleFailure(f"mask {mask_path} is missing from its zip")
        needed.append(member)
    image_path = images_fs._strip_protocol(
        sources.image_url(context.images_root, context.split, sample.image_id)
    )
    prefetched = task.images.pop(sample.image_id, None)
    image_request = (
        _fetch_image(fetcher, images_fs, image_path) if prefetched is None else _given(prefetched)
    )
    if needed:
        zip_path = metadata_fs._strip_protocol(
            sources.mask_zip_url(context.metadata_root, context.split, prefix)
        )
        size, etag = task.zip_objects.get(prefix, (None, None))
        masks_request = fetch_members(
            fetcher,
            metadata_fs,
            zip_path,
            needed,
            object_size=size,
            etag=etag,
            max_member_bytes=context.max_member_bytes,
        )
        image, masks = await asyncio.gather(image_request, masks_request)
        masks.update(given)
    else:
        image, masks = await image_request, given
    width, height = _jpeg_size(image, sample.image_id)
    fields: dict[str, bytes] = {"jpg": image}
    for field_name, mask_path in sample.masks:
        data = masks[mask_path]
        if isinstance(data, MissingObject):
            raise SampleFailure(f"mask {mask_path} is missing: {data}")
        if isinstance(data, CorruptMember):
            raise SampleFailure(f"mask {mask_path} is corrupt: {data}")
        if isinstance(data, Exception):
            raise data  # a transport failure after retries: the shard fails, the run can resume
        _check_png(data, mask_path)
        fields[field_name] = data
    fields["json"] = sample.record_json(context.split, width, height)
    return fields


async def _given(data: bytes) -> bytes:
    return data


async def _fetch_image(fetcher: Fetcher, fs: Any, path: str) -> bytes:
    try:
        return await fetcher.cat(fs, path)
    except MissingObject as missing:
        raise SampleFailure(f"image {path} is missing: {missing}") from None
    except ObjectTooLarge as large:
        raise SampleFailure(f"image {path} is too large: {large}") from None


def _jpeg_size(data: bytes, image_id: str) -> tuple[int, int]:
    """Reads the header only: decoding every image would cost more CPU than the whole fetch.
    The frame header is read directly (a few us); Pillow (122 us a JPEG) only when it does
    not say."""
    if not (data.startswith(JPEG_START) and data.rstrip(b"\0").endswith(JPEG_END)):
        raise SampleFailure(f"image {image_id}.jpg is not a complete JPEG")
    size = headers.jpeg_size(data)
    if size is not None:
        return size
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception as error:
        raise SampleFailure(f"image {image_id}.jpg is corrupt: {error}") from None


def _check_png(data: bytes, name: str) -> None:
    """Signature and every chunk's CRC: catches damaged masks without decoding them."""
    if not data.startswith(PNG_SIGNATURE):
        raise SampleFailure(f"mask {name} is not a PNG")
    view = memoryview(data)
    offset = len(PNG_SIGNATURE)
    seen_end = False
    while offset + 12 <= len(data):
        length = int.from_bytes(view[offset : offset + 4], "big")
        chunk_end = offset + 12 + length
        if chunk_end > len(data):
            break
        chunk = view[offset + 4 : offset + 8 + length]
        crc = int.from_bytes(view[offset + 8 + length : chunk_end], "big")
        if zlib.crc32(chunk) != crc:
            raise SampleFailure(f"mask {name} is corrupt (chunk CRC mismatch)")
        if bytes(view[offset + 4 : offset + 8]) == b"IEND":
            seen_end = True
            break
        offset = chunk_end
    if not seen_end:
        raise SampleFailure(f"mask {name} is truncated")


__all__ = ["JobContext", "ShardResult", "ShardRunner", "ShardTask", "build_shard"]
