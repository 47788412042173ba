"""`oistream shard`: catalog -> plan -> locate masks -> build shards -> manifest.

The planning side reads the class lists, streams the segmentation CSV, plans, and reads each
needed zip's central directory once, all through the metadata cache (``cache.py``); the executor
builds the shards; this module then writes ``manifest.json``. Rerunning the same command skips
shards already complete.

Order matters for the output folder: every check that can fail before fetching (options,
classes, the CSV, the plan, a previous plan in the folder, the images root, the zips'
directories) runs first, for every split, and only then is a folder claimed. A rejected command
leaves ``--out`` as it was, and a dry run never touches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import os
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from tqdm import tqdm

import oistream
from oistream import sources
from oistream.errors import OistreamError, one_line, storage_reason
from oistream.format import FORMAT_VERSION, MANIFEST_NAME, PLAN_RECORD, progress_name
from oistream.sharding import annotations, classes, executors, preimport
from oistream.sharding.cache import CacheStats, MetadataCache, default_cache_dir
from oistream.sharding.fetch import Fetcher, FetchStats, RetryPolicy
from oistream.sharding.httpread import RequestCounter, RequestTally, head, probe
from oistream.sharding.locate import MemberLocations, locate_members
from oistream.sharding.options import DEFAULT_CACHE, ShardOptions, local_processes
from oistream.sharding.prefetch import ShardPrefetch
from oistream.sharding.remotezip import coalesce
from oistream.sharding.selection import read_image_ids
from oistream.sharding.shardjob import JobContext, ShardResult, ShardTask
from oistream.sharding.writer import (
    Lease,
    OutputLocation,
    claim_output,
    refuse_another_plan,
    refuse_foreign_files,
)

if TYPE_CHECKING:  # imported where used: numpy comes with them (see run_splits)
    from oistream.sharding import catalog
    from oistream.sharding.plan import Plan

T = TypeVar("T")

# A dry run estimates the images' bytes from this many HEADs (planned images, in hash order).
IMAGES_SAMPLED = 8
# Image and mask bytes fetched while the zips' directories are read (``prefetch.ShardPrefetch``)
# for the run's first shards, held until their jobs take them: about a thousand real Open
# Images JPEGs (~64 kB to a few MB each) with their masks, a small selection. On the 1%
# benchmark (940 images 100 ms away) the directories took 0.5 s in which no image was asked
# for, on the 20% one 1 s.
PREFETCH_BYTES = 256 * 2**20
# The zips' directories' share of --concurrency (the images fetched beside them get the rest):
# 16 zips of one to three requests each, the directory parts under their byte budget (at most
# 8 train directories of 3 parts at once). 64 left 1% benchmark runs with a mean of 74-75% in
# flight while images were fetched, 32 gave 74-77%.
LOCATE_CONCURRENCY = 32


@dataclass
class Estimate:
    """What a dry run expects a real run to move, from the plan and the zips' directories."""

    image_requests: int = 0
    image_bytes: float = 0.0  # images planned x mean size of the sampled ones
    images_sampled: int = 0
    mask_requests: int = 0
    mask_bytes: int = 0  # exact: the spans the fetcher will ask for
    shards_complete: int = 0


@dataclass
class RunReport:
    """What a run did, for the summary: moved bytes and rates are not in the manifest."""

    manifest: dict[str, Any]
    shards_built: int = 0
    shards_skipped: int = 0
    bytes_requested: int = 0  # everything fetched: CSV, class lists, directories, images, masks
    payload_bytes: int = 0
    requests: int = 0
    retries: int = 0
    mean_in_flight: float = 0.0
    seconds: float = 0.0
    directory_bytes: int = 0
    malformed_rows: int = 0
    errors: list[str] = field(default_factory=list)
    split: str = ""
    out: str = ""
    catalog_bytes: int = 0  # CSV and class list bodies fetched (not from the cache)
    cached_bytes: int = 0  # metadata read from the cache instead of the network
    warnings: list[str] = field(default_factory=list)
    estimate: Estimate | None = None  # set by a dry run, which builds no manifest
    planned: dict[str, Any] = field(default_factory=dict)  # counts of the plan (dry run)


@dataclass
class _Prepared:
    """One split, planned and checked, not yet claimed or fetched."""

    options: ShardOptions
    plan: Plan
    table: catalog.SegmentationTable
    location: OutputLocation
    report: RunReport
    results: dict[str, dict[str, Any]]
    todo: list[int]
    located: MemberLocations | None
    images: dict[str, bytes]  # image_id -> bytes fetched ahead (``PREFETCH_BYTES``)
    masks: dict[str, bytes]  # mask path -> PNG bytes fetched ahead
    images_options: dict[str, Any]
    metadata_options: dict[str, Any]
    out_options: dict[str, Any]


def run_shard(options: ShardOptions) -> RunReport:
    """Shard one split of a selection into ``options.out`` and write its ``manifest.json``.

    Plans deterministically and checks everything that can fail before fetching; then claims
    the output folder for this plan (refusing foreign files, another plan's shards and a live
    run's lease unless ``overwrite``), skips shards already complete and verified, builds the
    remaining shards on the chosen executor and writes the manifest last. Raises
    ``OistreamError`` (one line) for anything the user can fix or a rerun can finish; the
    output's lease is released however the run ends. With ``dry_run`` it stops after the checks
    and returns the plan's counts and an ``Estimate``.
    """
    if not isinstance(options.split, str):
        raise TypeError("run_shard takes one split; use run_splits for several")
    return run_splits(options)[0]


def split_list(split: str | Iterable[str]) -> list[str]:
    return [split] if isinstance(split, str) else list(split)


def run_splits(options: ShardOptions) -> list[RunReport]:
    """``options.split`` may name several splits: each goes to ``OUT/{split}`` (one plan,
    manifest and progress record each), the class lists read once; one split goes to ``OUT``
    itself, as with ``run_shard``. Every split is planned and checked before any is claimed."""
    splits = split_list(options.split)
    if not splits:
        raise OistreamError("no split given")
    for split in splits:
        if split not in sources.SPLITS:
            raise OistreamError(
                f"unknown split {split!r}; choose one of {', '.join(sources.SPLITS)}"
            )
    if len(set(splits)) != len(splits):
        raise OistreamError(f"a split is named twice in {' '.join(splits)}")
    _check_executor(options)
    started = time.perf_counter()
    # What the CSV's rows need (numpy with the catalog and plan) is imported on a thread while
    # the class lists are read: 0.1-0.2 s that no longer comes before the first request.
    preimport.import_in_background("oistream.sharding.plan")
    with contextlib.ExitStack() as stack:
        workers = None
        processes = _local_processes(options)
        if processes:
            workers = stack.enter_context(executors.LocalWorkers(processes))
        return _plan_and_run(options, splits, started, workers)


def _local_processes(options: ShardOptions) -> int:
    """How many worker processes to start before planning: 0 unless the local executor will
    build shards and the selection can fill more than one (one shard is built in this
    process, without a spawn)."""
    if options.executor != "local" or options.dry_run:
        return 0
    processes = local_processes(options.processes)
    most = options.max_images
    if options.per_class is not None and not options.expand_hierarchy:
        by_class = options.per_class * len(options.classes)
        most = by_class if most is None else min(most, by_class)
    if processes <= 1 or (most is not None and most <= options.samples_per_shard):
        return 0
    return processes


def _plan_and_run(
    options: ShardOptions,
    splits: list[str],
    started: float,
    workers: executors.LocalWorkers | None,
) -> list[RunReport]:
    """``run_splits`` once its arguments are checked and its workers (if any) are starting."""
    cache = MetadataCache(_usable_cache_dir(options.cache))
    whole_file_options = _whole_file_options(options)
    # The first split's CSV is opened (its HEAD; over HTTP its GET too) while the class lists
    # are read, which need the same round trips: they overlap instead of following each other.
    first_bar = _csv_bar(options, splits[0])
    first_csv = _OpenAhead(
        lambda: cache.open(
            sources.segmentation_csv_url(options.metadata, splits[0]),
            whole_file_options,
            progress=first_bar.update,
        )
    )
    with contextlib.closing(first_csv):
        known = classes.load_classes(
            options.metadata, whole_file_options, cat=lambda url: cache.cat(url, whole_file_options)
        )
        queries = list(options.classes)
        if options.expand_hierarchy:
            queries = annotations.expanded_queries(
                queries, known, options.metadata, whole_file_options, cache
            )
        selected = classes.resolve_classes(queries, known)

        # Fetched ahead and held until their shards are built, which follows at once for a
        # local run of one split: the one shard this process builds, or the first one of each
        # worker's (a Dask task would carry the bytes through the scheduler).
        fetch_ahead = 0
        if options.executor == "local" and not options.dry_run and len(splits) == 1:
            fetch_ahead = 1 if workers is None else workers.processes
        # The class lists were read once for all splits: the first split's report counts
        # them, with everything else the cache did from the start.
        first = {"csv": first_csv, "bar": first_bar, "counted_from": CacheStats()}
        prepared = []
        for index, split in enumerate(splits):
            out = options.out if len(splits) == 1 else sources.join(options.out, split)
            one = dataclasses.replace(options, split=split, out=out)
            extra = first if index == 0 else {}
            prepared.append(
                _prepare(
                    one,
                    selected,
                    cache,
                    fetch_ahead=fetch_ahead,
                    built_here=workers is None,
                    **extra,
                )
            )

    if options.dry_run:
        for item in prepared:
            _estimate(item)
            item.report.seconds = time.perf_counter() - started
        return [item.report for item in prepared]
    leases: list[Lease] = []
    try:
        for item in prepared:
            _execute(item, leases, workers)
            item.report.seconds = time.perf_counter() - started
    finally:
        for lease in leases:
            lease.release()
    return [item.report for item in prepared]


def resolve_cache_dir(cache: str | None) -> str | None:
    """The cache folder a run uses: ``DEFAULT_CACHE`` means ``$XDG_CACHE_HOME/oistream``."""
    if cache is None:
        return None
    return default_cache_dir() if cache == DEFAULT_CACHE else os.path.expanduser(cache)


def _usable_cache_dir(cache: str | None) -> str | None:
    """The cache folder, checked: a folder the user named must be writable (one line if not);
    an unwritable default one only costs speed (a warning, then no cache)."""
    directory = resolve_cache_dir(cache)
    if directory is None:
        return None
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".probe.{os.getpid()}.tmp")
        with open(probe, "wb") as f:
            f.write(b"oistream")
        os.remove(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        if cache != DEFAULT_CACHE:
            raise OistreamError(
                f"--cache (--zip-index-cache) {directory} is not a writable folder: {reason}"
            ) from None
        print(
            f"oistream shard: warning: the metadata cache {directory} is not writable "
            f"({reason}); running without it",
            file=sys.stderr,
        )
        return None
    return directory


def _check_executor(options: ShardOptions) -> None:
    if options.executor not in ("local", "dask"):
        raise OistreamError(f"unknown executor {options.executor!r}; choose local or dask")
    if options.executor == "dask" and not options.scheduler:
        raise OistreamError("--executor dask needs --scheduler ADDRESS (e.g. tcp://host:8786)")


class _Bar:
    """A tqdm bar made on first use, so a step with nothing to show prints nothing."""

    def __init__(self, show: bool, **kwargs: Any) -> None:
        self.show = show
        self.kwargs = kwargs
        self.bar: tqdm | None = None

    def update(self, n: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=total or None,
                disable=not self.show,
                file=sys.stderr,
                dynamic_ncols=True,
                **self.kwargs,
            )
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _warn(report: RunReport, message: str) -> None:
    report.warnings.append(message)
    print(f"oistream shard: warning: {message}", file=sys.stderr)


def _whole_file_options(o: ShardOptions) -> dict[str, Any]:
    """What this process reads whole (CSVs, class lists) gives up on a stalled server."""
    metadata_options = sources.storage_options(o.metadata, o.endpoint_url)
    return sources.with_read_timeout(o.metadata, metadata_options, o.read_timeout)


def _csv_bar(o: ShardOptions, split: str) -> _Bar:
    return _Bar(o.show_progress, desc=f"read {split} CSV", unit="B", unit_scale=True)


class _OpenAhead:
    """``open_file()`` started on a thread at once; ``take()`` hands its file over (or raises
    what opening raised), once. A file never taken is closed by ``close()`` as soon as it is
    open, without waiting for it: an unknown class is reported at once even while the CSV's
    server is slow to answer."""

    def __init__(self, open_file: Callable[[], BinaryIO]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="open-ahead")
        self._future = self._pool.submit(open_file)
        self._taken = False

    def take(self) -> BinaryIO:
        self._taken = True
        return self._future.result()

    def close(self) -> None:
        if not self._taken:
            self._taken = True
            self._future.add_done_callback(_close_opened)
        self._pool.shutdown(wait=False)


def _close_opened(opened: Future[BinaryIO]) -> None:
    if opened.exception() is None:
        opened.result().close()


def _prepare(
    o: ShardOptions,
    selected: list[classes.OIClass],
    cache: MetadataCache,
    *,
    csv: _OpenAhead | None = None,
    bar: _Bar | None = None,
    counted_from: CacheStats | None = None,
    fetch_ahead: int = 0,
    built_here: bool = True,
) -> _Prepared:
    """Plan one split and run every check that can fail before fetching; write nothing.

    ``csv`` is this split's CSV already being opened (with its progress ``bar``);
    ``counted_from`` the cache's counts this split's report starts from (default: now). The
    first ``fetch_ahead`` shards left to build have their images (up to ``PREFETCH_BYTES``)
    fetched while the zips' directories are read; a shard this process builds (``built_here``),
    when it is the only one, has each zip's masks fetched too (``_locate_and_prefetch``).
    """
    # Here rather than with this module: numpy comes with them, imported on a thread while
    # the class lists were read (run_splits).
    from oistream.sharding import catalog
    from oistream.sharding.plan import make_plan
    from oistream.sharding.rows import isin

    split, out = o.split, o.out
    images_options = sources.storage_options(o.images, o.endpoint_url)
    metadata_options = sources.storage_options(o.metadata, o.endpoint_url)
    whole_file_options = _whole_file_options(o)
    out_options = sources.storage_options(out, o.endpoint_url)
    before = counted_from if counted_from is not None else dataclasses.replace(cache.stats)

    wanted_ids = None
    if o.image_ids is not None:
        ids_options = sources.storage_options(o.image_ids, o.endpoint_url)
        wanted_ids = read_image_ids(
            o.image_ids, sources.with_read_timeout(o.image_ids, ids_options, o.read_timeout), split
        )
    csv_url = sources.segmentation_csv_url(o.metadata, split)
    if csv is None:
        bar = _csv_bar(o, split)
        csv = _OpenAhead(lambda: cache.open(csv_url, whole_file_options, progress=bar.update))
    assert bar is not None
    try:
        table = catalog.read_segmentations(
            csv_url,
            [c.mid for c in selected],
            whole_file_options,
            opener=csv.take,
            # Only the rows of images this selection can take are kept: memory follows it.
            selection=catalog.Selection(o.per_class, o.max_images, o.seed, wanted_ids),
        )
    finally:
        csv.close()
        bar.close()
    extra = None
    if wanted_ids is not None:
        rows = table.rows
        table = dataclasses.replace(table, rows=rows.take(isin(rows["ImageID"], wanted_ids)))
        extra = {"image_ids": {"count": len(wanted_ids), "sha256": _ids_digest(wanted_ids)}}
    plan = make_plan(
        table,
        selected,
        split,
        per_class=o.per_class,
        max_images=o.max_images,
        samples_per_shard=o.samples_per_shard,
        seed=o.seed,
        extra_parameters=extra,
    )
    if not plan.shard_ids:
        raise OistreamError(
            f"no {split} images carry {', '.join(c.name for c in selected)}"
            + (f" among the IDs of {o.image_ids}" if o.image_ids else "")
            + ": nothing to shard"
        )
    report = RunReport(manifest={}, malformed_rows=table.malformed, split=split, out=out)
    for oi_class, count in zip(selected, plan.images_per_class(set()).values(), strict=True):
        if count == 0:
            _warn(report, f"no {split} images carry {oi_class.name} ({oi_class.mid})")
    annotations.annotate_plan(
        plan, table, o.metadata, o.evaluation_annotations, whole_file_options, cache
    )

    location = OutputLocation(out, out_options)
    replacing = _previous_plan_differs(location, plan, o.overwrite)
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for index, name in enumerate(plan.shard_names):
        done = None if replacing else _trusted_progress(location, name)
        if done is not None:
            results[name] = done
            report.shards_skipped += 1
        else:
            todo.append(index)

    located, ahead = None, None
    if todo:
        metadata_read, metadata_read_options = sources.reading_location(
            o.metadata, metadata_options
        )
        bar = _Bar(o.show_progress, desc=f"{split} zip directories", unit="zip")
        # The images' root is checked while the directories are read: its round trip needs
        # nothing of theirs. Its failure is raised once they are read (and cached, if caching).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="images-check") as pool:
            reachable = pool.submit(
                _check_images_reachable,
                plan,
                o.images,
                sources.with_read_timeout(o.images, images_options, o.read_timeout),
                # A dry run fetches no body byte: it HEADs, as its estimate does.
                head if o.dry_run else probe,
            )
            try:
                located, ahead = _run_event_loop(
                    _locate_and_prefetch(
                        o,
                        plan,
                        metadata_read,
                        metadata_read_options,
                        images_options,
                        cache,
                        lambda total: bar.update(1, total),
                        todo[:fetch_ahead],
                        built_here and len(todo) == 1,
                    )
                )
            finally:
                bar.close()
            checked = reachable.result()
        prefetched = ahead.stats if ahead is not None else FetchStats()
        report.requests += checked.requests + prefetched.requests
        report.retries += checked.retries + prefetched.retries
        report.bytes_requested += prefetched.bytes
        report.directory_bytes = located.bytes_requested
        report.bytes_requested += located.bytes_requested
        report.requests += located.requests
        report.retries += located.retries
    after = cache.stats
    report.catalog_bytes += after.fetched_bytes - before.fetched_bytes
    report.bytes_requested += after.fetched_bytes - before.fetched_bytes
    report.cached_bytes += after.cached_bytes - before.cached_bytes
    report.requests += after.requests - before.requests
    report.retries += after.retries - before.retries
    report.planned = _plan_counts(plan)
    return _Prepared(
        o,
        plan,
        table,
        location,
        report,
        results,
        todo,
        located,
        ahead.images if ahead is not None else {},
        ahead.masks if ahead is not None else {},
        images_options,
        metadata_options,
        out_options,
    )


async def _locate_and_prefetch(
    o: ShardOptions,
    plan: Plan,
    metadata_root: str,
    metadata_options: dict[str, Any],
    images_options: dict[str, Any],
    cache: MetadataCache,
    on_directory: Callable[[int], None],
    shard_indexes: list[int],
    with_masks: bool,
) -> tuple[MemberLocations, ShardPrefetch | None]:
    """The masks' places in their zips and, on the same loop, the images of shards
    ``shard_indexes`` (``prefetch.ShardPrefetch``), the two sharing ``--concurrency``.

    ``with_masks`` (one shard, built by this process): each zip's masks are fetched as soon as
    its directory is in, and the prefetch goes on past the directories with all of
    ``--concurrency``. Without (the first shard of each worker): images only, until the last
    directory is in, so the workers start at once.
    """
    ahead = None
    if shard_indexes and o.concurrency > LOCATE_CONCURRENCY:
        images_root, images_read_options = sources.reading_location(o.images, images_options)
        metadata = None
        if with_masks:
            metadata_fs = await sources.open_async_filesystem(metadata_root, metadata_options)
            metadata = (metadata_fs, metadata_root)
        ahead = ShardPrefetch(
            Fetcher(concurrency=o.concurrency - LOCATE_CONCURRENCY, retry=_retry_policy(o)),
            PREFETCH_BYTES,
            plan.split,
            # Interleaved: each worker's first shard gets its share of what arrives in time.
            _interleaved([plan.shard_ids[index] for index in shard_indexes]),
            plan.shard_mask_paths(shard_indexes[0]) if with_masks else [],
            images=(
                await sources.open_async_filesystem(images_root, images_read_options),
                images_root,
            ),
            metadata=metadata,
            max_member_bytes=o.max_member_bytes,
        )
    located = locate_members(
        plan,
        metadata_root,
        metadata_options,
        min(LOCATE_CONCURRENCY, o.concurrency),
        retry=_retry_policy(o),
        cache=cache.zip_directories,
        on_directory=on_directory,
        on_zip=None if ahead is None else ahead.zip_located,
    )
    if ahead is None:
        return await located, None
    ahead_fetcher = ahead.fetcher

    async def locate_then_lend() -> MemberLocations:
        try:
            return await located
        finally:
            if with_masks:  # the directories' share of --concurrency goes to the masks
                ahead_fetcher.widen(o.concurrency - ahead_fetcher.concurrency)
            else:  # the workers take over
                ahead.stop()

    try:
        members, _ = await asyncio.gather(
            locate_then_lend(), ahead.fetch_images(o.concurrency - LOCATE_CONCURRENCY)
        )
        await ahead.wait()
    finally:
        for fs in ahead.filesystems:
            await sources.close_async_filesystem(fs)
    return members, ahead


def _interleaved(lists: list[list[str]]) -> list[str]:
    """The first of each list, then the second of each, and so on."""
    return [item for group in itertools.zip_longest(*lists) for item in group if item is not None]


def _run_event_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coroutine)`` with the result kept out of the main task's repr.

    On its way out ``asyncio.run`` puts SIGINT's handler back; CPython 3.10-3.11's
    ``signal.signal`` then tries the old handler (a partial holding the main task) as a
    ``Handlers`` value, and the ValueError it raises and catches formats the task, whose repr
    holds the full repr of its result. Returning 43k located members that way cost 0.16 s of a
    20% run, between the last directory read and the first shard started.
    """
    kept: list[T] = []

    async def keep() -> None:
        kept.append(await coroutine)

    asyncio.run(keep())
    return kept[0]


def _retry_policy(o: ShardOptions) -> RetryPolicy:
    return RetryPolicy(timeout=o.attempt_timeout, read_timeout=o.read_timeout)


def _ids_digest(ids: set[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def _plan_counts(plan: Plan) -> dict[str, Any]:
    names = {c.mid: c.name for c in plan.classes}
    return {
        "shards": len(plan.shard_ids),
        "samples": plan.num_samples,
        "images_per_class": {names[m]: n for m, n in plan.images_per_class(set()).items()},
        "instances_per_class": {names[m]: n for m, n in plan.instances_per_class(set()).items()},
    }


def _estimate(item: _Prepared) -> None:
    """A dry run's expectations: exact mask spans from the directories, images from HEADs."""
    plan, estimate = item.plan, Estimate()
    estimate.shards_complete = item.report.shards_skipped
    todo_ids = [image_id for index in item.todo for image_id in plan.shard_ids[index]]
    estimate.image_requests = len(todo_ids)
    images = item.options.images
    timed = sources.with_read_timeout(images, item.images_options, item.options.read_timeout)
    fs, _ = sources.filesystem(*sources.reading_location(images, timed))
    tally = RequestTally()
    sizes = []
    for image_id in todo_ids[:IMAGES_SAMPLED]:
        url = sources.reading_location(sources.image_url(images, plan.split, image_id), timed)[0]
        try:
            size = head(fs, url, tally).get("size")
        except FileNotFoundError:
            continue
        except Exception as error:
            raise OistreamError(f"cannot reach images at {images}: {one_line(error)}") from None
        if size is not None:  # a server that gave no Content-Length tells nothing
            sizes.append(int(size))
    estimate.images_sampled = len(sizes)
    item.report.requests += tally.requests
    item.report.retries += tally.retries
    if sizes:
        estimate.image_bytes = sum(sizes) / len(sizes) * len(todo_ids)
    if item.located is not None:
        # As the shard jobs will ask: each sample's members coalesced on their own.
        for index in item.todo:
            for sample in plan.shard(index).samples:
                members = [
                    item.located.members[path]
                    for _, path in sample.masks
                    if path in item.located.members
                ]
                for start, end, _ in coalesce(members):
                    estimate.mask_requests += 1
                    estimate.mask_bytes += end - start
    item.report.estimate = estimate


def _execute(
    item: _Prepared, leases: list[Lease], workers: executors.LocalWorkers | None = None
) -> None:
    """Claim the folder, build the shards still to do, write the manifest."""
    o, plan, report, results = item.options, item.plan, item.report, item.results
    lease = _claim_output(item.location, plan, o.overwrite)
    leases.append(lease)
    gone = lease.took_over
    if gone is not None and gone.get("host") != lease.record["host"]:
        _warn(
            report,
            f"took over {o.out} from a run on host {gone.get('host', '?')} (pid "
            f"{gone.get('pid', '?')}) that last renewed its lease at {gone.get('renewed', '?')}",
        )
    if item.todo:
        assert item.located is not None
        located = item.located
        images_read, images_read_options = sources.reading_location(o.images, item.images_options)
        metadata_read, metadata_read_options = sources.reading_location(
            o.metadata, item.metadata_options
        )

        def task(index: int) -> ShardTask:
            spec = plan.shard(index)
            paths = [path for sample in spec.samples for _, path in sample.masks]
            members = {p: located.members[p] for p in paths if p in located.members}
            # What was fetched ahead for this shard leaves the run's hands with its task.
            images = {
                s.image_id: item.images.pop(s.image_id)
                for s in spec.samples
                if s.image_id in item.images
            }
            masks = {p: item.masks.pop(p) for p in paths if p in item.masks}
            return ShardTask(
                spec,
                members,
                located.zip_errors,
                located.zip_transient,
                located.zip_objects,
                images=images,
                masks=masks,
            )

        # Made one by one as workers free up: a shard's records exist only while it is built.
        tasks = (task(index) for index in item.todo)
        total_samples = sum(len(plan.shard_ids[index]) for index in item.todo)
        context = JobContext(
            split=plan.split,
            images_root=images_read,
            metadata_root=metadata_read,
            out_url=o.out,
            images_options=images_read_options,
            metadata_options=metadata_read_options,
            out_options=item.out_options,
            concurrency=o.concurrency,
            max_member_bytes=o.max_member_bytes,
            read_timeout=o.read_timeout,
            attempt_timeout=o.attempt_timeout,
        )
        _run_tasks(
            tasks,
            len(item.todo),
            total_samples,
            context,
            o.executor,
            o.scheduler,
            o.processes,
            o.show_progress,
            results,
            report,
            workers,
        )
    if report.errors:
        raise OistreamError(
            f"{len(report.errors)} shard(s) failed ({report.errors[0]}); "
            "rerun the same command to finish them"
        )
    report.manifest = build_manifest(plan, results, o.images, o.metadata, item.table)
    if plan.evaluation_record is not None:
        report.manifest.update(plan.evaluation_record)
    item.location.write_json(MANIFEST_NAME, report.manifest)


def _previous_plan_differs(location: OutputLocation, plan: Plan, overwrite: bool) -> bool:
    """Read-only, before anything is fetched: refuse (one line) what claiming would refuse, so
    a doomed run stops before it reads the directories; True when ``overwrite`` replaces
    another plan's shards (their progress records must then not be trusted)."""
    names = location.listing()
    refuse_foreign_files(location, names, overwrite)
    previous = location.read_json(PLAN_RECORD) if PLAN_RECORD in names else None
    return refuse_another_plan(location, previous, plan.plan_hash, overwrite)


def _claim_output(location: OutputLocation, plan: Plan, overwrite: bool = False) -> Lease:
    """Refuse foreign files, another plan's shards or a live run's lease (writer.claim_output);
    remember this plan for reruns (in ``PLAN_RECORD``)."""
    return claim_output(
        location,
        {
            "plan_hash": plan.plan_hash,
            "split": plan.split,
            "parameters": plan.parameters,
            "shards": plan.shard_names,
        },
        overwrite,
    )


def _trusted_progress(location: OutputLocation, name: str) -> dict[str, Any] | None:
    """The progress record of a complete shard whose file still matches it, else None.

    A shard whose size or sha256 no longer matches its record (replaced, truncated) is
    rebuilt; a record that is not one is an error naming its file.
    """
    record_name = progress_name(name)
    if not location.exists(name):
        return None
    done = location.read_json(record_name)
    if done is None:
        return None
    stats = done.get("stats") if isinstance(done, dict) else None
    if not (
        isinstance(stats, dict)
        and stats.get("name") == name
        and type(stats.get("bytes")) is int
        and isinstance(stats.get("sha256"), str)
        and isinstance(done.get("failures"), list)
    ):
        raise OistreamError(
            f"{location.url}/{record_name} is not a progress record of {name}; delete it to "
            "redo that shard"
        )
    if location.verify(stats) is not None:
        return None
    return done


def _check_images_reachable(
    plan: Plan,
    images: str,
    options: dict[str, Any],
    ask: Callable[[Any, str, RequestCounter], dict[str, Any]],
) -> RequestTally:
    """Stop at once, with one line, when the images root is wrong or unreachable; return the
    requests it took.

    A single missing image is a per-sample failure; three planned images all missing, or any
    error other than not-found (after the retries of ``ask``: ``httpread.probe`` or ``head``),
    means the root itself is wrong. Anonymous S3 is asked by plain HTTP, as the shard jobs will
    ask it (an s3fs client costs ~0.1 s to make).
    """
    fs, _ = sources.filesystem(*sources.reading_location(images, options))
    counted = RequestTally()
    first_ids = plan.image_ids()[:3]
    for image_id in first_ids:
        url = sources.reading_location(sources.image_url(images, plan.split, image_id), options)[0]
        try:
            ask(fs, url, counted)
            return counted
        except FileNotFoundError:
            continue
        except Exception as error:
            raise OistreamError(
                f"cannot reach images at {images}: {storage_reason(error)}"
            ) from None
    raise OistreamError(
        f"no planned image found under {images}/{plan.split}/ (tried {len(first_ids)}): "
        "wrong --images URL?"
    )


def _run_tasks(
    tasks: Iterable[ShardTask],
    task_count: int,
    total_samples: int,
    context: JobContext,
    executor: str,
    scheduler: str | None,
    processes: int | None,
    show_progress: bool,
    results: dict[str, dict[str, Any]],
    report: RunReport,
    workers: executors.LocalWorkers | None = None,
) -> None:
    bar = tqdm(
        total=total_samples,
        unit="img",
        desc=f"shard {context.split}",
        disable=not show_progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    counters = {"bytes": 0, "failures": 0}
    in_flight_weighted = 0.0
    fetch_seconds = 0.0

    def on_progress(samples: int, nbytes: int, failures: int) -> None:
        counters["bytes"] += nbytes
        counters["failures"] += failures
        bar.update(samples)
        bar.set_postfix(
            MB=f"{counters['bytes'] / 1e6:.0f}", failures=counters["failures"], refresh=False
        )

    def on_result(task: ShardTask, outcome: ShardResult | BaseException) -> None:
        nonlocal in_flight_weighted, fetch_seconds
        if isinstance(outcome, BaseException):
            report.errors.append(f"{task.spec.name}: {one_line(outcome)}")
            return
        results[task.spec.name] = {
            "stats": asdict(outcome.stats),
            "failures": outcome.failures,
            "payload_bytes": outcome.payload_bytes,
        }
        report.shards_built += 1
        report.bytes_requested += outcome.bytes_requested
        report.payload_bytes += outcome.payload_bytes
        report.requests += outcome.requests
        report.retries += outcome.retries
        in_flight_weighted += outcome.mean_in_flight * outcome.seconds
        fetch_seconds += outcome.seconds
        if executor == "dask":  # no per-image progress from the cluster: advance per shard
            on_progress(len(task.spec.samples), outcome.payload_bytes, len(outcome.failures))

    local = workers.processes if workers is not None else local_processes(processes)
    try:
        if executor == "local":
            executors.run_local(tasks, task_count, context, local, on_result, on_progress, workers)
        elif executor == "dask":
            executors.run_dask(tasks, context, scheduler, on_result)
        else:
            raise OistreamError(f"unknown executor {executor!r}; choose local or dask")
    finally:
        bar.close()
    if fetch_seconds > 0:
        # Shards built side by side each report their own mean; their sum is the run's mean.
        side_by_side = 1 if executor == "dask" else max(1, min(local, task_count))
        report.mean_in_flight = in_flight_weighted / fetch_seconds * side_by_side


def build_manifest(
    plan: Plan,
    results: dict[str, dict[str, Any]],
    images: str,
    metadata: str,
    table: catalog.SegmentationTable,
) -> dict[str, Any]:
    """Deterministic: no times or hosts, so an interrupted and resumed run writes the same file."""
    shards = []
    failures = []
    for name in plan.shard_names:
        result = results[name]
        shards.append(result["stats"])
        failures.extend(result["failures"])
    left_out = {f["image_id"] for f in failures}
    per_class = plan.instances_per_class(excluding=left_out)
    images_per_class = plan.images_per_class(excluding=left_out)
    names = {c.mid: c.name for c in plan.classes}
    return {
        "format_version": FORMAT_VERSION,
        "oistream_version": oistream.__version__,
        "sources": {"images": images, "metadata": metadata},
        "split": plan.split,
        "classes": plan.manifest_classes(),
        "selection": plan.parameters,
        "plan_hash": plan.plan_hash,
        "catalog": {
            "csv_rows": table.total_rows,
            "malformed_rows": table.malformed,
            "duplicate_rows": table.duplicates,
        },
        "shards": shards,
        "totals": {
            "shards": len(shards),
            "samples": sum(s["samples"] for s in shards),
            "instances": sum(s["instances"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "images_per_class": {names[mid]: images_per_class[mid] for mid in names},
            "instances_per_class": {names[mid]: per_class[mid] for mid in names},
            "failures": len(failures),
        },
        "failures": failures,
    }


def _mb(nbytes: float) -> str:
    """Bytes in the unit that keeps small metadata visible: kB below a megabyte, then MB, GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 1e3:.1f} kB"


def _per_class_line(images: dict[str, int], instances: dict[str, int]) -> str:
    return "images (instances) per class: " + ", ".join(
        f"{name} {images.get(name, 0)} ({count})" for name, count in instances.items()
    )


def _moved_line(report: RunReport) -> str:
    return (
        f"moved {_mb(report.bytes_requested)} in {report.requests} requests "
        f"(CSV and class lists {_mb(report.catalog_bytes)}, zip directories "
        f"{_mb(report.directory_bytes)}, {report.retries} retries) in {report.seconds:.1f} s; "
        f"{_mb(report.cached_bytes)} of metadata came from the cache"
    )


def format_summary(report: RunReport, out: str) -> str:
    """The lines `oistream shard` prints at the end of a run (or of a dry run)."""
    if report.estimate is not None:
        return format_dry_run(report, out)
    totals = report.manifest["totals"]
    lines = [
        f"wrote {totals['shards']} shard(s) to {out}: {totals['samples']} images, "
        f"{totals['instances']} instances, {_mb(totals['bytes'])}"
        + (f" ({report.shards_skipped} already complete)" if report.shards_skipped else ""),
        _per_class_line(totals["images_per_class"], totals["instances_per_class"]),
        _moved_line(report),
    ]
    if report.malformed_rows:
        lines.append(f"skipped {report.malformed_rows} malformed CSV row(s)")
    duplicates = report.manifest.get("catalog", {}).get("duplicate_rows", 0)
    if duplicates:
        lines.append(f"dropped {duplicates} repeated CSV row(s)")
    if totals["failures"]:
        first = report.manifest["failures"][0]
        lines.append(
            f"{totals['failures']} image(s) left out, listed in manifest.json "
            f"(first: {first['image_id']}: {first['reason']})"
        )
    return "\n".join(lines)


def format_dry_run(report: RunReport, out: str) -> str:
    """What a dry run found: the plan's counts and the bytes a real run would move."""
    planned, estimate = report.planned, report.estimate
    assert estimate is not None
    lines = [
        f"dry run, {report.split}: {planned['samples']} images in {planned['shards']} shard(s) "
        f"for {out}"
        + (f" ({estimate.shards_complete} already complete)" if estimate.shards_complete else ""),
        _per_class_line(planned["images_per_class"], planned["instances_per_class"]),
        f"a run would fetch {estimate.image_requests} images, about "
        f"{_mb(estimate.image_bytes)} (mean of {estimate.images_sampled} HEADs), and "
        f"{_mb(estimate.mask_bytes)} of masks in {estimate.mask_requests} range requests",
        "planning " + _moved_line(report)[0].lower() + _moved_line(report)[1:],
        "nothing fetched or written; run without --dry-run to shard",
    ]
    if report.malformed_rows:
        lines.append(f"skipped {report.malformed_rows} malformed CSV row(s)")
    return "\n".join(lines)


__all__ = [
    "Estimate",
    "RunReport",
    "ShardOptions",
    "build_manifest",
    "format_dry_run",
    "format_summary",
    "run_shard",
    "run_splits",
]
