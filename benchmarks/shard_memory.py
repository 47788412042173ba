"""Peak memory of `oistream shard` at two subset sizes (issue 3: below 1 GB, not growing).

The fake bucket of ``shard_bytes.py`` (94,000 train images) is served by nginx behind the
delaying proxy (``--latency``, default 0.1 s, so that requests pile up in flight
as they would against S3). ``python -m oistream shard`` runs on a 2% and a 20% subset
(``--max-images``, classes Person, Car, Traffic light, Traffic sign, default concurrency and
processes; 2% rather than 1% because a 1% subset is a single shard, which the command builds
in its own process without a worker pool: a different process layout, not a smaller
workload) while this script samples, every 20 ms, the resident set size (RSS) of the whole
process tree: the command and its worker processes. Printed per subset: the peak of the tree's
summed RSS (an upper bound: pages shared between processes count once per process), the peak
of its summed PSS (each shared page split among its sharers: the tree's real footprint,
sampled every 0.25 s), the peak RSS of the parent, of a worker and of multiprocessing's
resource tracker; then the ratio of the two tree peaks.

Marks: the tree's peak below 1 GB (10^9 bytes) at both sizes, and not growing with the subset:
the larger subset's peak within 20% of the smaller one's, for 10 times the images.

Without psutil the script falls back to ``getrusage(RUSAGE_CHILDREN)``: the peak of the largest
single process only (the kernel keeps no peak for a sum), and says so.

Run: ``.venv/bin/python benchmarks/shard_memory.py [--fractions 0.01 0.1]``
(needs nginx: ``apt-get install nginx-light``).
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _bucket
import _nginx
import _procs
from _report import format_bytes, verdict
from shard_throughput import anonymous_environment, ours_command

from oistream.sharding.options import DEFAULT_CONCURRENCY
from oistream.testing.proxy import Proxy

LIMIT_BYTES = 1_000_000_000
ALLOWED_GROWTH = 1.20
SAMPLE_SECONDS = 0.02
PSS_SAMPLE_SECONDS = 0.25


@dataclass
class Peak:
    tree_rss: int  # peak of the summed RSS of the command and all its descendants
    tree_pss: int | None  # peak of the summed PSS (shared pages split among their sharers)
    by_role: dict[str, int]  # peak RSS of the parent, of any worker, of helper processes
    processes: int  # most processes seen at once
    seconds: float
    method: str


def _role(process: object, root_pid: int) -> str:
    if getattr(process, "pid", None) == root_pid:
        return "parent"
    try:
        command = " ".join(process.cmdline())  # type: ignore[attr-defined]
    except Exception:
        return "other"
    if "resource_tracker" in command:
        return "resource tracker"
    return "worker" if "multiprocessing" in command else "other"


def _peak_with_psutil(command: list[str], env: dict[str, str], cwd: Path) -> Peak:
    import psutil

    started = time.perf_counter()
    root = psutil.Popen(
        command,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # so that an interrupt can kill its workers with it
    )
    tree_peak = most = 0
    pss_peak: int | None = None
    by_role: dict[str, int] = {}
    roles: dict[int, str] = {}
    next_pss = 0.0
    try:
        while root.poll() is None:
            processes = [root]
            with contextlib.suppress(psutil.Error):
                processes += root.children(recursive=True)
            # PSS needs /proc/PID/smaps (~25 ms a process with torch loaded): sampled less often.
            want_pss = time.perf_counter() >= next_pss
            total = total_pss = 0
            for process in processes:
                with contextlib.suppress(psutil.Error):
                    if process.pid not in roles:
                        roles[process.pid] = _role(process, root.pid)
                    if want_pss:
                        info = process.memory_full_info()
                        total_pss += info.pss
                    else:
                        info = process.memory_info()
                    total += info.rss
                    role = roles[process.pid]
                    by_role[role] = max(by_role.get(role, 0), info.rss)
            tree_peak = max(tree_peak, total)
            if want_pss:
                pss_peak = max(pss_peak or 0, total_pss)
                next_pss = time.perf_counter() + PSS_SAMPLE_SECONDS
            most = max(most, len(processes))
            time.sleep(SAMPLE_SECONDS)
        _, stderr = root.communicate()
    except BaseException:
        _procs.kill_group(root.pid)
        root.wait()
        raise
    if root.returncode != 0:
        raise RuntimeError(f"oistream shard exited {root.returncode}:\n{stderr[-3000:]!r}")
    return Peak(
        tree_peak,
        pss_peak,
        by_role,
        most,
        time.perf_counter() - started,
        "psutil: RSS every 20 ms, PSS every 0.25 s",
    )


def _peak_with_rusage(command: list[str], env: dict[str, str], cwd: Path) -> Peak:
    started = time.perf_counter()
    result = _procs.run_command(command, env, cwd)
    if result.returncode != 0:
        raise RuntimeError(f"oistream shard exited {result.returncode}:\n{result.stderr[-3000:]}")
    # ru_maxrss is in kB on Linux and covers the largest descendant waited for so far.
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return Peak(
        largest, None, {}, 0, time.perf_counter() - started, "getrusage: largest process only"
    )


def peak_memory(command: list[str], env: dict[str, str], cwd: Path) -> Peak:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return _peak_with_rusage(command, env, cwd)
    return _peak_with_psutil(command, env, cwd)


def main() -> None:
    parser = _bucket.bench_parser(__doc__)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds added per request")
    parser.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="ours: --concurrency"
    )
    parser.add_argument("--processes", type=int, default=None, help="ours: --processes")
    parser.add_argument("--fractions", type=float, nargs=2, default=[0.02, 0.20])
    args = parser.parse_args()
    bucket = _bucket.prepare_bench(args)
    train_images = bucket["splits"]["train"]["images"]
    print(f"bucket: {bucket['root']} ({train_images} train images)")
    env = anonymous_environment()
    peaks = []
    with contextlib.ExitStack() as stack:
        nginx = stack.enter_context(_nginx.Nginx(bucket["root"]))
        proxy = stack.enter_context(Proxy(nginx.url, latency=args.latency, process=True))
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.workdir)))
        for fraction in args.fractions:
            max_images = max(1, round(fraction * train_images))
            command = ours_command(proxy.url, work / f"out-{fraction}", max_images, args)
            peak = peak_memory(command, env, work)
            if not peaks:
                print(
                    f"latency {args.latency * 1000:.0f} ms, --concurrency {args.concurrency}, "
                    f"--processes {args.processes or 'default'}"
                )
            peaks.append(peak)
            pss = f"{format_bytes(peak.tree_pss)}" if peak.tree_pss is not None else "n/a"
            roles = ", ".join(
                f"{role} {format_bytes(n)}" for role, n in sorted(peak.by_role.items())
            )
            print(
                f"subset {fraction:.0%} (--max-images {max_images}): {peak.seconds:.1f} s, up to "
                f"{peak.processes} processes\n"
                f"  peak RSS of the process tree {format_bytes(peak.tree_rss)} "
                f"{verdict(peak.tree_rss < LIMIT_BYTES)} (mark < {format_bytes(LIMIT_BYTES)})\n"
                f"  peak PSS of the tree (shared pages counted once) {pss}; "
                f"peak RSS per process: {roles} ({peak.method})",
                flush=True,
            )
    small, large = peaks
    growth = large.tree_rss / small.tree_rss
    print(
        f"peak ratio {args.fractions[1]:.0%} / {args.fractions[0]:.0%}: {growth:.2f} "
        f"(mark: <= {ALLOWED_GROWTH:.2f}) {verdict(growth <= ALLOWED_GROWTH)}"
    )
    if small.tree_pss and large.tree_pss:
        print(f"  PSS ratio {large.tree_pss / small.tree_pss:.2f}")
    for role in sorted(set(small.by_role) & set(large.by_role)):
        print(f"  {role}: RSS ratio {large.by_role[role] / small.by_role[role]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
