"""Shard format version 1 (docs/format.md): the one module that owns its names and rules.

The writer (``oistream.sharding``) makes names with these functions and the readers (the
loader, ``inspect``, ``show``, ``export``) look for them with the same functions; the manifest is
read and validated here once for all of them. Nothing here imports torch or aiohttp.
"""

from __future__ import annotations

import json
import re
from typing import Any

from oistream import sources
from oistream.errors import OistreamError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Per-shard progress records and the plan record live here, beside the shards; a reader never
# looks inside (webdataset globs ``*.tar``).
PROGRESS_FOLDER = "_progress"
PLAN_RECORD = f"{PROGRESS_FOLDER}/plan.json"

# Sample members: ``{key}.jpg``, ``{key}.json`` and ``{key}.{k:03d}.mask.png``. As in webdataset,
# a member's field is everything after the first dot of its base name.
IMAGE_FIELD = "jpg"
JSON_FIELD = "json"
MASK_FIELD_PATTERN = re.compile(r"[0-9]{3}\.mask\.png")
_SHARD_NAME_PATTERN = re.compile(r"(train|validation|test)-[0-9]{6}\.tar")


class ManifestError(OistreamError):
    """A manifest that is missing a field, has one of the wrong type, or is not JSON."""


def shard_name(split: str, index: int) -> str:
    """``{split}-{NNNNNN}.tar``: the name of a split's ``index``-th shard."""
    return f"{split}-{index:06d}.tar"


def is_shard_name(name: str) -> bool:
    """True for names :func:`shard_name` makes."""
    return bool(_SHARD_NAME_PATTERN.fullmatch(name))


def progress_name(shard: str) -> str:
    """Where a finished shard's stats and failures live, so a rerun can skip it."""
    return f"{PROGRESS_FOLDER}/{shard}.json"


def mask_field(k: int) -> str:
    """The field of a sample's ``k``-th mask (``000.mask.png``), k in CSV order."""
    return f"{k:03d}.mask.png"


def member_field(name: str) -> str | None:
    """The field of a member readers use (``jpg``, ``json``, ``NNN.mask.png``), else None."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return None
    field = base.split(".", 1)[1].lower()
    if field in (IMAGE_FIELD, JSON_FIELD) or MASK_FIELD_PATTERN.fullmatch(field):
        return field
    return None


def is_safe_member_name(name: str) -> bool:
    """False for names that could leave the shard's folder if anyone extracted them."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return False
    if re.match(r"^[A-Za-z]:", name):  # a Windows drive
        return False
    return ".." not in name.split("/")


# --- The manifest ----------------------------------------------------------------------------


def read_manifest(folder: str, options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The validated manifest of a shard folder or URL; None when the folder has none.

    Raises :class:`ManifestError` (one line naming the file and the field) for anything else.
    The filesystem is kept out of fsspec's instance cache: forked loader workers must never be
    handed an s3fs instance made in the parent (s3fs is not fork-safe).
    """
    where = sources.join(folder, MANIFEST_NAME)
    fs, path = sources.filesystem(folder, options or {}, skip_instance_cache=True)
    try:
        with fs.open(f"{path.rstrip('/')}/{MANIFEST_NAME}", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ManifestError(f"cannot read {where}: {error}") from None
    return parse_manifest(data, where)


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Parse and validate manifest bytes; ``where`` names the file in errors."""
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise ManifestError(f"{where} is not valid JSON: {error}") from None
    validate_manifest(manifest, where)
    return manifest


def _check(condition: bool, where: str, field: str, expected: str) -> None:
    if not condition:
        raise ManifestError(f"{where}: field {field!r} must be {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_manifest(manifest: Any, where: str) -> None:
    """Check every field readers rely on, by type; the first bad one is named in the error.

    Unknown keys are allowed (format version 1 grows by additive fields).
    """
    _check(isinstance(manifest, dict), where, "(top level)", "a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{where} has shard format version {version!r}; "
            f"this oistream reads version {FORMAT_VERSION}"
        )
    for key in ("split", "oistream_version", "plan_hash"):
        if key in manifest:
            _check(isinstance(manifest[key], str), where, key, "a string")
    classes = manifest.get("classes")
    _check(isinstance(classes, list) and len(classes) > 0, where, "classes", "a non-empty list")
    for position, entry in enumerate(classes):
        label = f"classes[{position}]"
        _check(isinstance(entry, dict), where, label, "an object")
        # Labels index the model's heads: a gap or a shuffled index would mislabel silently.
        _check(
            entry.get("index") == position and _is_int(entry.get("index")),
            where,
            f"{label}.index",
            f"the integer {position} (indices 0..K in order)",
        )
        _check(isinstance(entry.get("name"), str), where, f"{label}.name", "a string")
        # Background (index 0) has no MID.
        mid_ok = isinstance(entry.get("mid"), str) or (position == 0 and entry.get("mid") is None)
        _check(mid_ok, where, f"{label}.mid", "a string")
    shards = manifest.get("shards", [])
    _check(isinstance(shards, list), where, "shards", "a list")
    for position, shard in enumerate(shards):
        label = f"shards[{position}]"
        _check(isinstance(shard, dict), where, label, "an object")
        name = shard.get("name")
        # The manifest is as untrusted as the shards: its names must stay in the folder.
        if not (isinstance(name, str) and "/" not in name and is_safe_member_name(name)):
            raise ManifestError(f"{where} lists a bad shard name {name!r} (field '{label}.name')")
        for key in ("samples", "instances", "bytes"):
            if key in shard:
                _check(
                    _is_int(shard[key]) and shard[key] >= 0,
                    where,
                    f"{label}.{key}",
                    "a non-negative integer",
                )
        if "sha256" in shard:
            _check(
                isinstance(shard["sha256"], str)
                and re.fullmatch(r"[0-9a-f]{64}", shard["sha256"]) is not None,
                where,
                f"{label}.sha256",
                "64 hex digits",
            )
    if "totals" in manifest:
        _check(isinstance(manifest["totals"], dict), where, "totals", "an object")
    failures = manifest.get("failures", [])
    _check(isinstance(failures, list), where, "failures", "a list")
    for position, failure in enumerate(failures):
        _check(
            isinstance(failure, dict)
            and isinstance(failure.get("image_id"), str)
            and isinstance(failure.get("reason"), str),
            where,
            f"failures[{position}]",
            "an object with string image_id and reason",
        )
