"""Training throughput: Mask R-CNN fed from shards against the same model fed from GPU memory.

Data: a fake bucket (``oistream.fakebucket``: realistic scenes, masks at 1600/1024 of the image
size) of ``--images`` train images with a long side of 1024 px, the real images' size, sharded
with ``python -m oistream shard`` (``benchmarks/_fake_shards.py``; cached in ``--workdir``).

Model and step: the trainer's own (``train.model``, ``train.engine.Trainer.train_step``):
torchvision Mask R-CNN R50-FPN (``--model v1``, random weights: the weights do not change the
work of a step), 4 classes + background, torchvision's default transform (short side 800),
SGD, AMP as the trainer chooses it (bf16 where the GPU has it), batch ``--batch-size`` 8.

Two phases, each from the same initial weights and optimizer state, each ``--steps`` timed
steps after a warm-up, with the GPU synchronised at both ends of the timed window:

* from shards: ``oistream.ShardDataset`` (train mode: shuffle, random flip, masks assembled at
  the image's size) -> ``oistream.make_loader`` with ``--workers`` workers and pinned memory ->
  the trainer's ``to_device``, exactly the trainer's path. The warm-up is longer than the
  batches the workers can have prefetched, so the timed window sees the steady state;
* from shards, JPEGs decoded on the GPU (the trainer's ``--gpu-decode``): the same, with
  ``ShardDataset(decode_images=False)``; each batch's JPEGs are decoded at once by nvJPEG in
  ``to_device``. Skipped with ``--no-gpu-decode``;
* from memory (the no-loading limit): ``--preload`` batches taken from the same loader, kept
  on the GPU, fed in turn through the same ``to_device`` (a no-op copy there).

Printed: the card, images/s of each, the loader alone (no model), and the data-loading
overhead = 1 - shards / memory, against the mark of <= 5%.

Run (about 2 minutes on one H100): ``python benchmarks/train_throughput.py``.
``--cpu-smoke`` runs a tiny version on the CPU to check the script; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # oistream, train from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fake_shards import fake_shards

import oistream
from train.data import describe_classes, make_batches, to_device
from train.distributed import Ranks
from train.engine import Schedule, Trainer, seed_everything
from train.model import build_model, layout_for
from train.precision import choose_precision

OVERHEAD_MARK = 0.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/oistream-train-bench")
    parser.add_argument("--images", type=int, default=64, help="distinct train images")
    parser.add_argument("--image-size", type=int, default=1024, help="long side, px")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=min(12, max((os.cpu_count() or 2) - 2, 1)))
    parser.add_argument("--steps", type=int, default=150, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps, plus prefetch")
    parser.add_argument("--preload", type=int, default=8, help="batches kept on the GPU")
    parser.add_argument("--model", choices=("v1", "v2"), default="v1")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto")
    parser.add_argument("--no-gpu-decode", action="store_true", help="skip the nvJPEG phase")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny run on the CPU")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.images, args.image_size, args.batch_size = 8, 160, 2
        args.workers, args.steps, args.warmup, args.preload = 1, 2, 1, 2
    return args


def timed_steps(trainer: Trainer, batches, steps: int, device: torch.device) -> tuple[float, float]:
    """Seconds for ``steps`` training steps and the part spent waiting for the next batch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    waiting = 0.0
    for _ in range(steps):
        asked = time.perf_counter()
        images, targets = to_device(next(batches), device)
        waiting += time.perf_counter() - asked
        trainer.train_step(images, targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, waiting


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("train_throughput.py measures a CUDA GPU; none here (--cpu-smoke checks the script)")
        return 2
    device = torch.device("cuda" if not args.cpu_smoke else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)"
    seed_everything(0)
    shards = fake_shards(args.workdir, images=args.images, image_size=args.image_size)["train"]

    def shard_stream(decode_images: bool):
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
    stream = shard_stream(decode_images=True)
    prefetched = args.workers * 2  # DataLoader's default prefetch_factor per worker

    # The loader alone: drain what the workers prefetched, then time the steady state.
    for _ in range(prefetched + 2):
        next(stream)
    started = time.perf_counter()
    loader_batches = max(args.steps // 5, 2)
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
        clip_grad=10.0,
    )
    trainer = Trainer(model, schedule, precision, ranks)
    initial = copy.deepcopy(trainer.state_dict())  # state_dict() aliases the live tensors

    # Kept as the loader gives them (uint8 images), only already on the GPU: each step then
    # runs the same to_device conversion as when fed from the loader, minus the copy.
    preloaded = [_on_device(next(stream), device) for _ in range(args.preload)]
    memory = itertools.cycle(preloaded)
    # Streams are opened when their phase starts: idle workers of a later phase would
    # otherwise compete for the CPUs with the phase being timed.
    phases = [("shards", lambda: stream, args.warmup + prefetched)]
    if not args.no_gpu_decode:
        phases.append(("shards, GPU decode", lambda: shard_stream(False), args.warmup + prefetched))
    phases.append(("memory", lambda: memory, args.warmup))
    results = {}
    for phase, open_batches, warmup in phases:
        batches = open_batches()
        trainer.load_state_dict(initial)
        timed_steps(trainer, batches, warmup, device)
        seconds, waiting = timed_steps(trainer, batches, args.steps, device)
        results[phase] = (args.steps * args.batch_size / seconds, waiting / seconds)
        print(f"  {phase}: {results[phase][0]:.1f} images/s", flush=True)

    shards_ips, wait_fraction = results["shards"]
    memory_ips, _ = results["memory"]
    overhead = 1 - shards_ips / memory_ips
    verdict = "PASS" if overhead <= OVERHEAD_MARK else "FAIL"
    print(f"device: {card}; torch {torch.__version__}, torchvision {_torchvision_version()}")
    print(
        f"setup: Mask R-CNN R50-FPN {args.model}, AMP {precision.name}, batch {args.batch_size}, "
        f"{args.images} images of long side {args.image_size} px in shards, "
        f"{args.workers} loader workers, {os.cpu_count()} CPUs, {args.steps} timed steps/phase"
    )
    print(f"loader alone (no model):   {loader_ips:8.1f} images/s")
    print(f"trained from shards:       {shards_ips:8.1f} images/s (data wait {wait_fraction:.1%})")
    if "shards, GPU decode" in results:
        gpu_ips, gpu_wait = results["shards, GPU decode"]
        print(
            f"  with --gpu-decode:       {gpu_ips:8.1f} images/s (data wait {gpu_wait:.1%}; "
            f"overhead {1 - gpu_ips / memory_ips:.1%})"
        )
    print(f"trained from GPU memory:   {memory_ips:8.1f} images/s (the no-loading limit)")
    print(
        f"data-loading overhead: {overhead:.1%} (shards / memory = {shards_ips / memory_ips:.3f}; "
        f"mark <= {OVERHEAD_MARK:.0%}): {verdict}"
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
