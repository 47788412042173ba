"""Where shard tasks run: a pool of local processes, or a Dask cluster.

Both run the same function (``shardjob.build_shard``) on the same plain-data tasks, so both give
the same shards. Each shard task opens its own filesystems; nothing crosses a fork.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace

from oistream.errors import OistreamError
from oistream.exiting import leave_now
from oistream.sharding.shardjob import (
    JobContext,
    ProgressCallback,
    ShardResult,
    ShardRunner,
    ShardTask,
    build_shard,
)

ResultCallback = Callable[[ShardTask, ShardResult | BaseException], None]

_progress_queue: multiprocessing.Queue | None = None
_parent_pid: int | None = None


def _init_worker(progress_queue: multiprocessing.Queue, parent_pid: int) -> None:
    global _progress_queue, _parent_pid
    _progress_queue = progress_queue
    _parent_pid = parent_pid
    # Ctrl-C reaches the whole process group; the parent decides (it ends the workers, see
    # LocalWorkers.__exit__) and says so in one line, where each worker printed a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    # Run last of multiprocessing's exit finalizers (after the runner's close and the progress
    # queue's flush, priorities 10 and -5): the interpreter's teardown that would follow cost
    # each worker 0.2 s at the end of every run, while the parent waited for it.
    multiprocessing.util.Finalize(None, leave_now, args=(0,), exitpriority=-100)


def _exit_with_parent(parent_pid: int) -> None:
    """A worker idle on the pool's queue would outlive a killed parent (kill -9) forever."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


# A worker sends its progress at most this often (and when a shard ends): one queue message
# per image cost a pickle and a pipe write each, on the worker's share of the CPU.
PROGRESS_INTERVAL = 0.2
_unsent = [0, 0, 0]  # samples, bytes, failures not yet sent
_last_sent = 0.0


def _report_progress(samples: int, nbytes: int, failures: int) -> None:
    global _last_sent
    if os.getppid() != _parent_pid:
        # The run was killed: stop rather than keep writing shards nobody will publish.
        raise SystemExit("oistream: parent process is gone")
    _unsent[0] += samples
    _unsent[1] += nbytes
    _unsent[2] += failures
    now = time.monotonic()
    if now - _last_sent >= PROGRESS_INTERVAL:
        _last_sent = now
        _send_progress()


def _send_progress() -> None:
    if _progress_queue is not None and any(_unsent):
        _progress_queue.put(tuple(_unsent))
    _unsent[:] = [0, 0, 0]


_runner: ShardRunner | None = None


def _build_in_worker(task: ShardTask, context: JobContext) -> ShardResult:
    """One shard on this worker's runner: its loop and connections outlive the shard."""
    global _runner
    if _runner is None:
        _runner = ShardRunner()
        # Closed as the worker exits (multiprocessing runs these finalizers, not atexit).
        multiprocessing.util.Finalize(None, _runner.close, exitpriority=10)
    try:
        return _runner.build(task, context, _report_progress)
    finally:
        _send_progress()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this process meanwhile (only the main thread may change it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _warm_up() -> None:
    """Nothing: unpickling this function in a new worker imports this module and with it the
    shard job's (aiohttp, s3fs, Pillow): ~0.8 s of CPU a worker, paid while the parent plans."""


class LocalWorkers:
    """A pool of ``processes`` spawned worker processes for shard tasks, started at once.

    Made before the plan (``run.run_splits`` does), so the workers' start-up overlaps reading
    the CSV and the zip directories instead of following them; used by ``run_local`` for
    every split of the run; ``close`` (or leaving a ``with`` block) stops them.
    """

    def __init__(self, processes: int) -> None:
        self.processes = processes
        # spawn, not fork: the parent already holds s3fs clients and event loops.
        mp_context = multiprocessing.get_context("spawn")
        self._progress_queue = mp_context.Queue()
        self.on_progress: ProgressCallback | None = None
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        self.pool = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=mp_context,
            initializer=_init_worker,
            initargs=(self._progress_queue, os.getpid()),
        )
        # A pool spawns a worker per submitted task until it has ``processes``: one each. They
        # are born ignoring SIGINT (an ignored signal stays ignored across exec), so Ctrl-C
        # during their imports, before _init_worker runs, prints no traceback either.
        with _sigint_ignored():
            for _ in range(processes):
                self.pool.submit(_warm_up)

    def _drain(self) -> None:
        while True:
            message = self._progress_queue.get()
            if message is None:  # close's wake-up call: the workers are gone
                return
            if self.on_progress is not None:
                self.on_progress(*message)

    def __enter__(self) -> LocalWorkers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is not None:
            # Interrupted or failed: shards being built are not waited for (their partial
            # files are removed by the next run, as after a kill).
            self.terminate()
        self.close()

    def terminate(self) -> None:
        """End the worker processes now (SIGTERM)."""
        # ProcessPoolExecutor has no public way to do this before Python 3.14.
        for process in list((getattr(self.pool, "_processes", None) or {}).values()):
            if process.is_alive():
                process.terminate()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self._drainer.is_alive():
            # A message rather than a polled flag: polling made every run wait up to 0.2 s.
            self._progress_queue.put(None)
            self._drainer.join()
        self._progress_queue.close()


def run_local(
    tasks: Iterable[ShardTask],
    task_count: int,
    context: JobContext,
    processes: int,
    on_result: ResultCallback,
    on_progress: ProgressCallback | None = None,
    workers: LocalWorkers | None = None,
) -> None:
    """Up to ``processes`` shards at a time, each in its own process with its share of requests.

    ``tasks`` is consumed lazily, one task per free worker (plus one queued each), so only the
    shards being built have their records in memory. ``workers``, when given, is a pool
    started earlier (its size then stands for ``processes``); without it one is made for this
    call, or, for a single process, the shards are built here.
    """
    if task_count == 0:
        return
    if workers is not None:
        processes = workers.processes
    processes = max(1, min(processes, task_count))
    if processes == 1 and workers is None:
        # One worker gains nothing from a process: build here and skip the spawn.
        with ShardRunner() as runner:  # one loop and one set of connections for all shards
            for task in tasks:
                try:
                    outcome: ShardResult | BaseException = runner.build(task, context, on_progress)
                except Exception as error:
                    outcome = error
                on_result(task, outcome)
        return
    context = replace(context, concurrency=max(1, context.concurrency // processes))
    with contextlib.ExitStack() as stack:
        if workers is None:
            workers = stack.enter_context(LocalWorkers(processes))
        workers.on_progress = on_progress
        try:
            in_flight: dict[Future[ShardResult], ShardTask] = {}
            waiting = iter(tasks)
            while True:
                for task in itertools.islice(waiting, 2 * processes - len(in_flight)):
                    in_flight[workers.pool.submit(_build_in_worker, task, context)] = task
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    task = in_flight.pop(future)
                    error = future.exception()
                    on_result(task, error if error is not None else future.result())
        finally:
            workers.on_progress = None


def run_dask(
    tasks: Iterable[ShardTask],
    context: JobContext,
    scheduler: str | None,
    on_result: ResultCallback,
) -> None:
    """Each shard is one task on the cluster; this process only plans and gathers stats."""
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
        # Keep the cluster busy with a bounded number of submitted shards, topping it up as
        # each finishes, so the client never holds every shard's records at once.
        window = max(8, 2 * sum(client.nthreads().values()))
        waiting = iter(tasks)
        task_of = {}
        completed = as_completed()
        for task in itertools.islice(waiting, window):
            future = client.submit(build_shard, task, context, key=_task_key(task))
            task_of[future.key] = task
            completed.add(future)
        for future in completed:
            task = task_of.pop(future.key)
            try:
                outcome: ShardResult | BaseException = future.result()
            except Exception as error:
                outcome = error
            on_result(task, outcome)
            for task in itertools.islice(waiting, 1):
                future = client.submit(build_shard, task, context, key=_task_key(task))
                task_of[future.key] = task
                completed.add(future)
    finally:
        client.close()


def _task_key(task: ShardTask) -> str:
    """Unique per run: Dask would hand back another run's result for a reused key."""
    return f"oistream-{task.spec.name}-{uuid.uuid4().hex[:12]}"
