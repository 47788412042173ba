"""Every backbone builds, trains a step, and comes back from its checkpoint without flags;
pretrained weights load into the right places; offline, a download is one line naming the file.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision
from shardfactory import classes_table, random_samples, write_shards
from torchvision.models import WeightsEnum

from train import checkpoint as ckpt
from train.cli import main as train_main
from train.errors import TrainError
from train.model import (
    BACKBONES,
    Layout,
    build_model,
    layout_for,
    max_trainable_layers,
    model_from_checkpoint,
)
from train.rundir import RunDir

TINY = {
    "min_size": 64,
    "max_size": 64,
    "rpn_batch_size_per_image": 32,
    "box_batch_size_per_image": 8,
    "rpn_post_nms_top_n_test": 50,
    "box_detections_per_img": 10,
}


def tiny_batch() -> tuple[list[torch.Tensor], list[dict]]:
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=generator) for _ in range(2)]
    targets = []
    for i in range(2):
        masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
        masks[0, 10 + i : 40, 12 : 44 - i] = 1
        targets.append(
            {
                "boxes": torch.tensor([[12.0, 10.0 + i, 44.0 - i, 40.0]]),
                "labels": torch.tensor([1 + i]),
                "masks": masks,
            }
        )
    return images, targets


def checkpoint_of(model: torch.nn.Module, layout: Layout, num_classes: int = 2) -> dict:
    """What the trainer saves, as far as rebuilding the model needs."""
    return {
        "model": model.state_dict(),
        "layout": layout.to_dict(),
        "classes": classes_table(num_classes),
        "args": {"min_size": [64], "max_size": 64, "test_proposals": 50},
    }


@pytest.mark.parametrize("backbone", BACKBONES)
def test_each_backbone_trains_a_step_and_rebuilds_from_its_checkpoint(backbone: str) -> None:
    variant = "v2" if backbone == "resnet18" else "v1"  # v2 heads on a non-R50 backbone too
    layout = layout_for(variant, "none", None, backbone)
    torch.manual_seed(0)
    model = build_model(layout, 2, **TINY)
    images, targets = tiny_batch()
    model.train()
    losses = model(images, targets)
    assert {"loss_classifier", "loss_mask", "loss_objectness"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    # Every stage trains from scratch; the gradient reaches the first convolution.
    assert all(p.requires_grad for p in model.backbone.body.parameters())
    first = next(model.backbone.body.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0

    rebuilt, classes, found = model_from_checkpoint(checkpoint_of(model, layout), "ckpt")
    assert found == layout and len(classes) == 3
    theirs = rebuilt.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    assert tuple(rebuilt.transform.min_size) == (64,) and rebuilt.transform.max_size == 64
    assert rebuilt.rpn._post_nms_top_n["testing"] == 50


@pytest.mark.parametrize("backbone", BACKBONES)
def test_imagenet_weights_land_in_the_backbone_and_stages_freeze(backbone: str) -> None:
    reference = getattr(torchvision.models, backbone)().state_dict()
    layout = layout_for("v1", "imagenet", None, backbone)
    with mock.patch.object(WeightsEnum, "get_state_dict", return_value=reference):
        model = build_model(layout, 2, **TINY)
        loaded = build_model(layout, 2, pretrained_weights=True, **TINY)
    body = loaded.backbone.body.state_dict()
    prefix = "features." if backbone.startswith("mobilenet") else ""
    compared = [k for k in body if not k.endswith("num_batches_tracked")]
    assert compared and all(torch.equal(body[k], reference[prefix + k]) for k in compared)
    # The layout alone (a resumed run, offline) has the same parameters, buffers and frozen set.
    assert model.state_dict().keys() == loaded.state_dict().keys()
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    assert trainable == {n: p.requires_grad for n, p in loaded.named_parameters()}
    frozen = [n for n, p in loaded.backbone.body.named_parameters() if not p.requires_grad]
    assert frozen, "torchvision's default freezes the first stages of a pretrained backbone"
    assert layout.trainable_backbone_layers == 3 < max_trainable_layers(backbone)


def test_offline_weights_fail_with_one_line_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    offline = urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    expected_folder = str(tmp_path / "torch" / "hub" / "checkpoints")
    cases = [
        (layout_for("v1", "imagenet", None, "resnet18"), "resnet18-f37072fd.pth"),
        (layout_for("v2", "coco", None, "resnet50"), "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth"),
    ]
    for layout, filename in cases:
        with (
            mock.patch("torch.hub.download_url_to_file", side_effect=offline) as download,
            pytest.raises(TrainError) as raised,
        ):
            build_model(layout, 2, pretrained_weights=True, **TINY)
        assert download.called  # the cache was empty, so a download was tried
        message = str(raised.value)
        assert "\n" not in message
        assert message.startswith("cannot download ")
        assert f"place {filename} (from https://download.pytorch.org/models/{filename})" in message
        assert message.endswith(f"in {expected_folder}")


def test_coco_weights_exist_for_resnet50_only() -> None:
    with pytest.raises(TrainError, match="COCO Mask R-CNN weights for resnet50"):
        layout_for("v1", "coco", None, "resnet18")
    with pytest.raises(TrainError, match="between 0 and 6"):
        layout_for("v1", "imagenet", 7, "mobilenet_v3_large")


def test_old_checkpoints_without_a_backbone_are_resnet50() -> None:
    old = {"variant": "v1", "pretrained": True, "trainable_backbone_layers": 3}
    layout = Layout.from_dict(old)
    assert (layout.backbone, layout.weights) == ("resnet50", "coco")


def test_anchor_sizes_build_the_anchors_and_travel_with_the_checkpoint() -> None:
    layout = layout_for("v2", "none", None, "resnet18", (8, 16, 32, 64, 128))
    model = build_model(layout, 2, **TINY)
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    rebuilt, _, found = model_from_checkpoint(checkpoint_of(model, layout), "ckpt")
    assert found.anchor_sizes == (8, 16, 32, 64, 128)
    assert rebuilt.rpn.anchor_generator.sizes == model.rpn.anchor_generator.sizes
    # Checkpoints from before the option have torchvision's anchors.
    assert Layout.from_dict({k: v for k, v in layout.to_dict().items() if k != "anchor_sizes"}) == (
        layout_for("v2", "none", None, "resnet18")
    )
    with pytest.raises(TrainError, match="5 increasing sizes"):
        layout_for("v2", "none", None, "resnet18", (16, 8, 32, 64, 128))


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_narrow_channels_build_train_and_travel_with_the_checkpoint(
    variant: str, backbone: str
) -> None:
    layout = layout_for(variant, "none", None, backbone, channels=64)
    torch.manual_seed(0)
    model = build_model(layout, 2, **TINY)
    assert model.backbone.out_channels == 64
    assert model.backbone.fpn.layer_blocks[0][0].out_channels == 64
    mask_convs = [m for m in model.roi_heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {conv.out_channels for conv in mask_convs} == {64}
    assert model.roi_heads.mask_predictor.conv5_mask.in_channels == 64
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    model.train()
    losses = model(*tiny_batch())
    assert all(torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()
    rebuilt, _, found = model_from_checkpoint(checkpoint_of(model, layout), "ckpt")
    assert found.channels == 64 and "64 channels" in found.describe()
    assert rebuilt.backbone.out_channels == 64
    # Checkpoints from before the option have torchvision's 256.
    old = {k: v for k, v in layout.to_dict().items() if k != "channels"}
    assert Layout.from_dict(old).channels == 256


def test_default_channels_build_torchvisions_model_unchanged() -> None:
    """With 256 channels the model is the one torchvision's builder makes: same parameter
    names and shapes (the demo's old checkpoints and COCO weights load as before)."""
    ours = build_model(layout_for("v1", "none", None, "resnet50"), 90, **TINY)
    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, **TINY
    )
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    with pytest.raises(TrainError, match="at least 8"):
        layout_for("v2", "none", None, "resnet18", channels=4)
    with pytest.raises(TrainError, match="COCO weights come with 256"):
        layout_for("v2", "coco", None, "resnet50", channels=128)


def test_weights_path_takes_the_architecture_from_the_checkpoint(tmp_path: Path) -> None:
    """``--weights PATH`` of a MobileNet checkpoint trains a MobileNet though the flags say
    nothing (the default backbone is resnet50)."""
    root = tmp_path / "shards"
    write_shards(root, random_samples(4, seed=1, size=(64, 64), num_classes=2), num_classes=2)
    layout = layout_for("v1", "none", None, "mobilenet_v3_large", channels=64)
    torch.manual_seed(0)
    model = build_model(layout, 2, **TINY)
    start = ckpt.save_checkpoint(checkpoint_of(model, layout), tmp_path / "start.pt")
    out = tmp_path / "run"
    status = train_main(
        [
            "--train",
            str(root),
            "--out",
            str(out),
            "--weights",
            str(start),
            "--min-size",
            "64",
            "--max-size",
            "64",
            "--rpn-samples",
            "32",
            "--roi-samples",
            "8",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "1",
            "--lr",
            "0.001",
            "--no-progress",
            "--amp",
            "off",
        ]
    )
    assert status == 0
    found = RunDir(str(out)).latest_checkpoint()
    assert found is not None
    state = ckpt.load_checkpoint(found[2])
    assert Layout.from_dict(state["layout"]) == layout
    # It started from the checkpoint's weights: one small step moved them only a little.
    before = model.state_dict()["backbone.fpn.layer_blocks.0.0.weight"]
    after = state["model"]["backbone.fpn.layer_blocks.0.0.weight"]
    assert after.shape == before.shape
    assert (after - before).abs().max() < 0.05 * before.abs().max()
