"""Mask R-CNN trainer for oistream shards: ``python -m train --train SRC --val SRC --out DIR``.

Modules, one job each: ``config`` (command line), ``model`` (torchvision Mask R-CNN sized from the
manifest), ``data`` (oistream loaders -> device batches), ``distributed`` (torchrun / DDP set-up),
``schedule`` (warm-up + step or cosine), ``precision`` (AMP choice), ``checkpoint`` (save,
resume, RNG state), ``metrics`` (JSON lines), ``engine`` (the training loop), ``evaluate`` (COCO
AP and Open Images mAP@0.5), ``predictions`` (overlay pictures), ``cli`` (entry point).
"""
