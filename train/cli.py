"""``python -m train``: wires the command line, shards, model, engine and evaluation together.

Outputs under ``--out`` (a local folder or any fsspec URL, every file published whole, see
``rundir``): ``args.json`` (the command line), ``checkpoints/step-NNNNNNN.pt`` (+ ``.json``
records), ``metrics.jsonl`` (a line per logging window and per evaluation), ``eval.json`` (the
latest evaluation and the history of its headline numbers), ``predictions/*.png`` and, with
``--tensorboard``, ``tensorboard/``.

Failures are one line on stderr and a non-zero exit (``--debug`` adds the traceback); SIGTERM
and SIGINT stop after the current step with a checkpoint (exit 143 / 130; a second signal ends
the process at once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oistream import sources

from . import checkpoint as ckpt
from .config import REFERENCE_BATCH, parse_args
from .data import (
    check_gpu_decode_supported,
    class_names,
    describe_classes,
    device_batches,
    make_batches,
    open_shards,
)
from .distributed import Ranks, any_rank, barrier, init_distributed, shutdown
from .engine import (
    RunOptions,
    StopRequest,
    Trainer,
    make_deterministic,
    seed_everything,
)
from .errors import TrainError, one_line
from .evaluate import PREDICTIONS_CSV, evaluate
from .model import Layout, build_model, layout_for, load_model_state
from .precision import choose_precision
from .predictions import PredictionPictures
from .rundir import RunDir
from .schedule import Schedule, default_milestones, default_warmup_steps

PROG = "python -m train"


_SIGNAL_EXIT = {"SIGTERM": 143, "SIGINT": 130}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)  # exits 2 with one line on a usage error
    stop = StopRequest()
    previous = _catch_signals(stop)
    ranks = None
    try:
        ranks = init_distributed(args.device)
        run(args, ranks, stop)
        return _SIGNAL_EXIT.get(stop.signal or "", 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 1
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if ranks is not None:
            shutdown(ranks)


def _catch_signals(stop: StopRequest) -> dict[int, Any]:
    """SIGTERM/SIGINT set ``stop`` (the loop checkpoints after the step); a second one ends
    the process at once."""

    def handler(number: int, frame: Any) -> None:
        name = signal.Signals(number).name
        if stop.requested:
            print(f"{PROG}: second {name}: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + number)
        stop.signal = name
        print(
            f"{PROG}: {name}: stopping after this step (again to exit now)",
            file=sys.stderr,
            flush=True,
        )

    previous = {}
    for number in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[number] = signal.signal(number, handler)
        except ValueError:  # not the main thread (an embedding application): leave them
            break
    return previous


def run(
    args: argparse.Namespace, ranks: Ranks, stop: StopRequest | None = None
) -> dict[str, Any] | None:
    """Train (or continue) and evaluate; returns the final evaluation on rank 0."""
    out = RunDir(args.out, args.endpoint_url)
    try:
        return _run(args, ranks, stop, out)
    finally:
        out.close()


def _run(
    args: argparse.Namespace, ranks: Ranks, stop: StopRequest | None, out: RunDir
) -> dict[str, Any] | None:
    started = time.monotonic()
    if args.deterministic:
        make_deterministic()
    seed_everything(args.seed, ranks.rank)
    precision = choose_precision(args.amp, ranks.device)
    if args.gpu_decode:
        check_gpu_decode_supported(ranks.device)
    tensorboard = _tensorboard_writer(args, ranks, out)
    storage = {"endpoint_url": args.endpoint_url}

    # The manifest decides the classes; validation shards must agree with it.
    probe = open_shards(args.train, shuffle=0, train=False, **storage)
    classes = describe_classes(probe.classes)
    num_classes = len(classes) - 1
    if num_classes < 1:
        raise TrainError(f"{args.train} lists no object classes")
    val = None
    if args.val:
        val = open_shards(args.val, shuffle=0, train=False, resolve_occlusion=False, **storage)
        _check_same_classes(describe_classes(val.classes), classes, args.val, args.train)

    global_batch = args.batch_size * ranks.world_size
    steps_per_epoch = args.steps_per_epoch
    if steps_per_epoch is None:
        if probe.num_samples is None:
            raise TrainError(
                f"{args.train} has no manifest with sample counts: pass --steps-per-epoch"
            )
        steps_per_epoch = max(probe.num_samples // global_batch, 1)

    resume_path, resume = _resume_state(args, out, classes)
    init_path, init = (None, None)
    if resume is None and args.weights not in ("coco", "imagenet", "none"):
        init_path = args.weights
        init = _read_checkpoint(args.weights, args.endpoint_url)
        ckpt.check_classes(init, classes, init_path)
    layout = _layout(args, resume or init, resume_path or init_path)
    model = build_model(
        layout,
        num_classes,
        pretrained_weights=args.weights in ("coco", "imagenet") and resume is None,
        min_size=args.min_size,
        max_size=args.max_size,
        rpn_batch_size_per_image=args.rpn_samples,
        box_batch_size_per_image=args.roi_samples,
        rpn_post_nms_top_n_test=args.test_proposals,
        box_detections_per_img=args.detections_per_image,
    )
    if init is not None:
        load_model_state(model, ckpt.model_state_of(init), str(init_path))

    total_steps = args.epochs * steps_per_epoch
    schedule = Schedule(
        epochs=args.epochs,
        steps_per_epoch=steps_per_epoch,
        lr=args.lr * global_batch / REFERENCE_BATCH,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_steps=(
            default_warmup_steps(total_steps) if args.warmup_steps is None else args.warmup_steps
        ),
        warmup_factor=args.warmup_factor,
        schedule=args.schedule,
        milestone_epochs=tuple(args.lr_steps or default_milestones(args.epochs)),
        gamma=args.gamma,
        clip_grad=args.clip_grad,
    )
    trainer = Trainer(model, schedule, precision, ranks)
    if resume is not None:
        if int(resume.get("steps_per_epoch", steps_per_epoch)) != steps_per_epoch:
            raise TrainError(
                f"{resume_path} ran {resume['steps_per_epoch']} steps per epoch, this run "
                f"{steps_per_epoch}: pass --steps-per-epoch {resume['steps_per_epoch']}"
            )
        trainer.load_state_dict(resume, origin=str(resume_path))

    train_set = open_shards(
        args.train,
        shuffle=args.shuffle,
        train=True,
        seed=args.seed,
        epoch_samples=steps_per_epoch * args.batch_size,
        # Evaluation scores masks as annotated; training on occluded masks would teach the
        # model to predict visible parts and cap mask IoU on every overlapped object.
        resolve_occlusion=args.train_masks == "visible",
        decode_images=not args.gpu_decode,
        shard_cache=args.shard_cache,
        shard_cache_bytes=args.shard_cache_size,
        **storage,
    )
    # Persistent workers copy the dataset once and advance its epoch themselves, so the
    # starting epoch is set before they start (it matters when resuming).
    train_set.set_epoch(trainer.step // steps_per_epoch)
    loader = make_batches(train_set, args.batch_size, args.workers, device=ranks.device)
    if resume is not None:
        _seek_loader(loader, resume, trainer, ranks, steps_per_epoch)

    if ranks.is_main:
        out.prepare()
        out.publish_bytes("args.json", json.dumps(vars(args), indent=1, default=str).encode())
        out.resume_metrics(trainer.step if resume is not None else None)
        _announce(args, ranks, classes, schedule, precision.name, layout, resume_path)
    extra_state = {
        "args": vars(args),
        "classes": classes,
        "layout": layout.to_dict(),
    }
    options = RunOptions(
        out=out,
        seed=args.seed,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        checkpoint_every_s=args.checkpoint_every_s,
        keep_checkpoints=args.keep_checkpoints,
        stop=stop,
        data_state=loader.state_dict,
        on_log=tensorboard.log if tensorboard is not None else None,
        stop_after=args.stop_after,
        time_limit_s=None if args.time_limit_minutes is None else args.time_limit_minutes * 60,
        progress=not args.no_progress,
        extra_state=extra_state,
    )
    history: list[dict[str, Any]] = _previous_history(out) if resume is not None else []
    evaluated_at: list[int] = []

    def evaluate_now(epochs_done: int) -> dict[str, Any] | None:
        evaluated_at.append(trainer.step)
        minutes = (time.monotonic() - started) / 60
        return _evaluate(
            args, ranks, trainer, val, classes, precision, out, epochs_done, history, minutes
        )

    def after_epoch(epochs_done: int) -> bool:
        """Periodic evaluation; True (on every rank) stops training at the target mAP."""
        due = val is not None and args.eval_every and epochs_done % args.eval_every == 0
        if not due or epochs_done == args.epochs:
            return False  # the final evaluation follows the loop
        result = evaluate_now(epochs_done)
        return any_rank(_reached(result, args.stop_at_map), ranks)

    try:
        trainer.fit(lambda epoch: device_batches(loader, ranks.device), options, after_epoch)
        # Evaluate at the end and when time ran out, not after an interruption (--stop-after,
        # a signal).
        result = None
        ended = trainer.stop_reason in (None, "time limit")
        if val is not None and ended and trainer.step not in evaluated_at:
            result = evaluate_now(trainer.step // steps_per_epoch)
    finally:
        if ranks.is_main:
            out.flush_metrics(force=True)
        if tensorboard is not None:
            tensorboard.close(out)
    barrier(ranks)
    if ranks.is_main:
        _farewell(out, trainer.stop_reason, trainer.step, history, stop)
    return result


def _reached(result: dict[str, Any] | None, target: float | None) -> bool:
    if result is None or target is None:
        return False
    value = result["open_images"]["map"]
    return value == value and value >= target  # NaN (no ground truth) never reaches it


def _resume_state(
    args: argparse.Namespace, out: RunDir, classes: list[dict[str, Any]]
) -> tuple[str | None, dict[str, Any] | None]:
    if args.resume is None:
        return None, None
    if args.resume == "auto":
        found = out.latest_checkpoint()
        if found is None:
            return None, None  # nothing to continue: start afresh
        _, where, path = found
        state = ckpt.load_checkpoint(path)
        if out.remote:
            path.unlink(missing_ok=True)  # the staged download; the state is in memory
    else:
        where, state = args.resume, _read_checkpoint(args.resume, args.endpoint_url)
    ckpt.check_classes(state, classes, where)
    for key in ("model", "optimizer", "scheduler", "step", "rng", "layout"):
        if key not in state:
            raise TrainError(f"{where} is not a training checkpoint (it has no {key!r})")
    return where, state


def _read_checkpoint(location: str, endpoint_url: str | None) -> dict[str, Any]:
    """A checkpoint given by path or URL, read into memory; a URL's bytes go through a
    temporary file that is removed once read (a checkpoint is hundreds of MB)."""
    if "://" not in location or location.startswith("file://"):
        return ckpt.load_checkpoint(location.removeprefix("file://"))
    import tempfile

    fs, path = sources.filesystem(location, sources.storage_options(location, endpoint_url))
    handle, local = tempfile.mkstemp(suffix=".pt", prefix="oistream-weights-")
    os.close(handle)
    try:
        fs.get_file(path, local)
        return ckpt.load_checkpoint(local)
    finally:
        os.unlink(local)


def _seek_loader(
    loader: Any, state: dict[str, Any], trainer: Trainer, ranks: Ranks, steps_per_epoch: int
) -> None:
    """Give the loader this rank's saved position, so the resumed epoch is not replayed;
    without a usable one (an older checkpoint, other workers or ranks) the engine replays."""
    data = state.get("data")
    if not isinstance(data, list) or len(data) != ranks.world_size:
        return
    position = data[ranks.rank]
    epoch, batches = divmod(trainer.step, steps_per_epoch)
    if not isinstance(position, dict) or (position.get("epoch"), position.get("batches")) != (
        epoch,
        batches,
    ):
        return
    try:
        loader.load_state_dict(position)
    except ValueError as error:
        if ranks.is_main:
            print(f"{PROG}: replaying the epoch's start: {error}", file=sys.stderr)
        return
    trainer.positioned_at = trainer.step


def _check_same_classes(
    theirs: list[dict[str, Any]], ours: list[dict[str, Any]], their_source: str, our_source: str
) -> None:
    """Validation shards must have the training shards' classes, in the same order."""
    if theirs == ours:
        return
    names = [c["name"] for c in ours[1:]]
    other = [c["name"] for c in theirs[1:]]
    missing = [n for n in names if n not in other]
    extra = [n for n in other if n not in names]
    if missing or extra:
        detail = (
            f"only in {our_source}: {missing or 'none'}; only in {their_source}: {extra or 'none'}"
        )
    else:
        moved = [
            f"{i + 1}: {a} vs {b}"
            for i, (a, b) in enumerate(zip(names, other, strict=True))
            if a != b
        ]
        detail = "same names in another order (index " + ", ".join(moved[:5]) + ")"
    raise TrainError(f"{their_source} has other classes than {our_source}: {detail}")


def _layout(args: argparse.Namespace, state: dict[str, Any] | None, path: Any) -> Layout:
    """The checkpoint's layout if one is loaded (it records the architecture, so --backbone and
    --model need not repeat it), else the flags'."""
    if state is None or "layout" not in state:
        weights = args.weights if args.weights in ("coco", "imagenet", "none") else "none"
        return layout_for(
            args.model,
            weights,
            args.trainable_backbone_layers,
            args.backbone,
            args.anchor_sizes,
            args.channels,
        )
    return Layout.from_dict(state["layout"])


def _evaluate(
    args: argparse.Namespace,
    ranks: Ranks,
    trainer: Trainer,
    val: Any,
    classes: list[dict[str, Any]],
    precision: Any,
    out: RunDir,
    epoch: int,
    history: list[dict[str, Any]],
    minutes: float,
) -> dict[str, Any] | None:
    from tqdm import tqdm

    loader = make_batches(
        val, args.batch_size, min(args.workers, 2), device=ranks.device, persistent=False
    )
    batches = device_batches(
        tqdm(loader, desc="eval", unit="batch", leave=False, disable=_quiet(args, ranks)),
        ranks.device,
        targets_too=False,
    )
    pictures = None
    if ranks.is_main and args.num_predictions:
        pictures = PredictionPictures(
            out.staging("predictions/.staging/picture").parent,
            class_names(classes),
            args.num_predictions,
        )
    result = evaluate(
        trainer.model,
        batches,
        classes=classes,
        ranks=ranks,
        precision=precision,
        ground_truth_source=args.val,
        ground_truth_options=sources.storage_options(args.val, args.endpoint_url),
        publish_predictions=lambda data: out.publish_bytes(PREDICTIONS_CSV, data),
        max_images=args.max_val_images,
        on_prediction=pictures,
    )
    if result is None:
        return None
    result = {"step": trainer.step, "epoch": epoch, **result}
    headline = {
        "step": trainer.step,
        "epoch": epoch,
        "minutes": round(minutes, 3),  # from the process start to this evaluation
        "mask_mAP@0.5": result["open_images"]["map"],
        "coco_mask_AP": result["coco"]["mask"]["AP"],
        "coco_box_AP": result["coco"]["box"]["AP"],
    }
    history.append(headline)
    result["history"] = history
    result["predictions"] = [
        out.publish(path, f"predictions/{path.name}")
        for path in (pictures.written if pictures else [])
    ]
    if pictures is not None:
        with contextlib.suppress(OSError):
            pictures.folder.rmdir()  # the emptied staging folder of a local run
    out.publish_bytes("eval.json", json.dumps(_json_safe(result), indent=1).encode())
    out.log(_json_safe({"eval": headline}), force=True)
    tqdm.write(
        f"step {trainer.step}: mask mAP@0.5 {headline['mask_mAP@0.5']:.3f}, "
        f"COCO mask AP {headline['coco_mask_AP']:.3f}, box AP {headline['coco_box_AP']:.3f} "
        f"({result['images']} images)",
        file=sys.stderr,
    )
    return result


def _json_safe(value: Any) -> Any:
    """NaN (a metric without ground truth to score) becomes null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _previous_history(out: RunDir) -> list[dict[str, Any]]:
    try:
        return list(json.loads(out.read_bytes("eval.json") or b"{}").get("history", []))
    except (OSError, ValueError, AttributeError):
        return []


def _quiet(args: argparse.Namespace, ranks: Ranks) -> bool:
    return args.no_progress or not ranks.is_main


def _announce(
    args: argparse.Namespace,
    ranks: Ranks,
    classes: list[dict[str, Any]],
    schedule: Schedule,
    precision: str,
    layout: Layout,
    resume_path: str | None,
) -> None:
    names = ", ".join(c["name"] for c in classes[1:])
    start = f"resuming {resume_path}" if resume_path else f"weights {args.weights}"
    print(
        f"{layout.describe()} ({start}), {len(classes) - 1} classes: {names}\n"
        f"{ranks.world_size} process(es) on {ranks.device}, AMP {precision}, "
        f"batch {args.batch_size}/rank, lr {schedule.lr:g}, {schedule.epochs} epochs x "
        f"{schedule.steps_per_epoch} steps -> {args.out}",
        file=sys.stderr,
        flush=True,
    )


def _farewell(
    out: RunDir,
    stop_reason: str | None,
    step: int,
    history: list[dict[str, Any]],
    stop: StopRequest | None = None,
) -> None:
    if stop_reason == "signal" and stop is not None:
        print(
            f"stopped by {stop.signal} at step {step}; resume with --resume auto", file=sys.stderr
        )
        return
    state = {
        None: "finished",
        "time limit": f"stopped by the time limit at step {step}",
        "after_epoch": f"reached the target mAP at step {step}",
        "stop_after": f"stopped at step {step} (continue with --resume auto)",
    }[stop_reason]
    lines = [f"training {state}", f"  checkpoints: {out.join('checkpoints')}"]
    lines.append(f"  metrics:     {out.join('metrics.jsonl')}")
    if history:
        last = history[-1]
        lines.append(
            f"  evaluation:  {out.join('eval.json')} (step {last['step']}: mask mAP@0.5 "
            f"{last['mask_mAP@0.5']:.3f}, COCO mask AP {last['coco_mask_AP']:.3f})"
        )
        lines.append(f"  pictures:    {out.join('predictions')}")
    print("\n".join(lines), file=sys.stderr, flush=True)


class _TensorBoard:
    """``--tensorboard``: event files written locally, published into OUT/tensorboard."""

    def __init__(self, writer: Any, folder: Path) -> None:
        self.writer, self.folder = writer, folder

    def log(self, record: dict[str, Any]) -> None:
        for name, value in record.items():
            if name not in ("step", "epoch") and isinstance(value, int | float):
                self.writer.add_scalar(f"train/{name}", value, record["step"])

    def close(self, out: RunDir) -> None:
        self.writer.close()
        for path in sorted(self.folder.iterdir()):
            if out.remote:
                out.publish(path, f"tensorboard/{path.name}")


def _tensorboard_writer(args: argparse.Namespace, ranks: Ranks, out: RunDir) -> _TensorBoard | None:
    if not args.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError(
            "--tensorboard needs the tensorboard package: pip install tensorboard "
            "(or pip install 'oistream[tensorboard]')"
        ) from None
    if not ranks.is_main:
        return None
    folder = (
        Path(out.root) / "tensorboard" if not out.remote else out.staging("tensorboard/x").parent
    )
    folder.mkdir(parents=True, exist_ok=True)
    return _TensorBoard(SummaryWriter(log_dir=str(folder)), folder)
