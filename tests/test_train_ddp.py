"""Two CPU processes under torchrun (gloo) on uneven shards finish their steps and their
evaluation without hanging, and rank 0 scores every validation image of both ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from shardfactory import random_samples, write_shards

ROOT = Path(__file__).resolve().parents[1]


def test_two_gloo_ranks_on_uneven_shards_finish(tmp_path: Path) -> None:
    train = random_samples(7, seed=5, size=(64, 80), max_instances=2, num_classes=2)
    val = random_samples(5, seed=6, size=(64, 80), max_instances=2, num_classes=2)
    # Shards of 4, 2 and 1 samples; the validation shards (2, 2, 1) split 3 / 2 over the ranks.
    write_shards(tmp_path / "train", train[:4], samples_per_shard=4, num_classes=2)
    write_shards(tmp_path / "train_rest", train[4:], samples_per_shard=2, num_classes=2)
    for tar in (tmp_path / "train_rest").glob("*.tar"):
        tar.rename(tmp_path / "train" / f"extra-{tar.name}")
    write_shards(tmp_path / "val", val, samples_per_shard=2, split="validation", num_classes=2)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "train",
        "--train", str(tmp_path / "train" / "{train-000000,extra-train-00000{0,1}}.tar"),
        "--val", str(tmp_path / "val"), "--out", str(out),
        "--model", "v1", "--weights", "none", "--min-size", "64", "--max-size", "96",
        "--rpn-samples", "32", "--roi-samples", "8", "--detections-per-image", "10",
        "--batch-size", "1", "--workers", "1", "--epochs", "1", "--steps-per-epoch", "3",
        "--lr", "0.005", "--warmup-steps", "2", "--clip-grad", "10", "--log-every", "1",
        "--device", "cpu", "--no-progress", "--num-predictions", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == [1, 2, 3]  # rank 0 alone writes; averages over both ranks
    result = json.loads((out / "eval.json").read_text())
    assert result["images"] == 5  # 3 from rank 0 + 2 gathered from rank 1
    assert len(list((out / "predictions").glob("*.png"))) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-0000003.pt",
        "step-0000003.pt.json",
    ]
