"""oistream.format: the names the writer makes are the names the readers look for, and the
manifest validator names the first bad field."""

from __future__ import annotations

import json
import re

import pytest

from oistream import format as shard_format
from oistream.format import ManifestError, parse_manifest


def _manifest(**changes):
    manifest = {
        "format_version": 1,
        "split": "validation",
        "classes": [
            {"index": 0, "mid": None, "name": "background"},
            {"index": 1, "mid": "/m/01g317", "name": "Person"},
        ],
        "shards": [{"name": "validation-000000.tar", "samples": 2, "instances": 3, "bytes": 10}],
        "failures": [],
    }
    manifest.update(changes)
    return json.dumps(manifest).encode()


def test_shard_names_round_trip():
    name = shard_format.shard_name("train", 12)
    assert name == "train-000012.tar"
    assert shard_format.is_shard_name(name)
    assert not shard_format.is_shard_name("train-12.tar")
    assert shard_format.progress_name(name) == "_progress/train-000012.tar.json"


def test_member_fields_follow_webdataset_keys():
    assert shard_format.member_field("abc.jpg") == "jpg"
    assert shard_format.member_field("abc.JSON") == "json"
    assert shard_format.member_field(f"abc.{shard_format.mask_field(7)}") == "007.mask.png"
    assert shard_format.member_field("abc.pyd") is None
    assert shard_format.member_field("abc") is None


@pytest.mark.parametrize("name", ["../x.tar", "/etc/x", "a\\b", "C:x", "", "a\x00b"])
def test_unsafe_member_names(name):
    assert not shard_format.is_safe_member_name(name)


def test_a_good_manifest_parses():
    assert parse_manifest(_manifest(), "m.json")["split"] == "validation"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"format_version": 2}, "version 2"),
        ({"classes": []}, "'classes'"),
        ({"classes": [{"index": 0, "mid": None, "name": "background"}, {"index": 1.0}]}, "index"),
        ({"classes": [{"index": 0, "mid": None, "name": "bg"}, {"index": True}]}, "index"),
        ({"shards": [{"name": "x.tar", "samples": "2"}]}, "'shards[0].samples'"),
        ({"shards": [{"name": "x.tar", "sha256": "zz"}]}, "'shards[0].sha256'"),
        ({"failures": [{"image_id": 3, "reason": "x"}]}, "'failures[0]'"),
        ({"split": 7}, "'split'"),
    ],
)
def test_a_bad_field_is_named(changes, field):
    with pytest.raises(ManifestError, match=re.escape(field)):
        parse_manifest(_manifest(**changes), "m.json")


def test_bad_json_is_one_error():
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(b"{", "m.json")
