"""The trainer's parts on in-memory batches: model layout, schedule, steps, overfitting,
checkpoints. CPU only, tiny images, few proposals per image to keep the heads cheap."""

from __future__ import annotations

import itertools
import math
import random
import urllib.error
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torchvision.models._api import WeightsEnum

from train import checkpoint as ckpt
from train.config import parse_args
from train.distributed import Ranks
from train.engine import Trainer, seed_everything
from train.errors import TrainError
from train.model import Layout, build_model, layout_for
from train.precision import choose_precision
from train.schedule import Schedule, build_scheduler

CPU = Ranks(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SMALL = {"min_size": 64, "max_size": 96, "rpn_batch_size_per_image": 64}


def tiny_model(variant: str = "v2", roi: int = 8, frozen_backbone: bool = False) -> torch.nn.Module:
    """Random weights; ``frozen_backbone`` freezes the ResNet (as a pretrained layout does) so
    the backward pass stays in FPN and heads, which is what makes CPU overfitting quick."""
    layout = Layout(variant, pretrained=True, trainable_backbone_layers=0)
    if not frozen_backbone:
        layout = layout_for(variant, "none", None)
    return build_model(layout, 2, box_batch_size_per_image=roi, **SMALL)


def squares(count: int, seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """Images with two bright rectangles each (classes 1 and 2) on a dark noisy background."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(count):
        image = torch.rand(3, 64, 80, generator=g) * 0.2
        masks = torch.zeros(2, 64, 80, dtype=torch.uint8)
        boxes = []
        for i in range(2):
            y, x = (int(v) for v in torch.randint(0, 32, (2,), generator=g))
            masks[i, y : y + 30, x : x + 40] = 1
            image[i, y : y + 30, x : x + 40] += 0.7
            boxes.append([x, y, x + 40, y + 30])
        images.append(image.clamp(0, 1))
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.tensor([1, 2]),
                "masks": masks,
            }
        )
    return images, targets


def trainer_for(
    model: torch.nn.Module, steps: int, lr: float = 0.02, epochs: int = 1, **kw
) -> Trainer:
    schedule = Schedule(epochs=epochs, steps_per_epoch=steps, lr=lr, **kw)
    return Trainer(model, schedule, choose_precision("auto", CPU.device), CPU)


def test_pretrained_layout_is_torchvisions_without_downloading() -> None:
    """Resuming a COCO-initialised run rebuilds its exact layout offline: same parameters,
    buffers, module types and frozen stages as torchvision's own pretrained builder."""
    for variant in ("v1", "v2"):
        layout = layout_for(variant, "coco", None)
        ours = build_model(layout, 3)
        coco_shaped = build_model(layout, 90).state_dict()
        with mock.patch.object(WeightsEnum, "get_state_dict", return_value=coco_shaped):
            theirs = build_model(layout, 3, coco_weights=True)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert [type(m) for m in ours.modules()] == [type(m) for m in theirs.modules()]
        trainable = {n: p.requires_grad for n, p in ours.named_parameters()}
        assert trainable == {n: p.requires_grad for n, p in theirs.named_parameters()}
        # Heads sized from the manifest: K + 1 outputs.
        assert theirs.roi_heads.box_predictor.cls_score.out_features == 4
        assert theirs.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4


def test_offline_coco_weights_fail_with_one_clear_line() -> None:
    offline = urllib.error.URLError("[Errno -2] Name or service not known")
    with (
        mock.patch("torch.hub.load_state_dict_from_url", side_effect=offline),
        pytest.raises(TrainError) as raised,
    ):
        build_model(layout_for("v1", "coco", None), 2, coco_weights=True)
    message = str(raised.value)
    assert message.startswith("cannot download COCO weights (offline?): ")
    assert "\n" not in message


def test_several_min_sizes_train_at_random_scales_and_evaluate_at_the_last() -> None:
    args = parse_args(["--train", "t", "--val", "v", "--out", "o", "--min-size", "64", "80", "96"])
    model = build_model(layout_for("v2", "none", None), 2, min_size=args.min_size, max_size=400)
    image = torch.rand(3, 40, 50)
    model.train()
    torch.manual_seed(0)
    trained_at = {model.transform([image])[0].image_sizes[0][0] for _ in range(30)}
    assert trained_at == {64, 80, 96}
    model.eval()
    assert model.transform([image])[0].image_sizes[0][0] == 96


def test_schedule_warms_up_linearly_then_steps_or_decays() -> None:
    param = torch.nn.Parameter(torch.zeros(1))

    def lrs(**kw) -> list[float]:
        optimizer = torch.optim.SGD([param], lr=1.0)
        scheduler = build_scheduler(optimizer, **kw)
        out = []
        for _ in range(kw["total_steps"]):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    step = lrs(total_steps=10, warmup_steps=4, warmup_factor=0.2, milestone_steps=[6, 8])
    assert step == pytest.approx([0.2, 0.4, 0.6, 0.8, 1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = lrs(total_steps=10, warmup_steps=2, warmup_factor=0.5, schedule="cosine")
    assert cosine[:3] == pytest.approx([0.5, 0.75, 1.0])
    assert cosine[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in itertools.pairwise(cosine[2:]))


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_a_few_steps_give_finite_losses(variant: str) -> None:
    seed_everything(0)
    images, targets = squares(2)
    targets[1] = {  # an image without objects is a valid sample
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 64, 80, dtype=torch.uint8),
    }
    trainer = trainer_for(tiny_model(variant), steps=2, warmup_steps=2, clip_grad=10.0)
    for _ in range(2):
        losses = trainer.train_step(images, targets)
        expected = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"}
        assert expected <= set(losses)
        assert all(torch.isfinite(v) for v in losses.values())
    assert trainer.step == 2


def test_overfitting_four_images_halves_the_loss() -> None:
    seed_everything(0)
    images, targets = squares(4, seed=1)
    trainer = trainer_for(
        tiny_model("v2", frozen_backbone=True), steps=16, warmup_steps=3, clip_grad=10.0
    )
    totals = [float(sum(trainer.train_step(images, targets).values())) for _ in range(16)]
    first, last = sum(totals[:2]) / 2, sum(totals[-2:]) / 2
    assert last <= 0.5 * first, totals


def test_checkpoint_rng_state_round_trips(tmp_path: Path) -> None:
    seed_everything(5)
    state = ckpt.rng_state()
    expected = (torch.rand(3), np.random.rand(), random.random())
    path = ckpt.save_checkpoint({"rng": state}, tmp_path / "c.pt")
    seed_everything(6)
    ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"])
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_bad_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="checkpoint not found"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="cannot read checkpoint") as raised:
        ckpt.load_checkpoint(tmp_path / "junk.pt")
    assert "\n" not in str(raised.value)
    theirs = [{"index": 0, "name": "background"}, {"index": 1, "mid": "/m/x", "name": "Cat"}]
    ours = [{"index": 0, "name": "background"}, {"index": 1, "mid": "/m/y", "name": "Dog"}]
    with pytest.raises(TrainError, match=r"trained on classes \[Cat\].*has \[Dog\]"):
        ckpt.check_classes({"classes": theirs}, ours, "c.pt")
    ckpt.check_classes({"classes": ours}, ours, "c.pt")  # the same classes pass
