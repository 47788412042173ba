"""The training loop: fixed steps per epoch on every rank, AMP, DDP, checkpoints and metrics.

Data comes from ``batches_for_epoch(epoch)``, any iterable of ``(images, targets)`` already on
the device; the engine knows nothing of shards, which keeps it testable with in-memory batches.

Reproducibility: before each epoch's iterator is created the RNGs are seeded from
``(seed, rank, epoch)`` (DataLoader workers draw their seeds then), and before each step from
``(seed, rank, step)``. A run resumed at step ``s`` continues epoch ``s // steps_per_epoch``
where it stood: the loader seeks to the position saved in the checkpoint (``positioned_at``),
or, for data without a saved position, the engine replays the batches already trained on.
Either way the next step has exactly the RNG state the uninterrupted run had: with
``--deterministic`` the next-step loss is the same.

Preemption: ``RunOptions.stop`` (set by a signal handler) is checked after every step; all
ranks agree on it through one all-reduce per step, so every rank stops after the same step,
checkpoints and returns with ``stop_reason == "signal"``.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint as ckpt
from .distributed import Ranks, average_scalars, gather_to_main, max_over_ranks
from .errors import TrainError
from .metrics import LossWindow, all_finite
from .model import load_model_state
from .precision import Precision
from .schedule import Schedule, build_scheduler

if TYPE_CHECKING:
    from .rundir import RunDir

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]


def seed_everything(*parts: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from a tuple of integers."""
    seed = int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_deterministic() -> None:
    """Deterministic kernels where torch has them (warn, don't fail, where it has not)."""
    # cuBLAS needs this before its first use to be deterministic.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


class StopRequest:
    """Set by a signal handler (``signal`` names it); the loop stops after the current step."""

    def __init__(self) -> None:
        self.signal: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def number(self) -> int:
        """The signal's number, 0 when none arrived."""
        return signal.Signals[self.signal].value if self.signal is not None else 0

    def agree(self, number: int) -> None:
        """Take the signal the ranks agreed on (another rank's, when this one saw none)."""
        if self.signal is None:
            self.signal = signal.Signals(number).name


@dataclass
class RunOptions:
    out: RunDir
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int | None = 500  # steps (None: by time only)
    checkpoint_every_s: float | None = None  # seconds of training between checkpoints
    keep_checkpoints: int = 2
    stop: StopRequest | None = None
    data_state: Callable[[], Any] | None = None  # the loader's position, saved per rank
    on_log: Callable[[dict[str, Any]], None] | None = None  # e.g. TensorBoard (rank 0)
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in total
    time_limit_s: float | None = None  # stop (with a checkpoint) after this much training time
    progress: bool = True
    extra_state: dict[str, Any] | None = None  # saved in every checkpoint (args, classes)


class Trainer:
    """One model, its optimizer, schedule and scaler, and the position in training."""

    def __init__(
        self, model: torch.nn.Module, schedule: Schedule, precision: Precision, ranks: Ranks
    ) -> None:
        self.model = model.to(ranks.device)
        self.schedule = schedule
        self.precision = precision
        self.ranks = ranks
        if ranks.distributed:
            device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
            self.forward_model: torch.nn.Module = DistributedDataParallel(
                self.model, device_ids=device_ids
            )
        else:
            self.forward_model = self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            self.params,
            lr=schedule.lr,
            momentum=schedule.momentum,
            weight_decay=schedule.weight_decay,
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            total_steps=schedule.total_steps,
            warmup_steps=schedule.warmup_steps,
            warmup_factor=schedule.warmup_factor,
            schedule=schedule.schedule,
            milestone_steps=[e * schedule.steps_per_epoch for e in schedule.milestone_epochs],
            gamma=schedule.gamma,
        )
        self.scaler = precision.make_scaler()
        self.step = 0  # optimizer steps done
        self.stop_reason: str | None = None  # why the last fit ended early
        self.last_lr = schedule.lr
        # The step at which the data stream is already positioned (a loader that was given
        # the checkpoint's position): that epoch is not replayed.
        self.positioned_at: int | None = None

    # -- one step ---------------------------------------------------------------------------

    def train_step(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> dict:
        """Forward, backward, optimizer and schedule step; returns the detached losses."""
        self.forward_model.train()
        with self.precision.autocast():
            losses = self.forward_model(images, targets)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.schedule.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.schedule.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used
        self.scheduler.step()
        self.step += 1
        return {name: value.detach() for name, value in losses.items()}

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.schedule.steps_per_epoch,
            "steps_per_epoch": self.schedule.steps_per_epoch,
            "world_size": self.ranks.world_size,
            "rng": ckpt.rng_state(),
            **(extra or {}),
        }

    def load_state_dict(self, state: dict[str, Any], origin: str = "checkpoint") -> None:
        """Everything needed to continue: weights, momentum, schedule, scaler, step, RNG."""
        load_model_state(self.model, state["model"], origin)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        ckpt.set_rng_state(state["rng"])

    def save(self, options: RunOptions) -> str | None:
        """Rank 0 publishes ``OUT/checkpoints/step-NNNNNNN.pt`` (with every rank's loader
        position) after the metrics logged so far, then prunes old ones. Every rank calls it."""
        data = None
        if options.data_state is not None:
            data = gather_to_main(options.data_state(), self.ranks)
        if not self.ranks.is_main:
            return None
        out = options.out
        out.flush_metrics(force=True)  # no line logged before this checkpoint can be lost
        state = self.state_dict(options.extra_state)
        if data is not None:
            state["data"] = data
        staged = out.staging(out.checkpoint_name(self.step))
        ckpt.save_checkpoint(state, staged)
        where = out.publish_checkpoint(staged, self.step)
        out.prune_checkpoints(options.keep_checkpoints, newest=self.step)
        return where

    # -- the loop ---------------------------------------------------------------------------

    def fit(
        self,
        batches_for_epoch: Callable[[int], Iterable[Batch]],
        options: RunOptions,
        after_epoch: Callable[[int], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Train from ``self.step`` to the end; returns the metrics records written.

        Training ends early at ``options.stop_after`` steps, when ``options.time_limit_s`` has
        passed, or when ``after_epoch(epochs_done)`` returns True (it must return the same on
        every rank); ``self.stop_reason`` then says which. A checkpoint is written either way.
        """
        sched = self.schedule
        records: list[dict[str, Any]] = []
        end = sched.total_steps
        if options.stop_after is not None:
            end = min(end, options.stop_after)
        started = time.monotonic()
        self.stop_reason = None
        bar = tqdm(
            total=sched.total_steps,
            initial=self.step,
            disable=not (self.ranks.is_main and options.progress),
            unit="step",
            dynamic_ncols=True,
        )
        window = LossWindow()
        last_saved = -1
        saved_at = time.monotonic()
        try:
            while self.step < end and self.stop_reason is None:
                epoch = self.step // sched.steps_per_epoch
                epoch_end = min((epoch + 1) * sched.steps_per_epoch, end)
                batches = self._epoch_stream(batches_for_epoch, epoch, options.seed)
                while self.step < epoch_end and self.stop_reason is None:
                    self._seed_step(options.seed, self.step)
                    waited = time.perf_counter()
                    images, targets = next(batches)
                    waited = time.perf_counter() - waited
                    # Again after the fetch: starting a DataLoader iterator draws from the
                    # global RNG, which a resumed run does at another step than the
                    # uninterrupted one; the step's own draws must not depend on that.
                    self._seed_step(options.seed, self.step)
                    losses = self.train_step(images, targets)
                    window.add(losses, len(images), waited)
                    bar.update(1)
                    time_up = (
                        options.time_limit_s is not None
                        and time.monotonic() - started >= options.time_limit_s
                    )
                    if self.step % options.log_every == 0 or self.step == end:
                        record, time_up = self._log(window, epoch, bar, time_up)
                        if self.ranks.is_main:
                            options.out.log(record)
                            if options.on_log is not None:
                                options.on_log(record)
                        records.append(record)
                        window = LossWindow()
                    elif self.ranks.distributed:
                        # Ranks agree on stopping only where they meet: at logging steps.
                        time_up = False
                    # A signal or the checkpoint clock: one all-reduce so all ranks agree.
                    # The signal's number travels, so a rank the scheduler did not signal
                    # stops at the same step and exits with the same code.
                    signal_number = options.stop.number if options.stop is not None else 0
                    clock_due = (
                        options.checkpoint_every_s is not None
                        and time.monotonic() - saved_at >= options.checkpoint_every_s
                    )
                    agreed_signal, agreed_clock = max_over_ranks(
                        [float(signal_number), float(clock_due)], self.ranks
                    )
                    signalled, clock_due = agreed_signal > 0, agreed_clock > 0
                    if signalled and options.stop is not None:
                        options.stop.agree(int(agreed_signal))
                    step_due = bool(
                        options.checkpoint_every and self.step % options.checkpoint_every == 0
                    )
                    if step_due or clock_due or signalled:
                        self.save(options)
                        last_saved, saved_at = self.step, time.monotonic()
                    if signalled:
                        self.stop_reason = "signal"
                    elif time_up:
                        self.stop_reason = "time limit"
                if (
                    self.step % sched.steps_per_epoch == 0
                    and after_epoch is not None
                    and after_epoch(self.step // sched.steps_per_epoch)
                ):
                    self.stop_reason = self.stop_reason or "after_epoch"
        finally:
            bar.close()
        if self.stop_reason is None and self.step < sched.total_steps:
            self.stop_reason = "stop_after"
        if last_saved != self.step:
            self.save(options)
        return records

    def _epoch_stream(
        self, batches_for_epoch: Callable[[int], Iterable[Batch]], epoch: int, seed: int
    ) -> Iterator[Batch]:
        """Epoch ``epoch``'s batches, positioned at ``self.step``, repeated if they run short.

        Every rank takes exactly ``steps_per_epoch`` steps whatever its shards hold, so no rank
        waits in an all-reduce for one that ran dry (uneven shards would otherwise hang DDP).
        """
        seed_everything(seed, self.ranks.rank, 0, epoch)
        stream = _repeat(batches_for_epoch, epoch)
        positioned, self.positioned_at = self.positioned_at == self.step, None
        if positioned:
            return stream  # the loader seeks to the checkpoint's position itself
        # Resuming mid-epoch without a saved position: replay the batches already trained on,
        # each drawn under the seed its step had, as a loader without workers draws from it.
        for step in range(epoch * self.schedule.steps_per_epoch, self.step):
            self._seed_step(seed, step)
            next(stream)
        return stream

    def _seed_step(self, seed: int, step: int) -> None:
        seed_everything(seed, self.ranks.rank, 1, step)

    def _log(
        self, window: LossWindow, epoch: int, bar: tqdm, time_up: bool
    ) -> tuple[dict[str, Any], bool]:
        """The window's metrics averaged over ranks, and whether any rank's time is up."""
        values = {**window.means(), **window.timing(), "time_up": float(time_up)}
        values = average_scalars(values, self.ranks)  # every rank logs at the same steps
        time_up = values.pop("time_up") > 0
        values["images_per_s"] *= self.ranks.world_size  # global throughput
        if not all_finite(values):
            raise TrainError(
                f"loss is not finite at step {self.step} ({values['loss']}): "
                "lower --lr, raise --warmup-steps or set --clip-grad"
            )
        record = {
            "step": self.step,
            "epoch": epoch,
            "lr": self.last_lr,
            **{k: round(v, 6) for k, v in values.items()},
        }
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=False)
        return record, time_up


def _repeat(batches_for_epoch: Callable[[int], Iterable[Batch]], epoch: int) -> Iterator[Batch]:
    """Endless batches: the epoch's iterable, started again whenever it ends."""
    while True:
        produced = False
        for batch in batches_for_epoch(epoch):
            produced = True
            yield batch
        if not produced:
            raise TrainError("the training data yielded no batch (empty shards on this rank?)")
