"""Training throughput: Mask R-CNN fed from shards against the same model fed from GPU memory.

Data: a fake bucket (``oistream.testing``: realistic scenes, masks at 1600/1024 of the image
size) of ``--images`` train images with a long side of 1024 px, the real images' size, sharded
with ``python -m oistream shard`` (``benchmarks/_fake_shards.py``; cached in ``--workdir``).

Model and step: the trainer's own (``train.model``, ``train.engine.Trainer.train_step``):
torchvision Mask R-CNN R50-FPN (``--model v1``, random weights: the weights do not change the
work of a step), 4 classes + background, torchvision's default transform (short side 800),
SGD, AMP as the trainer chooses it (bf16 where the GPU has it), batch ``--batch-size`` 8.

Four sources of batches, and two step loops, for the same training run:

* shards: ``oistream.ShardDataset`` (train mode: shuffle, random flip, masks assembled at
  the image's size) -> ``oistream.make_loader`` with ``--workers`` workers and pinned memory ->
  the trainer's ``to_device``, exactly the trainer's path;
* shards, GPU decode (the trainer's ``--gpu-decode``): the same with
  ``ShardDataset(decode_images=False)``; each batch's JPEGs are decoded at once by nvJPEG in
  ``to_device``. Skipped with ``--no-gpu-decode``;
* memory (the no-loading limit): ``--preload`` batches taken from the shard loader, kept on the
  GPU, fed in turn through the same ``to_device`` (a no-op copy there);
* memory, torchvision's loop: the same batches, the same model, optimizer, scaler and
  schedule, stepped by the body of torchvision's reference ``train_one_epoch``
  (``references/detection/engine.py``, not shipped in the wheel; restated in
  ``ReferenceLoop``): the losses summed inside autocast, ``.item()`` of the total checked for
  finiteness, ``zero_grad()``, backward and step, the schedule stepped, and every loss
  ``.item()``-ed into a smoothed meter as its ``MetricLogger.update`` does. Its printing every
  ``print_freq`` steps is left out (that favours it), and it clips the gradients as our step
  does here (random weights without warm-up diverge unclipped): the loops differ only in what
  they do around the model. Our step is ``Trainer.train_step`` and the fit loop's
  ``LossWindow``, one ``.item()`` per loss every ``LOG_EVERY`` steps. Skipped with
  ``--no-reference``.

Every step of the first three also does what ``Trainer.fit`` does around ``train_step`` that
touches the GPU: its losses are added to a ``LossWindow``, read back every ``LOG_EVERY`` steps.

The cost of a Mask R-CNN step drifts as the model trains (proposals, positives, NMS work: on
the H200 from about 50 images/s in the first 150 steps to 68 later), and a process warms up
(allocators, pinned host memory, cuDNN plans) over its first few hundred steps. Timed one
after the other, the first source timed paid for both. So the sources take turns in one
continuing run: ``--rounds`` rounds of ``--block`` steps from
each source (every other round in reverse order), each block timed with the GPU synchronised at
both ends. Before the rounds, ``--warmup`` untimed steps from the shards (allocator, pinned
memory, the early drift), and before each source's first block a few more from it (its
prefetch queue, nvJPEG). The first timed block from the shards has run 24-37% slower than
the later ones in every run, on an H100 and an H200, with 40 or 150 warm-up steps, while
waiting under 1% of its time for data; the cause is not known (runs A and B of
``results/h100-train-throughput.log``). It counts in the total, as it would in a short run.

Printed: the card, images/s of each source, the fraction of step time spent waiting for the
next batch (decoding on the GPU included), the main thread's CPU time per step, the loader
alone (no model), the data-loading overhead = 1 - shards / memory against issue 16's mark of
<= 3% (issue 5 asked <= 5%), with its spread over the rounds, and our step against
torchvision's loop on the same batches (memory / memory, torchvision's loop; mark: >= 1, not
slower).

Run (about 2.5 minutes on one H100 or H200): ``python benchmarks/train_throughput.py``.
``--cpu-smoke`` runs a tiny version on the CPU to check the script; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # oistream, train from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fake_shards import fake_shards

import oistream
from train.data import describe_classes, make_batches, to_device
from train.distributed import Ranks
from train.engine import Trainer, seed_everything
from train.metrics import LossWindow
from train.model import build_model, layout_for
from train.precision import choose_precision
from train.schedule import Schedule

# Issue 16's mark for the data-loading overhead; issue 5 asked for 5%.
OVERHEAD_MARK = 0.03
ISSUE_5_OVERHEAD_MARK = 0.05
# Our step against torchvision's reference loop on the same batches: not slower.
REFERENCE_MARK = 1.0
SOURCE_WARMUP_STEPS = 3
REFERENCE = "memory, torchvision's loop"
# Trainer.fit reads its LossWindow back (one .item() per loss) every log_every steps: its default.
LOG_EVERY = 20
# The reference's SmoothedValue keeps this many recent values (torchvision's default).
METER_WINDOW = 20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/oistream-train-bench")
    parser.add_argument("--images", type=int, default=64, help="distinct train images")
    parser.add_argument("--image-size", type=int, default=1024, help="long side, px")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=min(12, max((os.cpu_count() or 2) - 2, 1)))
    parser.add_argument("--rounds", type=int, default=8, help="turns taken by each source")
    parser.add_argument("--block", type=int, default=20, help="timed steps per turn")
    parser.add_argument("--warmup", type=int, default=150, help="untimed steps before the rounds")
    parser.add_argument("--preload", type=int, default=8, help="batches kept on the GPU")
    parser.add_argument("--model", choices=("v1", "v2"), default="v1")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto")
    parser.add_argument("--no-gpu-decode", action="store_true", help="skip the nvJPEG source")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip torchvision's train_one_epoch loop"
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny run on the CPU")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.images, args.image_size, args.batch_size = 8, 160, 2
        args.workers, args.rounds, args.block, args.warmup, args.preload = 1, 2, 2, 2, 2
    return args


@dataclass
class Tally:
    """Totals of one source's timed blocks."""

    steps: int = 0
    seconds: float = 0.0
    waiting: float = 0.0
    main_thread_cpu: float = 0.0
    block_rates: list[float] = field(default_factory=list)  # steps/s of each block


class FitLoop:
    """What ``Trainer.fit`` does with a step's losses: kept on the GPU in a ``LossWindow``,
    read back once every ``LOG_EVERY`` steps."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.window = LossWindow()

    def __call__(self, images: list[torch.Tensor], targets: list[dict]) -> None:
        self.window.add(self.trainer.train_step(images, targets), len(images), 0.0)
        if self.window.steps == LOG_EVERY:
            self.window.means()
            self.window = LossWindow()


class ReferenceLoop:
    """The body of torchvision's reference ``train_one_epoch`` (references/detection/engine.py),
    restated on the trainer's model, optimizer, scaler and schedule: the same work per step,
    its host synchronisations included (the total's ``.item()``, then one per loss for the
    meters). One process, so its ``reduce_dict`` returns the losses as they are."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.meters: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=METER_WINDOW)
        )
        self.totals: dict[str, float] = collections.defaultdict(float)

    def _update(self, **values: float | torch.Tensor) -> None:
        """``MetricLogger.update``: each tensor ``.item()``-ed into its smoothed value."""
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].append(value)
            self.totals[name] += value

    def __call__(self, images: list[torch.Tensor], targets: list[dict]) -> None:
        trainer = self.trainer
        model, optimizer, scaler = trainer.forward_model, trainer.optimizer, trainer.scaler
        model.train()
        with trainer.precision.autocast():
            loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
        loss_value = losses.item()
        if not math.isfinite(loss_value):
            raise SystemExit(f"reference loop: loss is {loss_value}")
        optimizer.zero_grad()
        scaler.scale(losses).backward()
        if trainer.schedule.clip_grad is not None:  # not the reference's: see the docstring
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainer.params, trainer.schedule.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        trainer.scheduler.step()
        self._update(loss=losses, **loss_dict)
        self._update(lr=optimizer.param_groups[0]["lr"])


def run_steps(step, batches, steps: int, device: torch.device, tally=None) -> None:
    """``steps`` training steps by ``step(images, targets)``; timed into ``tally`` when given,
    the GPU synchronised at both ends so that the block's time is the GPU's too."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started, cpu_started = time.perf_counter(), time.thread_time()
    waiting = 0.0
    for _ in range(steps):
        asked = time.perf_counter()
        images, targets = to_device(next(batches), device)
        waiting += time.perf_counter() - asked
        step(images, targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if tally is not None:
        seconds = time.perf_counter() - started
        tally.steps += steps
        tally.seconds += seconds
        tally.waiting += waiting
        tally.main_thread_cpu += time.thread_time() - cpu_started
        tally.block_rates.append(steps / seconds)


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("train_throughput.py measures a CUDA GPU; none here (--cpu-smoke checks the script)")
        return 2
    device = torch.device("cuda" if not args.cpu_smoke else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)"
    seed_everything(0)
    shards = fake_shards(args.workdir, images=args.images, image_size=args.image_size)["train"]

    def shard_stream(decode_images: bool = True):
        """The trainer's own loader (``train.data.make_batches``) over the shards."""
        dataset = oistream.ShardDataset(
            str(shards),
            shuffle=100,
            train=True,
            epoch_samples=10**9,
            seed=0,
            decode_images=decode_images,
        )
        return iter(make_batches(dataset, args.batch_size, args.workers, device=device))

    classes = describe_classes(oistream.ShardDataset(str(shards)).classes)
    stream = shard_stream()
    prefetched = args.workers * 2  # DataLoader's default prefetch_factor per worker

    # The loader alone: drain what the workers prefetched, then time the steady state.
    for _ in range(prefetched + 2):
        next(stream)
    started = time.perf_counter()
    loader_batches = max(args.rounds * args.block // 5, 2)
    for _ in range(loader_batches):
        next(stream)
    loader_ips = loader_batches * args.batch_size / (time.perf_counter() - started)

    options = {}
    if args.cpu_smoke:
        options = {"min_size": 128, "max_size": 160, "box_batch_size_per_image": 64}
    model = build_model(layout_for(args.model, "none", None), len(classes) - 1, **options)
    precision = choose_precision(args.amp, device)
    ranks = Ranks(rank=0, world_size=1, local_rank=0, device=device)
    schedule = Schedule(
        epochs=1,
        steps_per_epoch=10**6,
        lr=0.02 * args.batch_size / 16,
        warmup_steps=0,
        # Random weights and no warm-up diverge unclipped within steps (seen on the CPU smoke
        # run); both loops clip alike.
        clip_grad=10.0,
    )
    trainer = Trainer(model, schedule, precision, ranks)

    # Kept as the loader gives them (uint8 images), only already on the GPU: each step then
    # runs the same to_device conversion as when fed from the loader, minus the copy.
    preloaded = [_on_device(next(stream), device) for _ in range(args.preload)]
    # Streams open at their first turn: a stream's workers then fill its prefetch queue and go
    # idle while the others are timed (the loader is many times faster than the GPU).
    ours, reference = FitLoop(trainer), ReferenceLoop(trainer)
    sources = {"shards": (lambda: stream, ours)}
    if not args.no_gpu_decode:
        sources["shards, GPU decode"] = (lambda: shard_stream(decode_images=False), ours)
    sources["memory"] = (lambda: itertools.cycle(preloaded), ours)
    if not args.no_reference:
        sources[REFERENCE] = (lambda: itertools.cycle(preloaded), reference)
    run_steps(ours, stream, args.warmup, device)
    streams, tallies = {}, {name: Tally() for name in sources}
    order = list(sources)
    for round_index in range(args.rounds):
        # Every other round in reverse order, so a drift in step cost weighs on all sources alike.
        for name in order if round_index % 2 == 0 else reversed(order):
            open_stream, step = sources[name]
            if name not in streams:
                streams[name] = open_stream()
                run_steps(step, streams[name], SOURCE_WARMUP_STEPS, device)
            run_steps(step, streams[name], args.block, device, tallies[name])
        print(
            "  round:",
            ", ".join(f"{n} {t.block_rates[-1] * args.batch_size:.1f}" for n, t in tallies.items()),
            "images/s",
            flush=True,
        )

    def images_per_second(name: str) -> float:
        return tallies[name].steps * args.batch_size / tallies[name].seconds

    memory_ips = images_per_second("memory")
    overhead = 1 - images_per_second("shards") / memory_ips
    per_round = [
        1 - a / b
        for a, b in zip(tallies["shards"].block_rates, tallies["memory"].block_rates, strict=True)
    ]
    verdict = "PASS" if overhead <= OVERHEAD_MARK else "FAIL"
    print(f"device: {card}; torch {torch.__version__}, torchvision {_torchvision_version()}")
    print(
        f"setup: Mask R-CNN R50-FPN {args.model}, AMP {precision.name}, batch {args.batch_size}, "
        f"{args.images} images of long side {args.image_size} px in shards, "
        f"{args.workers} loader workers, {os.cpu_count()} CPUs, "
        f"{args.rounds} rounds x {args.block} timed steps per source"
    )
    print(f"loader alone (no model): {loader_ips:.1f} images/s")
    print("source                 images/s  data wait  main-thread CPU/step  overhead")
    for name, tally in tallies.items():
        ips = images_per_second(name)
        print(
            f"{name:22s} {ips:8.1f}  {tally.waiting / tally.seconds:9.1%}  "
            f"{tally.main_thread_cpu / tally.steps * 1000:17.1f} ms  {1 - ips / memory_ips:8.1%}"
        )
    print(
        f"data-loading overhead: {overhead:.1%} (shards / memory = {1 - overhead:.3f}; "
        f"rounds {min(per_round):.1%} to {max(per_round):.1%}; mark <= {OVERHEAD_MARK:.0%}, "
        f"issue 5's <= {ISSUE_5_OVERHEAD_MARK:.0%}): {verdict}"
    )
    if REFERENCE in tallies:
        ratio = memory_ips / images_per_second(REFERENCE)
        ratios = [
            a / b
            for a, b in zip(
                tallies["memory"].block_rates, tallies[REFERENCE].block_rates, strict=True
            )
        ]
        verdict = "PASS" if ratio >= REFERENCE_MARK else "FAIL"
        print(
            f"our step against torchvision's train_one_epoch loop, same batches, model and card: "
            f"{ratio:.3f}x (rounds {min(ratios):.3f} to {max(ratios):.3f}; mark >= "
            f"{REFERENCE_MARK:.1f}, not slower): {verdict}"
        )
    return 0


def _on_device(batch, device: torch.device):
    images, targets = batch
    return (
        [image.to(device) for image in images],
        [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets],
    )


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__


if __name__ == "__main__":
    raise SystemExit(main())
