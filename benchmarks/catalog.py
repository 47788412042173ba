"""Peak memory and CPU of the catalog against pandas' whole-file read (issue 16).

A synthetic segmentation CSV with the real file's row widths (16-hex ImageIDs, MIDs of 350
classes, 6-decimal boxes, PredictedIoU sometimes empty, 1-20 click triples: ~300 bytes a row,
~2.85 rows an image, rows of one image scattered over the file) is written once under
``--workdir`` and reused. Four classes (Person, Car, Traffic light, Traffic sign, in proportions
60/25/10/5) hold ``--fractions`` of the rows. Each measurement runs in a fresh process, which
reports its own peak RSS (``VmHWM``, interpreter and imports included) and the CPU seconds
(user + system) of the read alone; each read runs ``--rounds`` times (default 2), interleaved,
and the least CPU of each is kept (pandas' figure alone moved 13.5-16.1 s between single runs):

* ``bounded``: ``read_segmentations(..., selection=Selection(per_class=N))``, what ``oistream
  shard --per-class N`` does; its plan (the selected images) is checked against the unbounded
  table's plan from the same run.
* ``unbounded``: the same read keeping every row of the four classes (no selection).
* ``pandas``: ``pandas.read_csv`` of the whole file, then the rows of the four classes.

Marks, at the largest size: the bounded read peaks below 200 MB at every fraction; the whole CSV
scans at least 2x faster than pandas' read. The issue asks that of ``--per-class N``, so the
mark is pandas CPU / bounded CPU (the read ``oistream shard --per-class`` does, which scans every
line); pandas CPU / unbounded CPU (every row of the four classes parsed, validated and kept) is
printed beside it.

The default sizes are 672,500 rows (1x) and 2,690,000 (4x, the real train CSV's row count); the
4x file is ~0.8 GB and pandas needs ~2.5 GB of memory to read it. ``--rows 2690000`` makes the
real count the 1x size (4x: 3.3 GB, ~10 GB for pandas). The machine's load average is printed
with every line: CPU seconds are steadier than wall seconds on a busy machine, but not immune.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/catalog.py [--rows N] [--fractions 0.1 0.5]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PER_CLASS_DEFAULT = 1000
MEMORY_MARK = 200 * 10**6
SPEED_MARK = 2.0
ROWS_PER_IMAGE = 2.85  # train: 2,686,666 masks on 944,037 images
SELECTED = {"/m/01g317": 0.60, "/m/0k4j": 0.25, "/m/015qff": 0.10, "/m/01mqdt": 0.05}
HEADER = "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks"
_CHUNK_ROWS = 200_000

# The measuring child: one job, its own figures as one JSON line on stdout.
_CHILD = r"""
import hashlib, json, os, sys
mode, path, per_class, mids = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
import numpy as np
if mode == "pandas":
    import pandas as pd
else:  # ours does without pandas (rows.Rows), so its peak carries none of pandas' imports
    from oistream.sharding.catalog import Selection, read_segmentations
    from oistream.sharding.classes import OIClass
    from oistream.sharding.plan import select_images
start = os.times()
if mode == "pandas":
    frame = pd.read_csv(path)
    rows = frame[frame["LabelName"].isin(mids)]
else:
    selection = Selection(per_class=per_class) if mode == "bounded" else None
    table = read_segmentations(path, mids, selection=selection)
    rows = table.rows
end = os.times()
# VmHWM, not ru_maxrss: Linux carries the parent's peak over into ru_maxrss across exec.
status = open("/proc/self/status").read().split("VmHWM:")[1]
peak = int(status.split()[0]) * 1024
selected = ""
if mode != "pandas":
    classes = [OIClass(m, m) for m in mids]
    ids = select_images(table, classes, per_class, None, 0)
    selected = hashlib.sha256("\n".join(ids).encode()).hexdigest()
print(json.dumps({
    "cpu": (end.user - start.user) + (end.system - start.system),
    "wall": end.elapsed - start.elapsed,
    "peak": peak,
    "rows": len(rows),
    "selected": selected,
}))
"""


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} on {os.cpu_count()} CPUs"


def synthetic_csv(workdir: Path, rows: int, fraction: float, seed: int = 0) -> Path:
    """The CSV for ``rows`` rows, four classes holding ``fraction`` of them; cached by name."""
    path = workdir / f"segmentation-{rows}-{fraction:g}-{seed}.csv"
    if path.exists():
        return path
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # 346 other classes, MIDs as wide as real ones (/m/0 + 4-6 characters, some /g/11...).
    others = [f"/m/0{rng.integers(36**4, 36**6):x}"[:9] for _ in range(340)]
    others += [f"/g/11b{rng.integers(16**5):05x}" for _ in range(6)]
    labels = list(SELECTED) + others
    weights = np.array(
        [fraction * share for share in SELECTED.values()]
        + list((1 - fraction) * rng.dirichlet(np.ones(len(others))))
    )
    image_ids = np.array([f"{x:016x}" for x in rng.integers(0, 2**63, int(rows / ROWS_PER_IMAGE))])
    # Pools of fields with the real widths; a row picks from them (writing is then ~1 us a row).
    clicks = [
        ";".join(
            f"{x:.5f} {y:.5f} {t}"
            for x, y, t in zip(rng.random(n), rng.random(n), rng.integers(0, 2, n), strict=True)
        )
        for n in rng.integers(1, 21, 8192)
    ]
    boxes = []
    for _ in range(8192):
        x0, x1 = np.sort(rng.random(2))
        y0, y1 = np.sort(rng.random(2))
        boxes.append(f"{x0:.6f},{x1:.6f},{y0:.6f},{y1:.6f}")
    ious = [""] * 1024 + [f"{v:.5f}" for v in rng.random(7168)]
    temporary = path.with_suffix(".partial")
    with open(temporary, "w") as out:
        out.write(HEADER + "\n")
        for start in range(0, rows, _CHUNK_ROWS):
            n = min(_CHUNK_ROWS, rows - start)
            images = image_ids[rng.integers(0, len(image_ids), n)].tolist()
            classes = rng.choice(len(labels), n, p=weights).tolist()
            picks = rng.integers(0, 8192, (n, 3)).tolist()
            box_ids = [f"{x:08x}" for x in rng.integers(0, 2**32, n)]
            lines = []
            for image, c, (b, i, k), box_id in zip(images, classes, picks, box_ids, strict=True):
                mid = labels[c]
                lines.append(
                    f"{image}_{mid.replace('/', '')}_{box_id}.png,{image},{mid},{box_id},"
                    f"{boxes[b]},{ious[i]},{clicks[k]}\n"
                )
            out.write("".join(lines))
    temporary.rename(path)
    return path


def measure(mode: str, path: Path, per_class: int) -> dict:
    """Run one read in a fresh process; its figures, and the child's whole CPU time."""
    command = [sys.executable, "-c", _CHILD, mode, str(path), str(per_class), ",".join(SELECTED)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{mode} read of {path} failed with status {process.returncode}")
    figures = json.loads(output.strip().splitlines()[-1])
    figures["process_cpu"] = usage.ru_utime + usage.ru_stime
    return figures


def best_of(runs: list[dict]) -> dict:
    """The run with the least CPU, with the highest peak RSS of all (the memory mark must hold
    for every run); every run must have selected the same images."""
    if len({run["selected"] for run in runs}) != 1:
        raise SystemExit("the same read selected different images in two rounds")
    best = dict(min(runs, key=lambda run: run["cpu"]))
    best["peak"] = max(run["peak"] for run in runs)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=672_500, help="rows at 1x (4x also runs)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--per-class", type=int, default=PER_CLASS_DEFAULT)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/oistream-bench/catalog"))
    parser.add_argument("--no-pandas", action="store_true", help="skip pandas' whole-file read")
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved runs of each read; the least CPU is kept"
    )
    args = parser.parse_args()

    mb = 10**6
    print(f"catalog benchmark, --per-class {args.per_class}, classes {', '.join(SELECTED)}")
    print(f"({load()}; every figure below is from a fresh process)")
    largest = 4 * args.rows
    marks: list[tuple[str, bool]] = []
    for rows in (args.rows, largest):
        for fraction in args.fractions:
            started = time.perf_counter()
            path = synthetic_csv(args.workdir, rows, fraction)
            made = time.perf_counter() - started
            size = path.stat().st_size
            print(
                f"\n{rows:,} rows, {size / mb:,.0f} MB ({size / rows:.0f} B/row), four classes "
                f"hold {fraction:.0%} of rows"
                + (f" (written in {made:.0f} s)" if made > 1 else " (cached)")
            )
            modes = ("bounded", "unbounded") + (() if args.no_pandas else ("pandas",))
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            for _ in range(args.rounds):  # interleaved, so a slow spell hits every mode
                for mode in modes:
                    runs[mode].append(measure(mode, path, args.per_class))
            results = {mode: best_of(runs[mode]) for mode in modes}
            for mode, r in results.items():
                every = ", ".join(f"{run['cpu']:.2f}" for run in runs[mode])
                print(
                    f"  {mode:9} peak RSS {r['peak'] / mb:7,.0f} MB   read CPU {r['cpu']:6.2f} s"
                    f" (of {every})   wall {r['wall']:6.2f} s   rows kept {r['rows']:>9,}"
                    f"   ({load()})"
                )
            same = results["bounded"]["selected"] == results["unbounded"]["selected"]
            print(f"  bounded plan selects the same images as the whole table's: {same}")
            marks.append((f"{rows:,} rows, {fraction:.0%}: same selection", same))
            if rows == largest:
                peak = results["bounded"]["peak"]
                marks.append(
                    (
                        f"{rows:,} rows, {fraction:.0%}: bounded peak {peak / mb:.0f} MB < 200 MB",
                        peak < MEMORY_MARK,
                    )
                )
            if "pandas" in results:
                pandas = results["pandas"]
                ratio = pandas["cpu"] / results["bounded"]["cpu"]
                wall = pandas["wall"] / results["bounded"]["wall"]
                whole = pandas["cpu"] / results["unbounded"]["cpu"]
                whole_wall = pandas["wall"] / results["unbounded"]["wall"]
                memory = pandas["peak"] / results["bounded"]["peak"]
                print(
                    f"  pandas / ours: CPU {ratio:.2f}x, wall {wall:.2f}x (whole scan, bounded); "
                    f"CPU {whole:.2f}x, wall {whole_wall:.2f}x (unbounded); peak RSS "
                    f"{memory:.1f}x (bounded)"
                )
                if rows == largest:
                    marks.append(
                        (
                            f"{rows:,} rows, {fraction:.0%}: bounded scan {ratio:.2f}x >= 2x "
                            f"(unbounded {whole:.2f}x, not a mark)",
                            ratio >= SPEED_MARK,
                        )
                    )
    print(f"\nmarks ({load()}):")
    for text, passed in marks:
        print(f"  {'PASS' if passed else 'FAIL'}  {text}")
    return 0 if all(passed for _, passed in marks) else 1


if __name__ == "__main__":
    sys.exit(main())
