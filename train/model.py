"""torchvision Mask R-CNN with FPN on a ResNet-50/101/18 or MobileNetV3-Large backbone, v1 or v2
heads, heads sized from the shards' classes.

Every model is assembled from torchvision's own parts the way its builders assemble them
(``maskrcnn_resnet50_fpn(_v2)``, ``_resnet_fpn_extractor``, ``_mobilenet_extractor`` as in
``fasterrcnn_mobilenet_v3_large_fpn``), always with random weights first; pretrained weights
are then loaded from torch's hub cache. So a checkpoint's ``Layout`` rebuilds its model exactly,
offline, and every download goes through one place that turns a failure into one line naming
the file to put in the cache.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import (
    MobileNet_V3_Large_Weights,
    ResNet18_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    WeightsEnum,
)
from torchvision.models.detection import (
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (
    _mobilenet_extractor,
    _resnet_fpn_extractor,
)
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import (
    BACKBONES,
    DEFAULT_ANCHOR_SIZES,
    DEFAULT_BACKBONE,
    DEFAULT_CHANNELS,
    VARIANTS,
)
from .errors import TrainError

WEIGHTS = ("coco", "imagenet", "none")  # or a checkpoint path

# torchvision publishes COCO Mask R-CNN weights for R50-FPN only (v1 and v2).
_COCO: dict[tuple[str, str], WeightsEnum] = {
    ("resnet50", "v1"): MaskRCNN_ResNet50_FPN_Weights.COCO_V1,
    ("resnet50", "v2"): MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
}
# ImageNet classification weights of each trunk (what torchvision's detection builders use).
_IMAGENET: dict[str, WeightsEnum] = {
    "resnet50": ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": ResNet101_Weights.IMAGENET1K_V1,
    "resnet18": ResNet18_Weights.IMAGENET1K_V1,
    "mobilenet_v3_large": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
}
# torchvision's default for fine-tuning pretrained weights.
PRETRAINED_TRAINABLE_LAYERS = 3
# Stages a backbone has (all trainable from scratch): ResNet conv1 + 4 layers; MobileNetV3-Large
# the 6 stages _mobilenet_extractor finds.
_MAX_TRAINABLE = {"mobilenet_v3_large": 6}
_RESNET_MAX_TRAINABLE = 5
# The box head's last fully connected width in both of torchvision's variants.
_BOX_REPRESENTATION = 1024


def max_trainable_layers(backbone: str) -> int:
    return _MAX_TRAINABLE.get(backbone, _RESNET_MAX_TRAINABLE)


@dataclass(frozen=True)
class Layout:
    """What decides a model's parameters and buffers: saved with checkpoints so a checkpoint
    can be rebuilt exactly without flags (a pretrained model has frozen BatchNorm and frozen
    stages, and the BatchNorm eps depends on where the weights came from)."""

    variant: str  # v1 | v2 heads (v2: torchvision's v2 recipe, BatchNorm in FPN and heads)
    pretrained: bool  # frozen BatchNorm (v1) and frozen stages, as torchvision builds them
    trainable_backbone_layers: int
    backbone: str = DEFAULT_BACKBONE
    weights: str = "none"  # where the initial weights came from: coco | imagenet | none
    # Anchor side lengths in pixels, one per FPN level: no parameters, but predictions depend
    # on them, so a checkpoint rebuilds with its own.
    anchor_sizes: tuple[int, ...] = DEFAULT_ANCHOR_SIZES
    # Width of the FPN's outputs and of the heads' convolutions (torchvision: 256).
    channels: int = DEFAULT_CHANNELS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Layout:
        """Also reads checkpoints written before backbones were selectable (R50, COCO or none)."""
        pretrained = bool(value["pretrained"])
        layout = cls(
            variant=str(value["variant"]),
            pretrained=pretrained,
            trainable_backbone_layers=int(value["trainable_backbone_layers"]),
            backbone=str(value.get("backbone", DEFAULT_BACKBONE)),
            weights=str(value.get("weights", "coco" if pretrained else "none")),
            anchor_sizes=tuple(int(v) for v in value.get("anchor_sizes", DEFAULT_ANCHOR_SIZES)),
            channels=int(value.get("channels", DEFAULT_CHANNELS)),
        )
        _check(layout)
        return layout

    def describe(self) -> str:
        """``Mask R-CNN resnet18-FPN v2`` as the trainer and predict announce it."""
        width = "" if self.channels == DEFAULT_CHANNELS else f", {self.channels} channels"
        return f"Mask R-CNN {self.backbone}-FPN {self.variant}{width}"


def _check(layout: Layout) -> None:
    if layout.backbone not in BACKBONES:
        raise TrainError(f"unknown backbone {layout.backbone!r}: choose {', '.join(BACKBONES)}")
    if layout.variant not in VARIANTS:
        raise TrainError(f"unknown model {layout.variant!r}: choose v1 or v2")
    if layout.weights not in WEIGHTS:
        raise TrainError(f"unknown weights {layout.weights!r}: choose coco, imagenet or none")
    highest = max_trainable_layers(layout.backbone)
    if not 0 <= layout.trainable_backbone_layers <= highest:
        raise TrainError(f"--trainable-backbone-layers must be between 0 and {highest}")
    sizes = layout.anchor_sizes
    if len(sizes) != len(DEFAULT_ANCHOR_SIZES) or min(sizes) < 1 or list(sizes) != sorted(sizes):
        raise TrainError(
            f"--anchor-sizes takes {len(DEFAULT_ANCHOR_SIZES)} increasing sizes in pixels, one "
            f"per FPN level (torchvision's: {' '.join(map(str, DEFAULT_ANCHOR_SIZES))})"
        )
    if layout.channels < 8:
        raise TrainError(f"--channels must be at least 8, not {layout.channels}")
    if layout.pretrained and layout.weights == "coco" and layout.channels != DEFAULT_CHANNELS:
        raise TrainError(f"COCO weights come with {DEFAULT_CHANNELS} FPN channels: drop --channels")


def layout_for(
    variant: str,
    weights: str,
    trainable_backbone_layers: int | None,
    backbone: str = DEFAULT_BACKBONE,
    anchor_sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES,
    channels: int = DEFAULT_CHANNELS,
) -> Layout:
    """The layout ``--backbone``/``--model``/``--weights coco|imagenet|none`` produce
    (torchvision's rules: pretrained weights train the top 3 stages by default)."""
    if backbone not in BACKBONES:
        raise TrainError(f"unknown backbone {backbone!r}: choose {', '.join(BACKBONES)}")
    if variant not in VARIANTS:
        raise TrainError(f"unknown model {variant!r}: choose v1 or v2")
    if weights == "coco" and (backbone, variant) not in _COCO:
        raise TrainError(
            f"torchvision publishes COCO Mask R-CNN weights for resnet50 (v1, v2) only, not "
            f"{backbone} {variant}: use --weights imagenet or none"
        )
    if weights in ("coco", "imagenet"):
        layers = (
            PRETRAINED_TRAINABLE_LAYERS
            if trainable_backbone_layers is None
            else trainable_backbone_layers
        )
        layout = Layout(variant, True, layers, backbone, weights, tuple(anchor_sizes), channels)
    elif weights == "none":
        # Untrained backbones train every stage (torchvision ignores a smaller value, with a
        # warning).
        layers = max_trainable_layers(backbone)
        layout = Layout(variant, False, layers, backbone, "none", tuple(anchor_sizes), channels)
    else:
        raise TrainError(f"unknown weights {weights!r}: choose coco, imagenet, none or a path")
    _check(layout)
    return layout


def build_model(
    layout: Layout,
    num_classes: int,
    *,
    coco_weights: bool = False,
    pretrained_weights: bool | None = None,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    **detector_options: Any,
) -> MaskRCNN:
    """Mask R-CNN with box and mask predictors for ``num_classes`` + 1 (background) classes.

    ``pretrained_weights`` (``coco_weights`` is its older name): load the layout's COCO or
    ImageNet weights (from the torch hub cache, downloaded once; offline without a cached copy
    this is one ``TrainError`` line naming the file to place there). Otherwise the weights are
    random and only the layout is built (for training from scratch or loading a checkpoint).
    ``detector_options`` go to torchvision's ``MaskRCNN``. Several ``min_size`` values:
    torchvision's transform resizes each training image to one drawn at random and evaluates
    at the last.
    """
    _check(layout)
    load = coco_weights if pretrained_weights is None else pretrained_weights
    if load and not layout.pretrained:
        raise ValueError("pretrained weights come with a pretrained layout")
    options = dict(min_size=min_size, max_size=max_size, **detector_options)
    coco = layout.weights == "coco"
    if coco and load:
        # COCO's 91-class heads first, so the published state dict loads as is.
        model = _assemble(layout, 91, options)
        _load(model, _COCO[(layout.backbone, layout.variant)], "COCO")
        _replace_predictors(model, num_classes + 1)
        return model
    model = _assemble(layout, num_classes + 1, options)
    if load:
        # The extractor froze stages already; loading weights keeps requires_grad as it is.
        _load(model.backbone.body, _IMAGENET[layout.backbone], "ImageNet")
    return model


def _norm_layer(layout: Layout) -> Callable[..., nn.Module]:
    """The trunk's normalisation as torchvision's builders choose it: frozen BatchNorm for
    pretrained v1 models (eps 0 for the R50 COCO v1 weights, which torchvision overwrites),
    trainable BatchNorm otherwise (v2 keeps it even when pretrained)."""
    if layout.pretrained and layout.variant == "v1":
        eps = 0.0 if layout.weights == "coco" else 1e-5
        return functools.partial(FrozenBatchNorm2d, eps=eps)
    return nn.BatchNorm2d


def _assemble(layout: Layout, classes_with_background: int, options: dict) -> MaskRCNN:
    norm = _norm_layer(layout)
    fpn_norm = nn.BatchNorm2d if layout.variant == "v2" else None
    layers = layout.trainable_backbone_layers
    if layout.backbone == "mobilenet_v3_large":
        trunk = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm)
        backbone = _mobilenet_extractor(trunk, True, layers, norm_layer=fpn_norm)
        # Three feature maps (C4, C5, pool), each with every anchor size, as torchvision's
        # fasterrcnn_mobilenet_v3_large_fpn has them.
        sizes = (layout.anchor_sizes,) * 3
    else:
        trunk = getattr(torchvision.models, layout.backbone)(weights=None, norm_layer=norm)
        backbone = _resnet_fpn_extractor(trunk, layers, norm_layer=fpn_norm)
        sizes = tuple((size,) for size in layout.anchor_sizes)
    narrow = layout.channels != DEFAULT_CHANNELS
    if narrow:
        _set_fpn_width(backbone, layout.channels, fpn_norm)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    heads: dict[str, nn.Module] = {}
    if layout.variant == "v2":
        channels = backbone.out_channels
        convs = [channels] * 4
        heads = {
            "rpn_head": RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2),
            "box_head": FastRCNNConvFCHead(
                (channels, 7, 7), convs, [_BOX_REPRESENTATION], norm_layer=nn.BatchNorm2d
            ),
            "mask_head": MaskRCNNHeads(channels, convs, 1, norm_layer=nn.BatchNorm2d),
        }
    predictors: dict[str, object] = {"num_classes": classes_with_background}
    if narrow:
        # torchvision sizes v1's mask head and both variants' mask predictor for 256 channels
        # unless given them; the box predictor has to come along (MaskRCNN takes either
        # num_classes or the predictors).
        width = layout.channels
        if layout.variant == "v1":
            heads["mask_head"] = MaskRCNNHeads(width, [width] * 4, 1)
        predictors = {
            "num_classes": None,
            "box_predictor": FastRCNNPredictor(_BOX_REPRESENTATION, classes_with_background),
            "mask_predictor": MaskRCNNPredictor(width, width, classes_with_background),
        }
    return MaskRCNN(backbone, rpn_anchor_generator=anchors, **heads, **predictors, **options)


def _set_fpn_width(backbone: nn.Module, channels: int, norm: Callable | None) -> None:
    """Give torchvision's extractor a ``channels``-wide FPN (its builders fix 256): the trunk,
    its frozen stages and the returned layers stay as the extractor made them."""
    in_channels = [block[0].in_channels for block in backbone.fpn.inner_blocks]
    backbone.fpn = FeaturePyramidNetwork(
        in_channels, channels, extra_blocks=backbone.fpn.extra_blocks, norm_layer=norm
    )
    backbone.out_channels = channels


def _load(module: nn.Module, weights: WeightsEnum, what: str) -> None:
    """Load ``weights`` (from the hub cache or downloaded into it) into ``module``."""
    url = weights.url
    filename = os.path.basename(urlparse(url).path)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        # torch.hub announces the download on stderr before failing offline: keep the
        # failure to our one line.
        with contextlib.redirect_stderr(io.StringIO()):
            state = weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as error:
        # URLError is an OSError; a truncated download or a bad hash surfaces as RuntimeError.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TrainError(
            f"cannot download {what} weights (offline?): {reason}; place {filename} (from "
            f"{url}) in {folder}"
        ) from None
    if what == "ImageNet":
        state = _imagenet_state_for(module, state)
    module.load_state_dict(state)


def _imagenet_state_for(body: nn.Module, state: dict[str, torch.Tensor]) -> dict:
    """The ImageNet trunk's weights under the names its copy inside the detector has.

    ResNet bodies keep the trunk's names (``layer1.0.conv1.weight``) minus the classifier;
    MobileNet's body is ``trunk.features`` re-rooted (``features.3.block`` -> ``3.block``).
    """
    wanted = body.state_dict().keys()
    renamed = {}
    for name, value in state.items():
        key = name.removeprefix("features.")
        if key in wanted:
            renamed[key] = value
    missing = [k for k in wanted if k not in renamed and not k.endswith("num_batches_tracked")]
    if missing:
        raise TrainError(f"ImageNet weights do not fit the backbone: {missing[0]} is missing")
    for key in wanted:
        if key.endswith("num_batches_tracked") and key not in renamed:
            renamed[key] = torch.zeros((), dtype=torch.long)
    return renamed


def _replace_predictors(model: MaskRCNN, classes_with_background: int) -> None:
    box_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(box_features, classes_with_background)
    conv = model.roi_heads.mask_predictor.conv5_mask
    model.roi_heads.mask_predictor = MaskRCNNPredictor(
        conv.in_channels, conv.out_channels, classes_with_background
    )


def load_model_state(model: MaskRCNN, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load a state dict, turning an architecture mismatch into one ``TrainError`` line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise TrainError(f"{origin} does not fit this model: {first}") from None


# Inference settings a checkpoint's ``args`` carry, with the trainer's option names.
_INFERENCE_OPTIONS = {
    "test_proposals": "rpn_post_nms_top_n_test",
    "detections_per_image": "box_detections_per_img",
}


def model_from_checkpoint(
    checkpoint: dict[str, Any], origin: str, **overrides: Any
) -> tuple[MaskRCNN, list[dict[str, Any]], Layout]:
    """Rebuild a trained model from one of our checkpoints without being told its architecture.

    Returns the model (weights loaded, on the CPU), the classes it predicts (index 0 is
    background) and its layout. ``overrides`` replace ``MaskRCNN`` options (e.g.
    ``box_score_thresh``).
    """
    classes = checkpoint.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise TrainError(f"{origin} records no classes: is it a checkpoint of `oistream train`?")
    layout_dict = checkpoint.get("layout")
    if not isinstance(layout_dict, dict):
        raise TrainError(f"{origin} records no model layout: is it a checkpoint of this trainer?")
    try:
        layout = Layout.from_dict(layout_dict)
    except (KeyError, TypeError, ValueError) as error:
        raise TrainError(f"{origin} has an unreadable model layout: {error}") from None
    args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    options: dict[str, Any] = {}
    min_size = args.get("min_size", 800)
    options["min_size"] = min_size if isinstance(min_size, int) else list(min_size)
    options["max_size"] = int(args.get("max_size", 1333))
    for ours, theirs in _INFERENCE_OPTIONS.items():
        if ours in args:
            options[theirs] = int(args[ours])
    options.update(overrides)
    model = build_model(layout, len(classes) - 1, **options)
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        raise TrainError(f"{origin} holds no model state dict")
    load_model_state(model, state, origin)
    return model, classes, layout
