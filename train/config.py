"""The trainer's command line: every option, its default and its meaning in one place."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

# torchvision's reference recipe: lr 0.02 for 16 images per step (8 GPUs x 2 images).
REFERENCE_BATCH = 16

# The architectures train/model.py builds (here, so --help needs no torch import).
BACKBONES = ("resnet50", "resnet101", "resnet18", "mobilenet_v3_large")
VARIANTS = ("v1", "v2")
DEFAULT_BACKBONE = "resnet50"
# torchvision's anchor sizes, one per FPN level, chosen for images of 800-1333 px.
DEFAULT_ANCHOR_SIZES = (32, 64, 128, 256, 512)
# torchvision's width of the FPN outputs and of the heads' convolutions (--channels).
DEFAULT_CHANNELS = 256

# --demo: a model that visibly learns, from random weights, on any CPU, in a fixed number of
# steps (not minutes), so every machine reaches the same figure and only the time differs.
# Chosen by cost per step (benchmarks/demo_step_cost.py; README, "What the demo does"):
# ResNet-18, a cheap trunk that keeps the stride-4 FPN level the fake bucket's small traffic
# lights need (MobileNetV3's FPN starts at stride 16); v2's normalised heads, which train from
# scratch far more stably than v1's; 128 channels in the FPN and the heads instead of 256, since
# at this size the heads' convolutions are most of a step (2.00 -> 0.71 wall s/step, 2 threads);
# images shrunk to 160 px on the long side (a quarter of the fake bucket's pixels); few sampled
# anchors and proposals; a high lr with warm-up, clipping and a cosine decay to make the few
# steps count; seeded, deterministic kernels to make the run repeatable; evaluation only at the
# end, keeping 300 proposals per image.
# Measured (mask mAP@0.5 on the demo's validation split at per-epoch evaluations, quiet 2-core
# machine): 256 channels, 300 steps: 0.490 in 739 s of training; 128 channels, 300 steps: 0.066
# / 0.255 / 0.345 / 0.396 / 0.388 every 60 steps; 128 channels, 420 steps (the demo): 0.071 /
# 0.296 / 0.377 / 0.361 / 0.514 / 0.517 / 0.557, 462 s of training. Cheaper variants of the
# 256-channel model learned less per second: v1 heads (1.21 against 2.02 wall s/step) 0.107 /
# 0.177 / 0.210 at steps 60 / 120 / 180; 16 sampled proposals (~1.6 s/step) 0.385 at step 240;
# 16 proposals with anchors of 8-128 px 0.313 at 240 (one torch thread).
DEMO_DEFAULTS: dict[str, object] = {
    "backbone": "resnet18",
    "model": "v2",
    "weights": "none",
    "channels": 128,
    "min_size": [160],
    "max_size": 160,
    "batch_size": 2,
    "workers": 1,
    "rpn_samples": 128,
    "roi_samples": 32,
    "test_proposals": 300,
    "detections_per_image": 50,
    "lr": 0.16,
    "warmup_steps": 20,
    "clip_grad": 10.0,
    "schedule": "cosine",
    "epochs": 7,
    "steps_per_epoch": 60,
    "eval_every": 0,
    "log_every": 10,
    "deterministic": True,
    "time_limit_minutes": None,
}


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors end in one line on stderr (exit 2), not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _flag(name: str, value: object) -> str:
    flag = f"--{name.replace('_', '-')}"
    if value is True:
        return flag
    if isinstance(value, list):
        return f"{flag} {' '.join(str(v) for v in value)}"
    return f"{flag} {value}"


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m train",
        description="Train and evaluate torchvision Mask R-CNN R50-FPN on oistream shards. "
        "Run under `torchrun --nproc-per-node N -m train ...` for DDP.",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--train",
        required=True,
        help="training shards: a folder or URL holding manifest.json, a brace pattern or tars",
    )
    data.add_argument("--val", help="validation shards (same forms as --train); no eval if absent")
    data.add_argument(
        "--out", required=True, help="run folder: checkpoints, metrics, eval, pictures"
    )
    data.add_argument("--workers", type=int, default=4, help="DataLoader workers per rank")
    data.add_argument("--shuffle", type=int, default=1000, help="sample shuffle buffer per worker")
    data.add_argument(
        "--gpu-decode",
        action="store_true",
        help="decode each batch's JPEGs on the GPU (nvJPEG) in the main process",
    )
    data.add_argument(
        "--train-masks",
        choices=("annotated", "visible"),
        default="annotated",
        help="train on masks as annotated (overlaps kept; what evaluation scores against) or "
        "on their visible parts (later instances occlude earlier ones)",
    )
    data.add_argument(
        "--max-val-images",
        type=int,
        default=None,
        help="evaluate on at most this many validation images (all by default)",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--backbone",
        choices=BACKBONES,
        default=DEFAULT_BACKBONE,
        help="the FPN's backbone",
    )
    model.add_argument(
        "--model",
        choices=VARIANTS,
        default="v1",
        help="heads: v1 (torchvision's original) or v2 (its v2 recipe: BatchNorm in the FPN and "
        "heads, which trains from scratch far more stably)",
    )
    model.add_argument(
        "--weights",
        default="coco",
        help="coco (torchvision's COCO Mask R-CNN weights: resnet50 only), imagenet (the "
        "backbone's ImageNet weights), none (random init) or a checkpoint path (its "
        "architecture comes with it: --backbone, --model, --channels and --anchor-sizes are then "
        "ignored)",
    )
    model.add_argument(
        "--anchor-sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_ANCHOR_SIZES),
        metavar="PX",
        help="anchor side per FPN level (default: torchvision's, made for 800-1333 px images; "
        "scale them with --min-size for small images)",
    )
    model.add_argument(
        "--channels",
        type=int,
        default=DEFAULT_CHANNELS,
        metavar="N",
        help=f"width of the FPN outputs and of the heads' convolutions (default: torchvision's "
        f"{DEFAULT_CHANNELS}; 128 makes a small model's step ~3x cheaper on a CPU)",
    )
    model.add_argument(
        "--min-size",
        type=int,
        nargs="+",
        default=[800],
        help="shorter image side after the model's resize; several values train at a size drawn "
        "per image (multi-scale) and evaluate at the last",
    )
    model.add_argument(
        "--max-size", type=int, default=1333, help="cap on the longer side after the resize"
    )
    model.add_argument(
        "--trainable-backbone-layers",
        type=int,
        default=None,
        help="backbone stages left trainable with pretrained weights (0-5, MobileNet 0-6; "
        "torchvision's default 3)",
    )

    model.add_argument(
        "--rpn-samples",
        type=int,
        default=256,
        help="anchors sampled per image for the RPN loss (torchvision's 256)",
    )
    model.add_argument(
        "--roi-samples",
        type=int,
        default=512,
        help="proposals sampled per image for the box and mask heads (torchvision's 512; "
        "fewer is much faster on the CPU)",
    )
    model.add_argument(
        "--test-proposals",
        type=int,
        default=1000,
        help="RPN proposals per image kept for the heads at evaluation (torchvision's 1000)",
    )
    model.add_argument(
        "--detections-per-image",
        type=int,
        default=100,
        help="most detections kept per image at evaluation (COCO's 100)",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=12)
    optim.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="optimizer steps per epoch, the same on every rank "
        "(default: the manifest's sample count / global batch)",
    )
    optim.add_argument("--batch-size", type=int, default=2, help="images per step per rank")
    optim.add_argument(
        "--lr",
        type=float,
        default=0.02,
        help=f"base learning rate for {REFERENCE_BATCH} images per step; "
        "scaled linearly with the global batch",
    )
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument("--weight-decay", type=float, default=1e-4)
    optim.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="linear warm-up length (default: min(1000, a tenth of all steps))",
    )
    optim.add_argument("--warmup-factor", type=float, default=0.001, help="lr factor at step 0")
    optim.add_argument("--schedule", choices=("step", "cosine"), default="step")
    optim.add_argument(
        "--steps",
        "--lr-steps",
        dest="lr_steps",
        type=int,
        nargs="+",
        default=None,
        help="step schedule: epochs after which lr is multiplied by --gamma "
        "(default: after 2/3 and 8/9 of the epochs)",
    )
    optim.add_argument("--gamma", type=float, default=0.1)
    optim.add_argument(
        "--clip-grad", type=float, default=None, help="clip the gradients' total norm to this"
    )
    optim.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        default="auto",
        help="mixed precision: auto = bf16 on GPUs that have it, fp16 + grad scaler on others, "
        "off on the CPU",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--device", default="auto", help="auto, cpu, cuda (rank r uses cuda:LOCAL_RANK)"
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms and seeds: a resumed run repeats the uninterrupted one",
    )
    run.add_argument(
        "--eval-every", type=int, default=1, help="evaluate every N epochs (0: only at the end)"
    )
    run.add_argument(
        "--checkpoint-every",
        type=_interval,
        default="500",
        help="checkpoint every N steps, or every N minutes/seconds/hours with 10m, 90s, 1h",
    )
    run.add_argument(
        "--keep-checkpoints",
        type=int,
        default=2,
        help="checkpoints kept in OUT (older ones deleted once a newer one is published)",
    )
    run.add_argument(
        "--resume",
        default=None,
        help="a checkpoint to continue from, or 'auto': the newest verified one in "
        "OUT/checkpoints (a fresh start if there is none)",
    )
    run.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop with a checkpoint after this many steps in all (continue with --resume auto)",
    )
    run.add_argument(
        "--time-limit-minutes",
        type=float,
        default=None,
        help="stop training after this many minutes (checkpoint, then the final evaluation)",
    )
    run.add_argument(
        "--stop-at-map",
        type=float,
        default=None,
        help="stop once an evaluation's mask mAP@0.5 reaches this (e.g. 0.9)",
    )
    run.add_argument(
        "--demo",
        action="store_true",
        help="a fixed number of steps on a CPU from random weights (same figure on every "
        "machine): "
        + " ".join(_flag(k, v) for k, v in DEMO_DEFAULTS.items() if v is not None)
        + " (flags given explicitly win)",
    )
    run.add_argument("--log-every", type=int, default=20, help="metrics line every N steps")
    run.add_argument(
        "--num-predictions", type=int, default=4, help="validation pictures drawn at each eval"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files to OUT/tensorboard (pip install tensorboard)",
    )
    run.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    storage = parser.add_argument_group("storage")
    storage.add_argument(
        "--endpoint-url",
        default=None,
        help="S3 endpoint for s3:// shards and --out (default: $FSSPEC_S3_ENDPOINT_URL or "
        "$AWS_ENDPOINT_URL), as for `oistream shard`",
    )
    storage.add_argument(
        "--shard-cache",
        default=None,
        metavar="DIR",
        help="keep verified copies of remote shards here; later epochs read them locally",
    )
    storage.add_argument(
        "--shard-cache-size",
        type=_byte_size,
        default=None,
        metavar="SIZE",
        help="bound the shard cache (e.g. 50G, 800M); least recently used shards go first",
    )
    return parser


_INTERVAL = re.compile(r"(\d+(?:\.\d+)?)([smh]?)")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([KMGT]?)i?B?", re.IGNORECASE)


def _interval(text: str) -> tuple[int | None, float | None]:
    """``--checkpoint-every``: ``500`` -> (500 steps, None); ``10m`` -> (None, 600 s)."""
    match = _INTERVAL.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of steps or 10m, 90s, 1h")
    number, unit = match.groups()
    if not unit:
        if "." in number:
            raise argparse.ArgumentTypeError(f"{text!r}: steps are a whole number")
        return int(number), None
    return None, float(number) * {"s": 1, "m": 60, "h": 3600}[unit]


def _byte_size(text: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 50G or 800M")
    number, unit = match.groups()
    scale = 1024 ** ("KMGT".find(unit.upper()) + 1) if unit else 1
    return int(float(number) * scale)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; argparse exits 2 with one usage line on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        # Demo values replace the defaults only: parse again so explicit flags still win.
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    positive = (
        "epochs",
        "batch_size",
        "log_every",
        "rpn_samples",
        "roi_samples",
        "test_proposals",
        "detections_per_image",
    )
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("steps_per_epoch", "stop_after", "max_val_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0 or args.eval_every < 0 or args.num_predictions < 0:
        parser.error("--workers, --eval-every and --num-predictions cannot be negative")
    if args.time_limit_minutes is not None and args.time_limit_minutes <= 0:
        parser.error("--time-limit-minutes must be positive")
    if args.lr <= 0:
        parser.error("--lr must be positive")
    if args.lr_steps is not None and any(e < 1 or e > args.epochs for e in args.lr_steps):
        parser.error(f"--steps must be epochs between 1 and --epochs ({args.epochs})")
    args.checkpoint_every, args.checkpoint_every_s = args.checkpoint_every
    if args.keep_checkpoints < 1:
        parser.error("--keep-checkpoints must be at least 1")
    return args
