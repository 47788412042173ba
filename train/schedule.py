"""Learning-rate schedule: linear warm-up, then step decay or cosine decay, counted in steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class Schedule:
    """The optimizer and learning-rate settings of a run, counted in steps."""

    epochs: int
    steps_per_epoch: int
    lr: float  # already scaled to the global batch
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    warmup_factor: float = 0.001
    schedule: str = "step"
    milestone_epochs: tuple[int, ...] = ()
    gamma: float = 0.1
    clip_grad: float | None = None

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def default_warmup_steps(total_steps: int) -> int:
    """torchvision's 1000 warm-up iterations, but never more than a tenth of a short run."""
    return min(1000, max(total_steps // 10, 0))


def default_milestones(epochs: int) -> list[int]:
    """Epoch milestones in the reference recipe's proportions (16 and 22 of 24ish epochs)."""
    return sorted({max(1, round(epochs * 2 / 3)), max(1, round(epochs * 8 / 9))})


def lr_factor(
    *,
    total_steps: int,
    warmup_steps: int,
    warmup_factor: float,
    schedule: str,
    milestone_steps: Sequence[int] = (),
    gamma: float = 0.1,
) -> Callable[[int], float]:
    """The multiplier of the base lr at each optimizer step (0-based)."""
    if schedule not in ("step", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            # Linear from warmup_factor at step 0 to 1 at the end of warm-up.
            alpha = step / warmup_steps
            warm = warmup_factor * (1 - alpha) + alpha
        else:
            warm = 1.0
        if schedule == "step":
            decay = gamma ** sum(step >= m for m in milestone_steps)
        else:
            span = max(total_steps - warmup_steps, 1)
            progress = min(max(step - warmup_steps, 0) / span, 1.0)
            decay = 0.5 * (1 + math.cos(math.pi * progress))
        return warm * decay

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    warmup_factor: float = 0.001,
    schedule: str = "step",
    milestone_steps: Sequence[int] = (),
    gamma: float = 0.1,
) -> LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer step; its state dict resumes the position."""
    return LambdaLR(
        optimizer,
        lr_factor(
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            warmup_factor=warmup_factor,
            schedule=schedule,
            milestone_steps=list(milestone_steps),
            gamma=gamma,
        ),
    )
