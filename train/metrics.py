"""Training metrics: per-window loss averages and timing (``RunDir.log`` writes them)."""

from __future__ import annotations

import math
import time

import torch


class LossWindow:
    """Sums of the detached loss tensors over a logging window.

    Accumulating tensors (not ``.item()`` each step) keeps the GPU from synchronising with the
    host every step; ``.item()`` happens once per window.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.images = 0
        self.data_wait_s = 0.0
        self.started = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], images: int, data_wait_s: float) -> None:
        for name, value in losses.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps += 1
        self.images += images
        self.data_wait_s += data_wait_s

    def means(self) -> dict[str, float]:
        """Mean of each loss over the window's steps, ``loss`` being their total."""
        means = {name: float(total) / self.steps for name, total in self.sums.items()}
        means["loss"] = sum(means.values())
        return means

    def timing(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {
            "images_per_s": self.images / elapsed,
            "data_wait_fraction": min(self.data_wait_s / elapsed, 1.0),
            "step_s": elapsed / max(self.steps, 1),
        }


def all_finite(values: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in values.values())
