"""torchvision Mask R-CNN R50-FPN (v1 or v2) with heads sized from the shards' classes."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import (
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops.misc import FrozenBatchNorm2d

from .errors import TrainError

_BUILDERS = {
    "v1": (maskrcnn_resnet50_fpn, MaskRCNN_ResNet50_FPN_Weights.COCO_V1),
    "v2": (maskrcnn_resnet50_fpn_v2, MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1),
}
# torchvision's default for fine-tuning pretrained weights.
PRETRAINED_TRAINABLE_LAYERS = 3
_BACKBONE_STAGES = ["layer4", "layer3", "layer2", "layer1", "conv1"]


@dataclass(frozen=True)
class Layout:
    """What decides a model's parameters and buffers: saved with checkpoints so a checkpoint
    can be rebuilt exactly (a COCO-initialised model has frozen BatchNorm and frozen stages)."""

    variant: str  # v1 | v2
    pretrained: bool  # frozen BatchNorm in the ResNet, as torchvision builds pretrained models
    trainable_backbone_layers: int  # 0-5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Layout:
        return cls(
            variant=str(value["variant"]),
            pretrained=bool(value["pretrained"]),
            trainable_backbone_layers=int(value["trainable_backbone_layers"]),
        )


def layout_for(variant: str, weights: str, trainable_backbone_layers: int | None) -> Layout:
    """The layout ``--model``/``--weights coco|none`` produce (torchvision's rules)."""
    if variant not in _BUILDERS:
        raise TrainError(f"unknown model {variant!r}: choose v1 or v2")
    if weights == "coco":
        layers = (
            PRETRAINED_TRAINABLE_LAYERS
            if trainable_backbone_layers is None
            else trainable_backbone_layers
        )
        if not 0 <= layers <= 5:
            raise TrainError("--trainable-backbone-layers must be between 0 and 5")
        return Layout(variant, pretrained=True, trainable_backbone_layers=layers)
    # Untrained backbones train every stage (torchvision ignores a smaller value, with a warning).
    return Layout(variant, pretrained=False, trainable_backbone_layers=5)


def build_model(
    layout: Layout,
    num_classes: int,
    *,
    coco_weights: bool = False,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    **detector_options: Any,
) -> MaskRCNN:
    """Mask R-CNN with box and mask predictors for ``num_classes`` + 1 (background) classes.

    ``coco_weights``: load torchvision's COCO weights (downloaded once into the torch hub cache;
    offline without a cached copy this is one ``TrainError`` line) and replace both predictors.
    Otherwise the weights are random and only the layout is built (for training from scratch,
    or for loading a checkpoint). ``detector_options`` go to torchvision's ``MaskRCNN``.
    Several ``min_size`` values: torchvision's transform resizes each training image to one
    drawn at random and evaluates at the last.
    """
    builder, coco = _BUILDERS[layout.variant]
    options = dict(min_size=min_size, max_size=max_size, **detector_options)
    if coco_weights:
        if not layout.pretrained:
            raise ValueError("COCO weights come with the pretrained layout")
        try:
            # torch.hub announces the download on stderr before failing offline: keep the
            # failure to our one line.
            with contextlib.redirect_stderr(io.StringIO()):
                model = builder(
                    weights=coco,
                    progress=False,
                    trainable_backbone_layers=layout.trainable_backbone_layers,
                    **options,
                )
        except (OSError, RuntimeError, ValueError) as error:
            # URLError is an OSError; a truncated download surfaces as RuntimeError.
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise TrainError(f"cannot download COCO weights (offline?): {reason}") from None
        _replace_predictors(model, num_classes + 1)
        return model
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes + 1, **options)
    if layout.pretrained:
        _freeze_like_pretrained(model, layout)
    return model


def _replace_predictors(model: MaskRCNN, classes_with_background: int) -> None:
    box_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(box_features, classes_with_background)
    conv = model.roi_heads.mask_predictor.conv5_mask
    model.roi_heads.mask_predictor = MaskRCNNPredictor(
        conv.in_channels, conv.out_channels, classes_with_background
    )


def _freeze_like_pretrained(model: MaskRCNN, layout: Layout) -> None:
    """Give a randomly initialised model the layout torchvision gives a pretrained one: frozen
    early ResNet stages and, for v1 only, FrozenBatchNorm2d with eps 0 in the ResNet body (v2
    keeps ordinary BatchNorm2d even when pretrained)."""
    body = model.backbone.body
    if layout.variant == "v1":
        for name, module in list(body.named_modules()):
            if isinstance(module, nn.BatchNorm2d):
                parent_name, _, child = name.rpartition(".")
                parent = body.get_submodule(parent_name) if parent_name else body
                setattr(parent, child, FrozenBatchNorm2d(module.num_features, eps=0.0))
    trained = _BACKBONE_STAGES[: layout.trainable_backbone_layers]
    if layout.trainable_backbone_layers == 5:
        trained.append("bn1")
    for name, parameter in body.named_parameters():
        if not any(name.startswith(stage) for stage in trained):
            parameter.requires_grad_(False)


def load_model_state(model: MaskRCNN, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load a state dict, turning an architecture mismatch into one ``TrainError`` line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise TrainError(f"{origin} does not fit this model: {first}") from None
