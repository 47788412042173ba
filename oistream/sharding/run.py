"""`oistream shard`: catalog -> plan -> locate masks -> build shards -> manifest.

The planning side reads the class lists, streams the segmentation CSV, plans, and reads each
needed zip's central directory once; the executor builds the shards; this module then writes
``manifest.json``. Rerunning the same command skips shards already complete.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

import oistream
from oistream import sources
from oistream.errors import OistreamError, one_line
from oistream.format import FORMAT_VERSION, MANIFEST_NAME, progress_name
from oistream.sharding import catalog, executors
from oistream.sharding.fetch import RetryPolicy
from oistream.sharding.locate import locate_members
from oistream.sharding.options import MAX_LOCAL_PROCESSES, ShardOptions
from oistream.sharding.plan import Plan, make_plan
from oistream.sharding.shardjob import JobContext, ShardResult, ShardTask
from oistream.sharding.writer import Lease, OutputLocation, claim_output


@dataclass
class RunReport:
    """What a run did, for the summary: moved bytes and rates are not in the manifest."""

    manifest: dict[str, Any]
    shards_built: int = 0
    shards_skipped: int = 0
    bytes_requested: int = 0
    payload_bytes: int = 0
    requests: int = 0
    retries: int = 0
    mean_in_flight: float = 0.0
    seconds: float = 0.0
    directory_bytes: int = 0
    malformed_rows: int = 0
    errors: list[str] = field(default_factory=list)


def run_shard(options: ShardOptions) -> RunReport:
    """Shard one split of a selection into ``options.out`` and write its ``manifest.json``.

    Plans deterministically, claims the output folder for this plan (refusing foreign files,
    another plan's shards and a live run's lease unless ``overwrite``), skips shards already
    complete and verified, reads each needed mask zip's central directory once, builds the
    remaining shards on the chosen executor and writes the manifest last. Raises
    ``OistreamError`` (one line) for anything the user can fix or a rerun can finish; the
    output's lease is released however the run ends.
    """
    leases: list[Lease] = []
    try:
        return _run_shard(options, leases)
    finally:
        for lease in leases:
            lease.release()


def _run_shard(options: ShardOptions, leases: list[Lease]) -> RunReport:
    o = options
    classes, split, out = list(o.classes), o.split, o.out
    images, metadata, endpoint_url = o.images, o.metadata, o.endpoint_url
    if split not in sources.SPLITS:
        raise OistreamError(f"unknown split {split!r}; choose one of {', '.join(sources.SPLITS)}")
    if o.zip_index_cache:
        _check_cache_writable(o.zip_index_cache)
    retry = RetryPolicy(timeout=o.attempt_timeout, read_timeout=o.read_timeout)
    started = time.perf_counter()
    images_options = sources.storage_options(images, endpoint_url)
    metadata_options = sources.storage_options(metadata, endpoint_url)
    out_options = sources.storage_options(out, endpoint_url)

    known = catalog.load_classes(metadata, metadata_options)
    selected = catalog.resolve_classes(classes, known)
    table = catalog.read_segmentations(
        sources.segmentation_csv_url(metadata, split), [c.mid for c in selected], metadata_options
    )
    plan = make_plan(
        table,
        selected,
        split,
        per_class=o.per_class,
        max_images=o.max_images,
        samples_per_shard=o.samples_per_shard,
        seed=o.seed,
    )
    if not plan.shard_ids:
        raise OistreamError(
            f"no {split} images carry {', '.join(c.name for c in selected)}: nothing to shard"
        )

    location = OutputLocation(out, out_options)
    leases.append(_claim_output(location, plan, o.overwrite))
    report = RunReport(manifest={}, malformed_rows=table.malformed)
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for index, name in enumerate(plan.shard_names):
        done = _trusted_progress(location, name)
        if done is not None:
            results[name] = done
            report.shards_skipped += 1
        else:
            todo.append(index)

    if todo:
        _check_images_reachable(plan, images, images_options)
        images_read, images_read_options = sources.reading_location(images, images_options)
        metadata_read, metadata_read_options = sources.reading_location(metadata, metadata_options)
        located = locate_members(
            plan, metadata_read, metadata_read_options, cache_dir=o.zip_index_cache, retry=retry
        )
        report.directory_bytes = located.bytes_requested
        report.bytes_requested += located.bytes_requested
        report.requests += located.requests

        def task(index: int) -> ShardTask:
            spec = plan.shard(index)
            paths = (x["mask_path"] for sample in spec.samples for x in sample.instances)
            members = {p: located.members[p] for p in paths if p in located.members}
            return ShardTask(
                spec, members, located.zip_errors, located.zip_transient, located.zip_objects
            )

        # Made one by one as workers free up: a shard's records exist only while it is built.
        tasks = (task(index) for index in todo)
        total_samples = sum(len(plan.shard_ids[index]) for index in todo)
        context = JobContext(
            split=split,
            images_root=images_read,
            metadata_root=metadata_read,
            out_url=out,
            images_options=images_read_options,
            metadata_options=metadata_read_options,
            out_options=out_options,
            concurrency=o.concurrency,
            max_member_bytes=o.max_member_bytes,
            read_timeout=o.read_timeout,
            attempt_timeout=o.attempt_timeout,
        )
        _run_tasks(
            tasks,
            len(todo),
            total_samples,
            context,
            o.executor,
            o.scheduler,
            o.processes,
            o.show_progress,
            results,
            report,
        )

    report.seconds = time.perf_counter() - started
    if report.errors:
        raise OistreamError(
            f"{len(report.errors)} shard(s) failed ({report.errors[0]}); "
            "rerun the same command to finish them"
        )
    report.manifest = build_manifest(plan, results, images, metadata, table)
    location.write_json(MANIFEST_NAME, report.manifest)
    return report


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


def _check_cache_writable(directory: str) -> None:
    """A zip index cache that cannot be written would make every zip look unreadable."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".probe.{os.getpid()}.tmp")
        with open(probe, "wb") as f:
            f.write(b"oistream")
        os.remove(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OistreamError(
            f"--zip-index-cache {directory} is not a writable folder: {reason}"
        ) from None


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


def _check_images_reachable(plan: Plan, images: str, options: dict[str, Any]) -> None:
    """Stop at once, with one line, when the images root is wrong or unreachable.

    A single missing image is a per-sample failure; three planned images all missing, or any
    error other than not-found, means the root itself is wrong.
    """
    fs, _ = sources.filesystem(images, options)
    first_ids = plan.image_ids()[:3]
    for image_id in first_ids:
        url = sources.image_url(images, plan.split, image_id)
        try:
            fs.info(url)
            return
        except FileNotFoundError:
            continue
        except Exception as error:
            raise OistreamError(f"cannot reach images at {images}: {one_line(error)}") from None
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

    try:
        if executor == "local":
            workers = processes or min(os.cpu_count() or 1, MAX_LOCAL_PROCESSES)
            executors.run_local(tasks, task_count, context, workers, on_result, on_progress)
        elif executor == "dask":
            executors.run_dask(tasks, context, scheduler, on_result)
        else:
            raise OistreamError(f"unknown executor {executor!r}; choose local or dask")
    finally:
        bar.close()
    if fetch_seconds > 0:
        # Shards built side by side each report their own mean; their sum is the run's mean.
        processes_used = 1 if executor == "dask" else max(1, min(processes or 1, task_count))
        report.mean_in_flight = in_flight_weighted / fetch_seconds * processes_used


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
    per_class = plan.instances_per_class(excluding={f["image_id"] for f in failures})
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
            "instances_per_class": {names[mid]: per_class[mid] for mid in names},
            "failures": len(failures),
        },
        "failures": failures,
    }


def format_summary(report: RunReport, out: str) -> str:
    totals = report.manifest["totals"]
    lines = [
        f"wrote {totals['shards']} shard(s) to {out}: {totals['samples']} images, "
        f"{totals['instances']} instances, {totals['bytes'] / 1e6:.1f} MB"
        + (f" ({report.shards_skipped} already complete)" if report.shards_skipped else ""),
        "instances per class: "
        + ", ".join(f"{name} {count}" for name, count in totals["instances_per_class"].items()),
        f"moved {report.bytes_requested / 1e6:.1f} MB in {report.requests} requests "
        f"({report.directory_bytes / 1e6:.1f} MB of zip directories, {report.retries} retries) "
        f"in {report.seconds:.1f} s",
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


__all__ = ["RunReport", "ShardOptions", "build_manifest", "format_summary", "run_shard"]
