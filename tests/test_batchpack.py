"""Packed batches: what a worker sends comes back with the same structure, shapes and values."""

from __future__ import annotations

import pickle

import torch

from oistream.batchpack import PackedBatch, pack_in_worker, unpack


def _batch() -> tuple[list[torch.Tensor], list[dict]]:
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=generator)]
    images.append(torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8, generator=generator))
    targets = [
        {
            "boxes": torch.rand(2, 4, generator=generator),
            "labels": torch.tensor([1, 3]),
            "masks": torch.randint(0, 2, (2, 5, 7), dtype=torch.uint8, generator=generator),
            "image_id": torch.tensor(7),
            "image_key": "000a1249af2bc5f0",
            "image_size": (5, 7),
            "hflip": True,
        },
        {  # an image without instances: empty tensors must survive too
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 4, 6, dtype=torch.uint8),
            "image_id": torch.tensor(9),
            "image_key": "000a1249af2bc5f1",
            "image_size": (4, 6),
            "hflip": False,
        },
    ]
    return images, targets


def _assert_same(got, expected) -> None:
    assert type(got) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected)
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            _assert_same(got[key], expected[key])
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            _assert_same(a, b)
    else:
        assert got == expected


def test_round_trip_through_pickle_keeps_structure_and_values():
    batch = _batch()
    packed = pickle.loads(pickle.dumps(PackedBatch(batch)))
    _assert_same(packed.unpack(), batch)


def test_one_buffer_per_dtype():
    packed = PackedBatch(_batch())
    assert set(packed.buffers) == {torch.uint8, torch.float32, torch.int64}
    uint8_elements = sum(t.numel() for t in _batch()[0]) + 2 * 5 * 7
    assert packed.buffers[torch.uint8].numel() == uint8_elements


def test_unpacked_tensors_are_views_of_the_buffers():
    packed = PackedBatch(_batch())
    images, targets = packed.unpack()
    buffer = packed.buffers[torch.uint8]
    start = buffer.untyped_storage().data_ptr()
    end = start + buffer.numel()
    for tensor in (*images, targets[0]["masks"]):
        assert start <= tensor.untyped_storage().data_ptr() < end


def test_main_process_batches_are_not_packed():
    batch = _batch()
    assert pack_in_worker(batch) is batch  # no worker here: nothing crosses a process
    assert unpack(batch) is batch
