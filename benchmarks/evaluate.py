"""Seconds for the Open Images challenge mask mAP against COCO mask AP on the same predictions.

A validation-sized set (issue 13): 13,524 images of 1024x768, 24,730 ground-truth masks, 100
predicted masks per image (1,352,400), all RLEs made from polygons (ellipses of 24 vertices) by
the RLE library. Ground truth: 1-3 masks per image of 300 classes (one in 20 group-of, one in
10 with a box-only object beside it), the image's classes verified positive and 3 other classes
verified negative. Predictions: per ground-truth mask a few jittered copies, the rest spread over
verified classes and over 60 random classes (a model's long tail, which the challenge ignores
where unverified and COCO scores), 3% empty masks; scores uniform in [0, 1).

Timed, each once per round, alternating which goes first: (a) ``open_images_metric`` (the whole
challenge metric from in-memory predictions), (c) COCO mask AP, as ``oistream evaluate`` runs it
(faster-coco-eval: dataset, loadRes, evaluate, accumulate, summarize). Printed: each median, the
ratio a/c and the load average; mark (issue 13): a/c <= 1. ``--scale`` scales the image count
(default 0.1: a few minutes on a shared 2-core machine; 1.0 is the full validation size,
10.6 GB peak RSS).

Run: ``.venv/bin/python benchmarks/evaluate.py [--scale 1.0] [--rounds N] [--seed S]``
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import numpy as np

from oistream import evaluation as ev

FULL_IMAGES = 13_524
FULL_MASKS = 24_730
PREDICTIONS_PER_IMAGE = 100
HEIGHT, WIDTH = 768, 1024
NUM_CLASSES = 300


def _polygon(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float) -> list:
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False) + rng.uniform(0, 0.3)
    x = np.clip(cx + rx * np.cos(t), 0, WIDTH - 1)
    y = np.clip(cy + ry * np.sin(t), 0, HEIGHT - 1)
    return [np.stack([x, y], 1).ravel().tolist()]


def _ellipse(rng: np.random.Generator) -> tuple[float, float, float, float]:
    rx, ry = rng.uniform(20, 300), rng.uniform(20, 250)
    return rng.uniform(rx, WIDTH - rx), rng.uniform(ry, HEIGHT - ry), rx, ry


def make_set(
    images: int, seed: int
) -> tuple[list[ev.GroundTruthImage], list[ev.Prediction], list[tuple[str, str]]]:
    mask_api = ev._mask_api()
    rng = np.random.default_rng(seed)
    classes = [(f"/m/c{i:03d}", f"class {i}") for i in range(NUM_CLASSES)]
    mids = [mid for mid, _ in classes]
    total = round(FULL_MASKS * images / FULL_IMAGES)
    counts = np.ones(images, dtype=int)  # every image has a mask; the rest land at random
    np.add.at(counts, rng.integers(0, images, max(total - images, 0)), 1)
    truth, preds = [], []
    for i in range(images):
        image_id = f"{i:016x}"
        count = int(counts[i])
        objects, shapes = [], []
        for _ in range(count):
            label = mids[int(rng.integers(NUM_CLASSES))]
            shape = _ellipse(rng)
            rle = mask_api.frPyObjects(_polygon(rng, *shape), HEIGHT, WIDTH)[0]
            x, y, w, h = mask_api.toBbox([rle])[0]
            box = (x / WIDTH, y / HEIGHT, (x + w) / WIDTH, (y + h) / HEIGHT)
            objects.append(ev.GroundTruthObject(label, box, bool(rng.random() < 0.05), rle))
            shapes.append((label, shape))
            if rng.random() < 0.1:  # an object annotated with a box only, beside it
                objects.append(ev.GroundTruthObject(label, box, False, None))
        present = sorted({o.label for o in objects})
        negative = [m for m in rng.choice(mids, 3, replace=False) if m not in present]
        truth.append(ev.GroundTruthImage(image_id, WIDTH, HEIGHT, objects, present, negative))
        verified = present + negative
        for k in range(PREDICTIONS_PER_IMAGE):
            if k < 3 * len(shapes):
                label, (cx, cy, rx, ry) = shapes[k % len(shapes)]
                shape = (
                    cx + rng.normal(0, 10),
                    cy + rng.normal(0, 10),
                    rx * rng.uniform(0.8, 1.2),
                    ry * rng.uniform(0.8, 1.2),
                )
            else:
                pool = verified if rng.random() < 0.3 else mids[:60]
                label = pool[int(rng.integers(len(pool)))]
                shape = _ellipse(rng)
            rle = None
            if rng.random() >= 0.03:
                rle = mask_api.frPyObjects(_polygon(rng, *shape), HEIGHT, WIDTH)[0]
            preds.append(ev.Prediction(image_id, label, float(rng.random()), rle, HEIGHT, WIDTH))
    return truth, preds, classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.1, help="share of the validation size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images = max(1, round(FULL_IMAGES * args.scale))
    started = time.perf_counter()
    truth, preds, classes = make_set(images, args.seed)
    masks = sum(o.rle is not None for t in truth for o in t.objects)
    print(
        f"{images} images, {masks} ground-truth masks, {len(preds)} predictions "
        f"(made in {time.perf_counter() - started:.1f} s); load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    oi_times, coco_times = [], []
    for r in range(args.rounds):
        order = ("oi", "coco") if r % 2 == 0 else ("coco", "oi")
        for which in order:
            gc.collect()
            t = time.perf_counter()
            if which == "oi":
                result = ev.open_images_metric(truth, preds, classes)
                oi_times.append(time.perf_counter() - t)
            else:
                coco = ev.coco_metrics(truth, preds, classes, kinds=("mask",))
                coco_times.append(time.perf_counter() - t)
        print(
            f"round {r + 1}: Open Images mAP {result['map']:.4f} in {oi_times[-1]:.1f} s, "
            f"COCO mask AP {coco['mask']['AP']:.4f} in {coco_times[-1]:.1f} s; "
            f"load average {os.getloadavg()[0]:.2f}"
        )
    a, c = statistics.median(oi_times), statistics.median(coco_times)
    mark = "met" if a <= c else "NOT met"
    print(
        f"median: Open Images mAP {a:.1f} s, COCO mask AP {c:.1f} s, ratio a/c {a / c:.2f} "
        f"(mark a/c <= 1: {mark}); load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
