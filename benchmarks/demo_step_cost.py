"""CPU cost of one training step for demo candidates, against the old demo's configuration.

    PYTHONPATH=. python benchmarks/demo_step_cost.py SHARDS [--steps 4] [--threads 1]
        [--candidate BACKBONE:VARIANT:SIZE:RPN:ROI ...]

SHARDS is a training shard folder (e.g. ``demo/shards/train`` after ``make demo``, or any
``oistream shard`` output). Each candidate builds its model from random weights (the demo's
start), trains ``--steps`` steps of 2 images after one warm-up step, and reports the process
CPU seconds and wall seconds per step; the baseline is the old demo's configuration (R50-FPN v2
at 320 px, 128 sampled anchors, 64 sampled proposals), measured in the same run. CPU seconds are
the figure to compare on a busy machine: with ``--threads 1`` they are not inflated by OpenMP
threads spinning while descheduled. The load average is printed beside every line.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch

import oistream
from train.config import DEFAULT_CHANNELS
from train.data import device_batches, make_batches
from train.model import build_model, layout_for

BASELINE = "resnet50:v2:320:128:64"
CANDIDATES = (
    "resnet18:v2:160:128:32",
    "resnet18:v1:160:128:32",
    "mobilenet_v3_large:v2:160:128:32",
    "resnet18:v2:320:128:64",
)


def step_cost(shards: str, spec: str, steps: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per training step of candidate ``spec``."""
    backbone, variant, size, rpn, roi, *width = spec.split(":")
    channels = int(width[0]) if width else DEFAULT_CHANNELS
    torch.manual_seed(0)
    dataset = oistream.ShardDataset(shards, shuffle=0, train=True, resolve_occlusion=False)
    cpu = torch.device("cpu")
    loader = make_batches(dataset, 2, 0, device=cpu)
    batches = list(itertools.islice(device_batches(loader, cpu), steps + 1))
    model = build_model(
        layout_for(variant, "none", None, backbone, channels=channels),
        len(dataset.classes) - 1,
        min_size=int(size),
        max_size=int(size),
        rpn_batch_size_per_image=int(rpn),
        box_batch_size_per_image=int(roi),
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()

    def step(batch: tuple) -> None:
        loss = sum(model(*batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(batches[0])  # first-step allocations and lazy initialisation
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    done = len(batches) - 1
    return (time.process_time() - cpu_start) / done, (time.perf_counter() - wall_start) / done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", help="a training shard folder")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per candidate")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--candidate",
        action="append",
        help="BACKBONE:VARIANT:SIZE:RPN_SAMPLES:ROI_SAMPLES[:CHANNELS] (repeatable; default: "
        "a set)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base_cpu, base_wall = step_cost(args.shards, BASELINE, args.steps)
    print(
        f"baseline {BASELINE}: {base_cpu:.2f} CPU s/step, {base_wall:.2f} wall s/step "
        f"(threads {args.threads}, load {os.getloadavg()[0]:.2f})",
        flush=True,
    )
    for spec in args.candidate or CANDIDATES:
        cpu, wall = step_cost(args.shards, spec, args.steps)
        print(
            f"{spec}: {cpu:.2f} CPU s/step ({cpu / base_cpu:.2f} x baseline), {wall:.2f} wall "
            f"s/step (load {os.getloadavg()[0]:.2f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
