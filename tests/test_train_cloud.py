"""The trainer on object storage: a run folder in S3 (moto on loopback), SIGTERM mid-epoch and
``--resume auto`` without replay, verified checkpoints, the shard cache, one-line failures.

Runs go through ``train.cli.main`` in-process with tiny images and a cheap model; the signal is
a real SIGTERM delivered to this process while a step runs.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from shardfactory import random_samples, write_shards

from oistream.loader import ShardDataset
from oistream.testing.faultproxy import FaultProxy
from train import cli, rundir
from train.cli import main
from train.errors import one_line
from train.rundir import RunDir

CHEAP = [
    "--model", "v2", "--backbone", "mobilenet_v3_large", "--channels", "64", "--weights", "none",
    "--min-size", "48", "--max-size", "64",
    "--rpn-samples", "64", "--roi-samples", "8", "--detections-per-image", "20",
    "--batch-size", "2", "--lr", "0.01", "--warmup-steps", "2",
    "--clip-grad", "10", "--no-progress", "--amp", "off", "--log-every", "1",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("restore_determinism")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cloud-shards")
    train = random_samples(12, seed=3, size=(64, 80), max_instances=3, num_classes=2)
    val = random_samples(2, seed=4, size=(64, 80), max_instances=3, num_classes=2)
    write_shards(root / "train", train, samples_per_shard=3, num_classes=2)
    write_shards(root / "val", val, samples_per_shard=2, split="validation", num_classes=2)
    return {"train": root / "train", "val": root / "val"}


def upload(s3, folder: Path, bucket: str, prefix: str) -> str:
    for path in sorted(folder.iterdir()):
        s3.client.put_object(
            Bucket=bucket.removeprefix("s3://"), Key=f"{prefix}/{path.name}", Body=path.read_bytes()
        )
    return f"{bucket}/{prefix}"


def losses(lines: list[str]) -> dict[int, float]:
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("python -m train: error: ")
    assert "Traceback" not in lines[0]
    return lines[0]


# -- the run folder on S3 --------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_a_run_on_s3_leaves_everything_in_the_bucket_and_nothing_local(
    s3, shards, tmp_path, monkeypatch
) -> None:
    bucket = s3.make_bucket()
    train = upload(s3, shards["train"], bucket, "shards/train")
    val = upload(s3, shards["val"], bucket, "shards/val")
    workdir, scratch, cache = tmp_path / "cwd", tmp_path / "tmp", tmp_path / "cache"
    workdir.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = f"{bucket}/runs/one"
    args = ["--train", train, "--val", val, "--out", out, "--endpoint-url", s3.endpoint_url]
    args += ["--shard-cache", str(cache)]
    run = [*args, *CHEAP, "--workers", "1", "--epochs", "1", "--steps-per-epoch", "2"]
    assert main([*run, "--checkpoint-every", "1", "--keep-checkpoints", "1"]) == 0

    key = out.removeprefix("s3://").split("/", 1)[1]
    listed = s3.client.list_objects_v2(Bucket=bucket.removeprefix("s3://"), Prefix=key)
    names = sorted(o["Key"].removeprefix(key + "/") for o in listed["Contents"])
    checkpoints = [n for n in names if n.startswith("checkpoints/")]
    # Step 1 was pruned only after step 2 was published, with its record.
    assert checkpoints == ["checkpoints/step-0000002.pt", "checkpoints/step-0000002.pt.json"]
    assert {"args.json", "eval.json", "metrics.jsonl"} <= set(names)
    assert any(n.startswith("predictions/") and n.endswith(".png") for n in names)
    folder = RunDir(out, s3.endpoint_url)
    metrics = (folder.read_bytes("metrics.jsonl") or b"").decode().splitlines()
    assert sorted(losses(metrics)) == [1, 2]
    assert json.loads(folder.read_bytes("eval.json"))["step"] == 2
    step, where, _ = folder.latest_checkpoint()
    assert (step, where) == (2, f"{out}/checkpoints/step-0000002.pt")
    folder.close()
    # Nothing local but the shard cache: no ./s3:/ folder, no staging left behind.
    assert list(workdir.iterdir()) == [] and list(scratch.iterdir()) == []
    assert len(list(cache.glob("*.tar"))) == 4

    # A run that starts from that checkpoint by URL downloads it and removes the download.
    again = ["--train", train, "--out", f"{bucket}/runs/two", "--endpoint-url", s3.endpoint_url]
    again += ["--shard-cache", str(cache), "--weights", where]
    # (after CHEAP, whose --weights none it overrides)
    assert main([*CHEAP, *again, "--workers", "0", "--epochs", "1", "--steps-per-epoch", "1"]) == 0
    assert list(workdir.iterdir()) == [] and list(scratch.iterdir()) == []


# -- SIGTERM mid-epoch, then --resume auto ----------------------------------------------------


@pytest.mark.timeout(900)  # six CPU steps of Mask R-CNN: minutes on a loaded 2-core machine
def test_sigterm_mid_epoch_checkpoints_and_resume_auto_continues_the_same_losses(
    shards, tmp_path, monkeypatch, capsys
) -> None:
    common = [
        "--train", str(shards["train"]), *CHEAP, "--workers", "2", "--deterministic",
        "--epochs", "1", "--steps-per-epoch", "3", "--checkpoint-every", "100",
    ]  # fmt: skip
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main([*common, "--out", str(whole)]) == 0
    expected = losses((whole / "metrics.jsonl").read_text().splitlines())
    assert sorted(expected) == [1, 2, 3]

    # A real SIGTERM to this process while step 1 is being logged (DataLoader workers ignore
    # it): the step finishes, a checkpoint is written, the exit code is 143. One batch of two
    # workers' is taken: the resumed loader must start with the second worker's stream.
    log = rundir.RunDir.log

    def log_and_signal(self, record, **kwargs):
        log(self, record, **kwargs)
        if record.get("step") == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patched:
        patched.setattr(rundir.RunDir, "log", log_and_signal)
        capsys.readouterr()
        assert main([*common, "--out", str(stopped)]) == 143
    assert "stopped by SIGTERM at step 1; resume with --resume auto" in capsys.readouterr().err
    assert sorted(p.name for p in (stopped / "checkpoints").glob("*.pt")) == ["step-0000001.pt"]
    saved = torch.load(stopped / "checkpoints" / "step-0000001.pt", weights_only=True)
    position = saved["data"][0]
    assert (position["epoch"], position["batches"], position["num_workers"]) == (0, 1, 2)

    assert main([*common, "--out", str(stopped), "--resume", "auto"]) == 0
    resumed = losses((stopped / "metrics.jsonl").read_text().splitlines())
    assert sorted(resumed) == [1, 2, 3]  # lines before the checkpoint kept, none twice
    for step in (2, 3):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6)
    assert expected[2] != pytest.approx(expected[3], rel=1e-3)


# -- verified checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_torn_checkpoint_is_skipped_for_the_previous_one(where, s3, tmp_path, capsys) -> None:
    url = str(tmp_path / "run") if where == "local" else f"{s3.make_bucket()}/run"
    folder = RunDir(url, s3.endpoint_url)
    folder.prepare()
    for step in (1, 2):
        staged = folder.staging(folder.checkpoint_name(step))
        torch.save({"step": step, "weights": torch.arange(1000)}, staged)
        folder.publish_checkpoint(staged, step)
    newest = folder.checkpoint_name(2)
    data = folder.read_bytes(newest)
    # Truncated to its record's length minus one byte, then a same-length foreign file.
    folder.publish_bytes(newest, data[:-1])
    found = folder.latest_checkpoint()
    assert found is not None and found[0] == 1
    assert torch.load(found[2], weights_only=True)["step"] == 1
    assert "skipping checkpoint" in capsys.readouterr().err
    folder.publish_bytes(newest, bytes(len(data)))
    assert folder.latest_checkpoint()[0] == 1
    # A checkpoint without its record (a crash between the two PUTs) is not a candidate.
    folder.delete(f"{folder.checkpoint_name(1)}.json")
    assert folder.latest_checkpoint() is None
    # Pruning keeps the newest ones and never the one just published.
    for step in (3, 4, 5):
        staged = folder.staging(folder.checkpoint_name(step))
        torch.save({"step": step}, staged)
        folder.publish_checkpoint(staged, step)
        folder.prune_checkpoints(2, newest=step)
    assert [s for s, _ in folder.checkpoints()] == [5, 4]
    folder.close()


# -- the shard cache -------------------------------------------------------------------------


def test_the_shard_cache_serves_epoch_two_without_a_request(s3, shards, tmp_path) -> None:
    bucket = s3.make_bucket()
    source = upload(s3, shards["train"], bucket, "cached")
    with FaultProxy(s3.endpoint_url) as proxy:
        dataset = ShardDataset(
            source,
            shuffle=0,
            train=False,
            endpoint_url=proxy.endpoint_url,
            shard_cache=tmp_path / "cache",
        )
        first = [t["image_key"] for _, t in dataset]
        assert proxy.stats.requests > 0
        cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
        assert len(cached) == 4 and all(name.endswith(".tar") for name in cached)
        proxy.reset_stats()
        second = [t["image_key"] for _, t in dataset]
        assert proxy.stats.requests == 0
        assert sorted(second) == sorted(first) and len(first) == 12

        # A bound of two shards keeps the two used last; a damaged copy is not served.
        small = ShardDataset(
            source,
            shuffle=0,
            train=False,
            endpoint_url=proxy.endpoint_url,
            shard_cache=tmp_path / "small",
            shard_cache_bytes=2 * max(p.stat().st_size for p in shards["train"].glob("*.tar")),
        )
        assert len([t for _, t in small]) == 12
        assert len(list((tmp_path / "small").iterdir())) == 2
        for path in (tmp_path / "cache").iterdir():
            path.write_bytes(path.read_bytes()[:-10])
        proxy.reset_stats()
        assert len([t for _, t in dataset]) == 12
        assert proxy.stats.requests > 0  # read from S3 again, and cached again
    assert all(
        p.stat().st_size == (shards["train"] / p.name.split("-", 1)[1]).stat().st_size
        for p in (tmp_path / "cache").iterdir()
    )


# -- one-line failures -----------------------------------------------------------------------


def test_storage_failures_are_one_line(s3, shards, tmp_path, capsys) -> None:
    base = [*CHEAP, "--workers", "0", "--steps-per-epoch", "1", "--epochs", "1"]
    # Nothing listens on port 9 of loopback.
    dead = ["--endpoint-url", "http://127.0.0.1:9"]
    code = main(
        ["--train", str(shards["train"]), "--val", "s3://b/val", *dead, "--out", "o", *base]
    )
    assert code == 1
    assert "s3://b/val" in one_line_error(capsys)
    # A bucket without a public policy refuses anonymous reads (403).
    s3.client.create_bucket(Bucket="private-shards")
    private = upload(s3, shards["train"], "s3://private-shards", "train")
    code = main(["--train", private, "--endpoint-url", s3.endpoint_url, "--out", "o", *base])
    assert code == 1
    assert "private-shards" in one_line_error(capsys)


def test_data_and_environment_failures_are_one_line(shards, tmp_path, capsys) -> None:
    base = ["--train", str(shards["train"]), "--out", str(tmp_path / "o"), *CHEAP]
    # Validation shards with the same classes in another order.
    reordered = tmp_path / "val"
    write_shards(
        reordered,
        random_samples(2, seed=4, size=(64, 80), num_classes=2),
        samples_per_shard=2,
        num_classes=2,
    )
    manifest = json.loads((reordered / "manifest.json").read_text())
    first, second = manifest["classes"][1]["name"], manifest["classes"][2]["name"]
    manifest["classes"][1]["name"], manifest["classes"][2]["name"] = second, first
    (reordered / "manifest.json").write_text(json.dumps(manifest))
    assert main([*base, "--val", str(reordered)]) == 1
    line = one_line_error(capsys)
    assert "another order" in line and f"1: {first} vs {second}" in line
    # TensorBoard is optional: without it, one line saying what to install.
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert main([*base, "--tensorboard"]) == 1
        assert "pip install tensorboard" in one_line_error(capsys)
    # Usage errors: one argparse line, exit 2.
    with pytest.raises(SystemExit) as usage:
        main([*base, "--checkpoint-every", "10x"])
    assert usage.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_library_failures_become_advice() -> None:
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "lower --batch-size" in one_line(oom)
    assert "check credentials" in one_line(PermissionError("Forbidden"))
    assert "\n" not in one_line(OSError("a\nb"))


def test_checkpoint_every_takes_steps_or_minutes() -> None:
    args = cli.parse_args(["--train", "t", "--out", "o", "--checkpoint-every", "10m"])
    assert (args.checkpoint_every, args.checkpoint_every_s) == (None, 600.0)
    args = cli.parse_args(["--train", "t", "--out", "o", "--checkpoint-every", "250"])
    assert (args.checkpoint_every, args.checkpoint_every_s) == (250, None)
    args = cli.parse_args(["--train", "t", "--out", "o", "--shard-cache-size", "2G"])
    assert args.shard_cache_size == 2 * 2**30


def test_debug_shows_the_traceback(tmp_path, capsys) -> None:
    args = ["--train", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *CHEAP]
    assert main(args) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert main([*args, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("python -m train: error: cannot open shards")
