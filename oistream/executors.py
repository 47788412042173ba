"""Where shard tasks run: a pool of local processes, or a Dask cluster.

Both run the same function (``shardjob.build_shard``) on the same plain-data tasks, so both give
the same shards. Each shard task opens its own filesystems; nothing crosses a fork.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace

from oistream.errors import OistreamError
from oistream.shardjob import JobContext, ShardResult, ShardTask, build_shard

ResultCallback = Callable[[ShardTask, ShardResult | BaseException], None]
ProgressCallback = Callable[[int, int, int], None]

_progress_queue: multiprocessing.Queue | None = None
_parent_pid: int | None = None


def _init_worker(progress_queue: multiprocessing.Queue, parent_pid: int) -> None:
    global _progress_queue, _parent_pid
    _progress_queue = progress_queue
    _parent_pid = parent_pid
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    """A worker idle on the pool's queue would outlive a killed parent (kill -9) forever."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _report_progress(samples: int, nbytes: int, failures: int) -> None:
    if os.getppid() != _parent_pid:
        # The run was killed: stop rather than keep writing shards nobody will publish.
        raise SystemExit("oistream: parent process is gone")
    if _progress_queue is not None:
        _progress_queue.put((samples, nbytes, failures))


def _build_in_worker(task: ShardTask, context: JobContext) -> ShardResult:
    return build_shard(task, context, _report_progress)


def run_local(
    tasks: Sequence[ShardTask],
    context: JobContext,
    processes: int,
    on_result: ResultCallback,
    on_progress: ProgressCallback | None = None,
) -> None:
    """Up to ``processes`` shards at a time, each in its own process with its share of requests."""
    if not tasks:
        return
    processes = max(1, min(processes, len(tasks)))
    if processes == 1:
        # One worker gains nothing from a process: build here and skip the spawn.
        for task in tasks:
            try:
                outcome: ShardResult | BaseException = build_shard(task, context, on_progress)
            except Exception as error:
                outcome = error
            on_result(task, outcome)
        return
    context = replace(context, concurrency=max(1, context.concurrency // processes))
    # spawn, not fork: the parent already holds s3fs clients and event loops.
    mp_context = multiprocessing.get_context("spawn")
    progress_queue = mp_context.Queue()
    stop_draining = threading.Event()

    def drain() -> None:
        while not stop_draining.is_set():
            try:
                samples, nbytes, failures = progress_queue.get(timeout=0.2)
            except queue_module.Empty:
                continue
            if on_progress is not None:
                on_progress(samples, nbytes, failures)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    try:
        with ProcessPoolExecutor(
            max_workers=processes,
            mp_context=mp_context,
            initializer=_init_worker,
            initargs=(progress_queue, os.getpid()),
        ) as pool:
            futures = {pool.submit(_build_in_worker, task, context): task for task in tasks}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    error = future.exception()
                    on_result(futures[future], error if error is not None else future.result())
    finally:
        stop_draining.set()
        drainer.join()
        progress_queue.close()


def run_dask(
    tasks: Sequence[ShardTask],
    context: JobContext,
    scheduler: str | None,
    on_result: ResultCallback,
) -> None:
    """Each shard is one task on the cluster; this process only plans and gathers stats."""
    if not tasks:
        return
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise OistreamError(
            "--executor dask needs dask.distributed: pip install 'oistream[dask]'"
        ) from None
    if not scheduler:
        raise OistreamError("--executor dask needs --scheduler ADDRESS (e.g. tcp://host:8786)")
    try:
        client = Client(scheduler, timeout="20s")
    except OSError as error:
        raise OistreamError(f"cannot reach the Dask scheduler at {scheduler}: {error}") from None
    try:
        futures = [
            client.submit(build_shard, task, context, key=f"oistream-{task.spec.name}", pure=False)
            for task in tasks
        ]
        task_of = {future.key: task for future, task in zip(futures, tasks, strict=True)}
        for future in as_completed(futures):
            task = task_of[future.key]
            try:
                outcome: ShardResult | BaseException = future.result()
            except Exception as error:
                outcome = error
            on_result(task, outcome)
    finally:
        client.close()
