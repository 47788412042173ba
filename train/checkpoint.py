"""Checkpoints: write atomically, keep the newest few, read back safely, carry the RNG state.

A checkpoint is a dict: ``model``, ``optimizer``, ``scheduler``, ``scaler`` (state dicts),
``step`` (optimizer steps done), ``epoch``, ``rng`` (Python, NumPy, torch CPU and CUDA
generators), ``args`` (the command line as a dict) and ``classes`` (the manifest's class list).
It is read with ``torch.load(weights_only=True)``: nothing in it runs code when loaded.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import TrainError


def rng_state() -> dict[str, Any]:
    """Every generator a training step draws from, in a form ``weights_only`` loading accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _as_tuples(value: Any) -> Any:
    # random.setstate wants tuples all the way down; serialisation may hand back lists.
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(v) for v in value)
    return value


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a local staging path; ``RunDir.publish_checkpoint`` makes it visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU; a missing or unreadable file is one ``TrainError`` line."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to read means a bad file
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TrainError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(state, dict):
        raise TrainError(f"{path} is not a checkpoint (expected a dict)")
    return state


def model_state_of(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of our checkpoint, or the dict itself if it is a bare state dict."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        raise TrainError("checkpoint holds no model state dict")
    return state


def check_classes(checkpoint: dict[str, Any], classes: list[dict[str, Any]], path: Any) -> None:
    """A checkpoint trained on other classes than the manifest's cannot continue on these shards."""
    saved = checkpoint.get("classes")
    if saved is None:
        return
    names = [(c.get("mid"), c.get("name")) for c in classes]
    saved_names = [(c.get("mid"), c.get("name")) for c in saved]
    if names != saved_names:
        ours = ", ".join(str(n) for _, n in names[1:]) or "none"
        theirs = ", ".join(str(n) for _, n in saved_names[1:]) or "none"
        raise TrainError(
            f"checkpoint {path} was trained on classes [{theirs}] but the shards' manifest has "
            f"[{ours}]"
        )
