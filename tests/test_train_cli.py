"""``python -m train`` on real format-v1 shards: a whole run, stop + resume, bad arguments.

Runs in-process through ``train.cli.main`` (one subprocess checks the real entry point), with
tiny images and few sampled proposals so that each step takes about a second on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shardfactory import classes_table, random_samples, write_shards

from oistream.cli import main as oistream_main
from train import checkpoint as ckpt
from train.cli import main
from train.config import DEMO_DEFAULTS, parse_args
from train.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
CHEAP = [
    "--model", "v2", "--backbone", "mobilenet_v3_large", "--channels", "64", "--weights", "none",
    "--min-size", "64", "--max-size", "96",
    "--rpn-samples", "64", "--roi-samples", "8", "--detections-per-image", "20",
    "--batch-size", "2", "--workers", "1", "--lr", "0.01", "--warmup-steps", "2",
    "--clip-grad", "10", "--no-progress", "--amp", "off",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("restore_determinism")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-shards")
    train = random_samples(10, seed=3, size=(64, 80), max_instances=3, num_classes=2)
    val = random_samples(3, seed=4, size=(64, 80), max_instances=3, num_classes=2)
    write_shards(root / "train", train, samples_per_shard=4, num_classes=2)
    write_shards(root / "val", val, samples_per_shard=2, split="validation", num_classes=2)
    return {"train": root / "train", "val": root / "val"}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("*.pt"))


def latest(out: Path) -> Path:
    found = RunDir(str(out)).latest_checkpoint()
    assert found is not None
    return found[2]


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("python -m train: error: ")
    return lines[0]


def test_a_run_trains_evaluates_draws_and_checkpoints(shards: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--train", str(shards["train"]), "--val", str(shards["val"]), "--out", str(out)]
    code = main([*args, *CHEAP, "--epochs", "2", "--steps-per-epoch", "2", "--log-every", "1"])
    assert code == 0
    steps = [r for r in records(out) if "step" in r and "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert all(r[k] == r[k] and abs(r[k]) < 1e6 for k in r if k.startswith("loss"))
        assert r["images_per_s"] > 0 and 0 <= r["data_wait_fraction"] <= 1 and r["lr"] > 0
    evals = [r["eval"] for r in records(out) if "eval" in r]
    assert [e["step"] for e in evals] == [2, 4]  # after epoch 1 and at the end

    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 4 and result["images"] == 3
    assert set(result["coco"]) == {"mask", "box"}
    assert 0.0 <= result["coco"]["mask"]["AP"] <= 1.0
    assert "map" in result["open_images"]
    # The trainer's scores are `oistream evaluate`'s on the predictions file it wrote.
    rescored = out / "rescored.json"
    assert (
        oistream_main(
            ["evaluate", str(shards["val"]), str(out / "predictions.csv"), "--out", str(rescored)]
        )
        == 0
    )
    again = json.loads(rescored.read_text())
    assert again["open_images"] == result["open_images"] and again["coco"] == result["coco"]
    assert again["open_images"]["num_images"] == 3
    assert len(result["history"]) == 2
    pictures = sorted((out / "predictions").glob("*.png"))
    assert len(pictures) == 3 and all(p.stat().st_size > 0 for p in pictures)

    saved = latest(out)
    assert saved.name == "step-0000004.pt"
    assert json.loads((out / "args.json").read_text())["out"] == str(out)
    state = ckpt.load_checkpoint(saved)
    expected = {"model", "optimizer", "scheduler", "scaler", "step", "epoch", "rng", "args"}
    assert expected <= set(state)
    assert [c["name"] for c in state["classes"]] == [c["name"] for c in classes_table(2)]
    assert state["layout"] == {
        "variant": "v2",
        "pretrained": False,
        "trainable_backbone_layers": 6,
        "backbone": "mobilenet_v3_large",
        "weights": "none",
        "anchor_sizes": (32, 64, 128, 256, 512),
        "channels": 64,
    }


def test_a_resumed_run_takes_the_same_next_step(shards: dict, tmp_path: Path) -> None:
    """Resume from the step-3 checkpoint (mid-epoch 2) in a fresh folder: step 4 has the
    uninterrupted run's loss, so weights, momentum, schedule, RNG and data position came back."""
    common = [
        "--train", str(shards["train"]), *CHEAP, "--deterministic", "--epochs", "2",
        "--steps-per-epoch", "2", "--log-every", "1", "--checkpoint-every", "3",
    ]  # fmt: skip
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main([*common, "--out", str(whole)]) == 0
    assert checkpoints(whole) == ["step-0000003.pt", "step-0000004.pt"]
    step3 = whole / "checkpoints" / "step-0000003.pt"
    assert main([*common, "--out", str(resumed), "--resume", str(step3)]) == 0

    loss = {r["step"]: r["loss"] for r in records(whole) if "loss" in r}
    after = {r["step"]: r["loss"] for r in records(resumed) if "loss" in r}
    assert list(after) == [4]
    assert after[4] == pytest.approx(loss[4], rel=1e-6)
    assert loss[4] != pytest.approx(loss[3], rel=1e-3)  # the steps do differ
    # --resume auto finds the newest checkpoint; with no steps left the run ends at once.
    assert main([*common, "--out", str(resumed), "--resume", "auto", "--stop-after", "4"]) == 0
    assert latest(resumed).name == "step-0000004.pt"


def test_missing_shards_end_in_one_line(capsys, tmp_path: Path) -> None:
    code = main(["--train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *CHEAP])
    assert code == 1
    assert "nowhere" in one_line_error(capsys)


def test_checkpoint_with_other_classes_ends_in_one_line(shards, capsys, tmp_path: Path) -> None:
    other = [
        {"index": 0, "mid": None, "name": "background"},
        {"index": 1, "mid": "/m/x", "name": "Cat"},
    ]
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}, "classes": other}, foreign)
    base = ["--train", str(shards["train"]), "--out", str(tmp_path / "o"), *CHEAP]
    assert main([*base, "--weights", str(foreign)]) == 1
    assert "classes [Cat]" in one_line_error(capsys)
    assert main([*base, "--resume", str(foreign)]) == 1
    assert "classes [Cat]" in one_line_error(capsys)


def test_unsupported_options_end_in_one_line(shards, capsys, tmp_path: Path) -> None:
    base = ["--train", str(shards["train"]), "--out", str(tmp_path / "o"), *CHEAP]
    assert main([*base, "--gpu-decode", "--device", "cpu"]) == 1
    assert "--gpu-decode needs a CUDA device" in one_line_error(capsys)
    assert main([*base, "--amp", "bf16"]) == 1
    assert "needs a CUDA device" in one_line_error(capsys)
    with pytest.raises(SystemExit) as usage:
        main([*base, "--epochs", "0"])
    assert usage.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_entry_point_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "train", "--train", str(tmp_path / "missing"), "--out", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_time_limit_stops_with_a_checkpoint_and_an_evaluation(shards, capsys, tmp_path) -> None:
    out = tmp_path / "run"
    args = ["--train", str(shards["train"]), "--val", str(shards["val"]), "--out", str(out)]
    limit = ["--time-limit-minutes", "0.0001", "--epochs", "5", "--steps-per-epoch", "2"]
    assert main([*args, *CHEAP, *limit, "--num-predictions", "0"]) == 0
    assert "stopped by the time limit at step 1" in capsys.readouterr().err
    assert checkpoints(out) == ["step-0000001.pt"]
    assert json.loads((out / "eval.json").read_text())["step"] == 1


def test_demo_defaults_yield_to_explicit_flags() -> None:
    demo = parse_args(["--train", "t", "--out", "o", "--demo", "--epochs", "3"])
    assert DEMO_DEFAULTS["epochs"] != 3
    assert (demo.model, demo.weights, demo.epochs, demo.eval_every) == ("v2", "none", 3, 0)
    assert (
        demo.channels
        == DEMO_DEFAULTS["channels"]
        != parse_args(["--train", "t", "--out", "o"]).channels
    )
    assert demo.time_limit_minutes == DEMO_DEFAULTS["time_limit_minutes"]
    plain = parse_args(["--train", "t", "--out", "o"])
    assert (plain.model, plain.weights, plain.epochs) == ("v1", "coco", 12)
