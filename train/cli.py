"""``python -m train``: wires the command line, shards, model, engine and evaluation together.

Outputs under ``--out``: ``checkpoints/step-NNNNNNN.pt``, ``metrics.jsonl`` (a line per logging
window and per evaluation), ``eval.json`` (the latest evaluation and the history of its headline
numbers) and ``predictions/*.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oistream import OistreamError

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
from .engine import RunOptions, Trainer, make_deterministic, seed_everything
from .errors import TrainError
from .evaluate import evaluate
from .model import Layout, build_model, layout_for, load_model_state
from .precision import choose_precision
from .predictions import PredictionPictures
from .schedule import Schedule, default_milestones, default_warmup_steps

PROG = "python -m train"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)  # exits 2 with one line on a usage error
    try:
        ranks = init_distributed(args.device)
    except (TrainError, ValueError, RuntimeError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    try:
        run(args, ranks)
        return 0
    except (TrainError, OistreamError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown(ranks)


def run(args: argparse.Namespace, ranks: Ranks) -> dict[str, Any] | None:
    """Train (or continue) and evaluate; returns the final evaluation on rank 0."""
    started = time.monotonic()
    if args.deterministic:
        make_deterministic()
    seed_everything(args.seed, ranks.rank)
    precision = choose_precision(args.amp, ranks.device)
    if args.gpu_decode:
        check_gpu_decode_supported(ranks.device)
    out = Path(args.out)

    # The manifest decides the classes; validation shards must agree with it.
    probe = open_shards(args.train, shuffle=0, train=False)
    classes = describe_classes(probe.classes)
    num_classes = len(classes) - 1
    if num_classes < 1:
        raise TrainError(f"{args.train} lists no object classes")
    val = None
    if args.val:
        val = open_shards(args.val, shuffle=0, train=False, resolve_occlusion=False)
        if describe_classes(val.classes) != classes:
            raise TrainError(f"{args.val} has other classes than {args.train}")

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
    if resume is None and args.weights not in ("coco", "none"):
        init_path = Path(args.weights)
        init = ckpt.load_checkpoint(init_path)
        ckpt.check_classes(init, classes, init_path)
    layout = _layout(args, resume or init, resume_path or init_path)
    model = build_model(
        layout,
        num_classes,
        coco_weights=args.weights == "coco" and resume is None,
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
    )
    # Persistent workers copy the dataset once and advance its epoch themselves, so the
    # starting epoch is set before they start (it matters when resuming).
    train_set.set_epoch(trainer.step // steps_per_epoch)
    loader = make_batches(train_set, args.batch_size, args.workers, device=ranks.device)

    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
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
        keep_checkpoints=args.keep_checkpoints,
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

    trainer.fit(lambda epoch: device_batches(loader, ranks.device), options, after_epoch)
    # Evaluate at the end and when time ran out, not after an interruption (--stop-after).
    result = None
    ended = trainer.stop_reason in (None, "time limit")
    if val is not None and ended and trainer.step not in evaluated_at:
        result = evaluate_now(trainer.step // steps_per_epoch)
    barrier(ranks)
    if ranks.is_main:
        _farewell(out, trainer.stop_reason, trainer.step, history)
    return result


def _reached(result: dict[str, Any] | None, target: float | None) -> bool:
    if result is None or target is None:
        return False
    value = result["open_images"]["mAP@0.5"]
    return value == value and value >= target  # NaN (no ground truth) never reaches it


def _resume_state(
    args: argparse.Namespace, out: Path, classes: list[dict[str, Any]]
) -> tuple[Path | None, dict[str, Any] | None]:
    if args.resume is None:
        return None, None
    if args.resume == "auto":
        path = ckpt.latest_checkpoint(out)
        if path is None:
            return None, None  # nothing to continue: start afresh
    else:
        path = Path(args.resume)
    state = ckpt.load_checkpoint(path)
    ckpt.check_classes(state, classes, path)
    for key in ("model", "optimizer", "scheduler", "step", "rng", "layout"):
        if key not in state:
            raise TrainError(f"{path} is not a training checkpoint (it has no {key!r})")
    return path, state


def _layout(args: argparse.Namespace, state: dict[str, Any] | None, path: Path | None) -> Layout:
    """The checkpoint's layout if one is loaded (it must agree with --model), else the flags'."""
    if state is None or "layout" not in state:
        weights = args.weights if args.weights in ("coco", "none") else "none"
        return layout_for(args.model, weights, args.trainable_backbone_layers)
    layout = Layout.from_dict(state["layout"])
    if layout.variant != args.model:
        raise TrainError(f"{path} holds a {layout.variant} model: pass --model {layout.variant}")
    return layout


def _evaluate(
    args: argparse.Namespace,
    ranks: Ranks,
    trainer: Trainer,
    val: Any,
    classes: list[dict[str, Any]],
    precision: Any,
    out: Path,
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
            out / "predictions", class_names(classes), args.num_predictions
        )
    result = evaluate(
        trainer.model,
        batches,
        classes=classes,
        ranks=ranks,
        precision=precision,
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
        "mask_mAP@0.5": result["open_images"]["mAP@0.5"],
        "coco_mask_AP": result["coco"]["segm"]["AP"],
        "coco_box_AP": result["coco"]["bbox"]["AP"],
    }
    history.append(headline)
    result["history"] = history
    result["predictions"] = [str(p) for p in (pictures.written if pictures else [])]
    (out / "eval.json").write_text(json.dumps(_json_safe(result), indent=1))
    with (out / "metrics.jsonl").open("a") as stream:
        stream.write(json.dumps(_json_safe({"eval": headline})) + "\n")
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


def _previous_history(out: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads((out / "eval.json").read_text()).get("history", []))
    except (OSError, ValueError):
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
    resume_path: Path | None,
) -> None:
    names = ", ".join(c["name"] for c in classes[1:])
    start = f"resuming {resume_path}" if resume_path else f"weights {args.weights}"
    print(
        f"Mask R-CNN R50-FPN {layout.variant} ({start}), {len(classes) - 1} classes: {names}\n"
        f"{ranks.world_size} process(es) on {ranks.device}, AMP {precision}, "
        f"batch {args.batch_size}/rank, lr {schedule.lr:g}, {schedule.epochs} epochs x "
        f"{schedule.steps_per_epoch} steps -> {args.out}",
        file=sys.stderr,
        flush=True,
    )


def _farewell(out: Path, stop_reason: str | None, step: int, history: list[dict[str, Any]]) -> None:
    state = {
        None: "finished",
        "time limit": f"stopped by the time limit at step {step}",
        "after_epoch": f"reached the target mAP at step {step}",
        "stop_after": f"stopped at step {step} (continue with --resume auto)",
    }[stop_reason]
    lines = [f"training {state}", f"  checkpoints: {out / 'checkpoints'}"]
    lines.append(f"  metrics:     {out / 'metrics.jsonl'}")
    if history:
        last = history[-1]
        lines.append(
            f"  evaluation:  {out / 'eval.json'} (step {last['step']}: mask mAP@0.5 "
            f"{last['mask_mAP@0.5']:.3f}, COCO mask AP {last['coco_mask_AP']:.3f})"
        )
        lines.append(f"  pictures:    {out / 'predictions'}")
    print("\n".join(lines), file=sys.stderr, flush=True)
