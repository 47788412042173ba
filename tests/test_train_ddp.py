"""Two CPU processes under torchrun (gloo) on uneven shards finish their steps and their
evaluation without hanging, and rank 0 scores every validation image of both ranks; a SIGTERM
that reaches one rank only stops both at the same step with one checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
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
        "--model", "v1", "--backbone", "mobilenet_v3_large", "--channels", "64",
        "--weights", "none", "--min-size", "64", "--max-size", "96",
        "--rpn-samples", "32", "--roi-samples", "8", "--detections-per-image", "10",
        "--batch-size", "1", "--workers", "1", "--epochs", "1", "--steps-per-epoch", "3",
        "--lr", "0.005", "--warmup-steps", "2", "--clip-grad", "10", "--log-every", "1",
        "--device", "cpu", "--no-progress", "--num-predictions", "1",
    ]  # fmt: skip
    # torchrun leaves a torchelastic_* log folder in the temporary directory: keep it in ours.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _logged_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    lines = metrics.read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path: Path) -> None:
    # A spot reclaim may reach the ranks at different moments (or, through a launcher, only
    # some of them): the ranks launched as torchrun launches them (RANK, WORLD_SIZE, ...), so
    # each one's exit code is visible, and only rank 1 is signalled.
    train = random_samples(6, seed=7, size=(64, 80), max_instances=2, num_classes=2)
    write_shards(tmp_path / "train", train, samples_per_shard=3, num_classes=2)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "train", "--train", str(tmp_path / "train"), "--out", str(out),
        "--model", "v1", "--backbone", "mobilenet_v3_large", "--channels", "64",
        "--weights", "none", "--min-size", "64", "--max-size", "96",
        "--rpn-samples", "32", "--roi-samples", "8", "--detections-per-image", "10",
        "--batch-size", "1", "--workers", "1", "--epochs", "1", "--steps-per-epoch", "500",
        "--lr", "0.005", "--warmup-steps", "2", "--clip-grad", "10", "--log-every", "1",
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    port = str(_free_port())
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        ranks.append(subprocess.Popen(command, cwd=ROOT, env=env, **pipes))
    try:
        # Synchronised on what the run wrote: the signal goes in once training has begun.
        deadline = time.monotonic() + 240
        while not _logged_steps(out / "metrics.jsonl"):
            assert all(r.poll() is None for r in ranks), ranks[0].communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no step logged in 240 s"
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGTERM)
        finished = [r.communicate(timeout=240) for r in ranks]
    finally:
        for r in ranks:
            r.kill()
    codes = [r.returncode for r in ranks]
    assert codes == [143, 143], [err[-2000:] for _, err in finished]
    steps = _logged_steps(out / "metrics.jsonl")
    last = steps[-1]
    assert last < 500 and steps == list(range(1, last + 1))
    assert f"stopped by SIGTERM at step {last}; resume with --resume auto" in finished[0][1]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == [f"step-{last:07d}.pt", f"step-{last:07d}.pt.json"]
