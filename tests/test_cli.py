"""The small subcommands: classes, inspect, show, fake-bucket; and their one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from oistream.cli import build_parser, main


@pytest.fixture(scope="module")
def shard_folder(s3, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("cli") / "validation"
    mp = pytest.MonkeyPatch()
    for name, value in s3.env().items():
        mp.setenv(name, value)
    try:
        args = ["shard", "--classes", "Person", "Car", "--split", "validation"]
        args += ["--out", str(out), "--metadata", "s3://openimages", "--processes", "1", "--quiet"]
        assert main(args) == 0
    finally:
        mp.undo()
    return out


def test_classes_lists_matches_by_name_and_mid(s3_env, capsys):
    assert main(["classes", "traffic", "--metadata", "s3://openimages"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["/m/015qff\tTraffic light", "/m/01mqdt\tTraffic sign"]
    assert main(["classes", "/m/01g317", "--metadata", "s3://openimages"]) == 0
    assert capsys.readouterr().out.strip() == "/m/01g317\tPerson"


def test_classes_without_match_is_one_line(s3_env, capsys):
    assert main(["classes", "zebra-unicorn", "--metadata", "s3://openimages"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zebra-unicorn" in err


def test_inspect_folder_and_single_tar(shard_folder, capsys):
    manifest = json.loads((shard_folder / "manifest.json").read_text())
    assert main(["inspect", str(shard_folder)]) == 0
    out = capsys.readouterr().out
    assert f"{manifest['totals']['samples']} images" in out
    assert "Person" in out and "failures: none" in out
    first = shard_folder / manifest["shards"][0]["name"]
    assert main(["inspect", str(first)]) == 0
    out = capsys.readouterr().out
    assert f"{manifest['shards'][0]['samples']} images" in out


def test_inspect_without_manifest_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.json" in err


def test_show_draws_a_png_and_refuses_unknown_keys(shard_folder, tmp_path, capsys):
    out = tmp_path / "sample.png"
    assert main(["show", str(shard_folder), "--out", str(out)]) == 0
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width > 0
    assert main(["show", str(shard_folder), "--key", "0123456789abcdef", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0123456789abcdef" in err[0]


def test_fake_bucket_command_writes_both_roots(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "oistream",
            "fake-bucket",
            str(tmp_path),
            "--images",
            "8",
            "--processes",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "open-images-dataset" / "train").is_dir()
    assert (tmp_path / "openimages" / "v5" / "train-masks" / "train-masks-0.zip").is_file()
    assert "train 8 images" in result.stdout


def test_a_ctrl_c_while_the_command_loads_is_one_line_and_130() -> None:
    """The KeyboardInterrupt a Ctrl-C raises is raised here by an import hook the moment
    ``oistream.cli`` is imported: what a user pressing it in the first 0.1 s gets."""
    code = (
        "import runpy, sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'oistream.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['oistream', 'classes']\n"
        "runpy.run_module('oistream', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 130
    assert result.stderr == "oistream: interrupted while starting; nothing was done\n"


def test_the_entry_point_flushes_its_output_and_passes_the_exit_code_through(tmp_path):
    # `run` leaves by os._exit, skipping the interpreter's teardown: what was printed to a
    # pipe must still arrive whole, and the command's code must be the process's.
    helped = subprocess.run(
        [sys.executable, "-m", "oistream"], capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: oistream")
    last_line = build_parser().format_help().rstrip().splitlines()[-1]
    assert helped.stdout.rstrip().endswith(last_line)
    failed = subprocess.run(
        [sys.executable, "-m", "oistream", "inspect", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1 and "oistream inspect: error:" in failed.stderr
