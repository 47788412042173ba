"""Pictures of the model's predictions on a few validation images, drawn by oistream's renderer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .evaluate import MASK_THRESHOLD

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


class PredictionPictures:
    """Collects the first ``limit`` images it is shown and writes OUT/predictions/KEY.png.

    Used as ``evaluate``'s ``on_prediction`` callback on rank 0, so pictures cost no extra pass.
    """

    def __init__(
        self,
        folder: str | Path,
        class_names: list[str],
        limit: int = 4,
        score_threshold: float = 0.5,
    ) -> None:
        self.folder = Path(folder)
        self.class_names = class_names
        self.limit = limit
        self.score_threshold = score_threshold
        self.written: list[Path] = []

    def __call__(self, image: torch.Tensor, target: dict[str, Any], prediction: dict) -> None:
        if len(self.written) >= self.limit:
            return
        from oistream import draw_instances  # Pillow drawing, only when drawing

        if image.is_floating_point():  # the model's input: float [0, 1]
            image = (image * 255).round().clamp_(0, 255).to(torch.uint8)
        masks = prediction["masks"]
        if masks.ndim == 4:
            masks = masks[:, 0]
        picture = draw_instances(
            image.cpu(),
            (masks >= MASK_THRESHOLD).to(torch.uint8).cpu(),
            prediction["boxes"].cpu(),
            prediction["labels"].cpu(),
            self.class_names,
            scores=prediction["scores"].cpu(),
            score_threshold=self.score_threshold,
        )
        key = _SAFE_NAME.sub("_", str(target.get("image_key", len(self.written))))
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{key}.png"
        picture.save(path)
        self.written.append(path)
