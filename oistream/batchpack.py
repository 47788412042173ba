"""Batches cross from DataLoader workers to the trainer as one flat tensor per dtype.

A worker hands each tensor of a batch to the main process as its own shared-memory segment:
one file descriptor, sent over a socket to a fresh connection, per tensor. A batch of 8
Mask R-CNN samples holds 56 tensors (image, masks, boxes, labels, area, iscrowd, image_id), and
receiving them costs the main process about 12 ms of mostly Python work per batch, in the
thread that also launches the GPU's kernels: the larger part of the loader's overhead on a
training step of 150 ms. Packed, the same batch is 3 or 4 tensors (about 1 ms to receive), and
pinning copies a few large buffers instead of dozens of small ones.

The batch keeps its structure (lists, tuples, dicts, strings, numbers); only its tensors are
moved into the buffers and come back as views of them, with their shapes and dtypes. A view
keeps its whole buffer alive: code that keeps one tensor of many batches (a mask, say) should
keep a copy or an encoding of it, as the trainer's evaluation does (RLE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class _Slot:
    """Where a tensor went: piece ``index`` of the ``dtype`` buffer, viewed as ``shape``."""

    dtype: torch.dtype
    index: int
    shape: tuple[int, ...]


class PackedBatch:
    """A batch whose tensors live in one contiguous buffer per dtype.

    ``pin_memory()`` (what DataLoader's pinning thread calls) pins the buffers; ``unpack()``
    rebuilds the original structure with views into them.
    """

    def __init__(self, batch: Any) -> None:
        pieces: dict[torch.dtype, list[torch.Tensor]] = {}
        self.skeleton = _strip_tensors(batch, pieces)
        self.sizes = {dtype: [t.numel() for t in tensors] for dtype, tensors in pieces.items()}
        self.buffers = {
            dtype: torch.cat([t.reshape(-1) for t in tensors]) for dtype, tensors in pieces.items()
        }

    def pin_memory(self, device: Any = None) -> PackedBatch:
        self.buffers = {dtype: buffer.pin_memory() for dtype, buffer in self.buffers.items()}
        return self

    def unpack(self) -> Any:
        views = {
            dtype: torch.split(self.buffers[dtype], sizes) for dtype, sizes in self.sizes.items()
        }
        return _fill_tensors(self.skeleton, views)


def pack_in_worker(batch: Any) -> Any:
    """DataLoader ``collate_fn``: pack when running in a worker process, where the batch is
    about to be sent to the main process; in the main process there is nothing to save."""
    if torch.utils.data.get_worker_info() is None:
        return batch
    return PackedBatch(batch)


def unpack(batch: Any) -> Any:
    return batch.unpack() if isinstance(batch, PackedBatch) else batch


def _strip_tensors(node: Any, pieces: dict[torch.dtype, list[torch.Tensor]]) -> Any:
    if isinstance(node, torch.Tensor):
        same_dtype = pieces.setdefault(node.dtype, [])
        same_dtype.append(node)
        return _Slot(node.dtype, len(same_dtype) - 1, tuple(node.shape))
    if isinstance(node, dict):
        return {key: _strip_tensors(value, pieces) for key, value in node.items()}
    if isinstance(node, list | tuple):
        return type(node)(_strip_tensors(value, pieces) for value in node)
    return node


def _fill_tensors(node: Any, views: dict[torch.dtype, tuple[torch.Tensor, ...]]) -> Any:
    if isinstance(node, _Slot):
        return views[node.dtype][node.index].view(node.shape)
    if isinstance(node, dict):
        return {key: _fill_tensors(value, views) for key, value in node.items()}
    if isinstance(node, list | tuple):
        return type(node)(_fill_tensors(value, views) for value in node)
    return node
