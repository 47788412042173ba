"""Mixed precision: which autocast dtype to use, and whether fp16 needs a gradient scaler."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import TrainError


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # None: full fp32, no autocast
    device_type: str

    @property
    def name(self) -> str:
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        # bf16 has fp32's exponent range; only fp16 gradients underflow without scaling.
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)


def choose_precision(mode: str, device: torch.device) -> Precision:
    """``auto``: bf16 on CUDA devices that support it, fp16 on older GPUs, off on the CPU."""
    if device.type != "cuda":
        if mode in ("bf16", "fp16"):
            raise TrainError(f"--amp {mode} needs a CUDA device; use --amp off or auto on the CPU")
        return Precision(None, device.type)
    if mode == "off":
        return Precision(None, "cuda")
    if mode == "fp16":
        return Precision(torch.float16, "cuda")
    bf16_ok = torch.cuda.is_bf16_supported()
    if mode == "bf16" and not bf16_ok:
        raise TrainError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bf16 support")
    return Precision(torch.bfloat16 if bf16_ok else torch.float16, "cuda")
