"""What a user selects besides classes: lists of ImageIDs and class files; counts per class.

``--image-ids`` follows FiftyOne's ``image_ids``: a text file with one ID per line (optionally
``split/ID``, as FiftyOne writes them), a CSV with an ``ImageID`` column, or a JSON list of IDs
or of objects with an ``ImageID`` field. ``--classes-file`` follows OIDv4_ToolKit: one class
name or MID per line. Every ID is checked (16 lowercase hex digits) before it is used: a list is
as untrusted as anything else read from a URL.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from oistream import sources
from oistream.errors import OistreamError, one_line
from oistream.sharding.textfiles import _read_line_blocks

IMAGE_ID = re.compile(r"[0-9a-f]{16}")
# A list of IDs is small (train has 1.7M images: ~31 MB as text); refuse anything far larger.
MAX_LIST_BYTES = 256 * 2**20
_ID_FIELDS = ("ImageID", "image_id")


def read_image_ids(url: str, options: dict[str, Any] | None, split: str | None = None) -> set[str]:
    """The ImageIDs listed in ``url`` (txt, CSV or JSON, told apart by content).

    IDs written ``split/ID`` count only for that split when ``split`` is given. Raises one-line
    ``OistreamError`` for an unreadable file, an unknown layout or an ID that is not one.
    """
    try:
        fs, path = sources.filesystem(url, options)
        with fs.open(path, "rb") as file:
            data = file.read(MAX_LIST_BYTES + 1)
    except FileNotFoundError:
        raise OistreamError(f"--image-ids: {url} not found") from None
    except Exception as error:
        raise OistreamError(f"--image-ids: cannot read {url}: {one_line(error)}") from None
    if len(data) > MAX_LIST_BYTES:
        raise OistreamError(f"--image-ids: {url} is larger than {MAX_LIST_BYTES >> 20} MiB")
    text = data.decode("utf-8", errors="replace").lstrip("\ufeff")
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        entries = _json_entries(url, stripped)
    else:
        first_line = stripped.split("\n", 1)[0]
        if "," in first_line or first_line.strip() in _ID_FIELDS:
            entries = _csv_entries(url, text)
        else:
            entries = [
                (n, line.strip())
                for n, line in enumerate(text.splitlines(), start=1)
                if line.strip() and not line.lstrip().startswith("#")
            ]
    ids: set[str] = set()
    for where, entry in entries:
        entry_split, _, image_id = entry.rpartition("/")
        if not IMAGE_ID.fullmatch(image_id):
            raise OistreamError(
                f"--image-ids: {url} entry {where}: {entry[:40]!r} is not an ImageID "
                "(16 lowercase hex digits)"
            )
        if split is None or not entry_split or entry_split == split:
            ids.add(image_id)
    if not entries:
        raise OistreamError(f"--image-ids: {url} lists no ImageID")
    return ids


def _json_entries(url: str, text: str) -> list[tuple[Any, str]]:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise OistreamError(f"--image-ids: {url} is not valid JSON: {error}") from None
    if isinstance(value, dict):  # {"ImageID": [...]} as well as a list
        value = next((value[k] for k in _ID_FIELDS if k in value), None)
    if not isinstance(value, list):
        raise OistreamError(
            f"--image-ids: {url}: expected a JSON list of IDs or of objects with 'ImageID'"
        )
    entries = []
    for n, item in enumerate(value):
        if isinstance(item, dict):
            item = next((item[k] for k in _ID_FIELDS if k in item), None)
        if not isinstance(item, str):
            raise OistreamError(f"--image-ids: {url} item {n}: no ImageID string")
        entries.append((f"#{n}", item.strip()))
    return entries


def _csv_entries(url: str, text: str) -> list[tuple[Any, str]]:
    reader = csv.reader(io.StringIO(text))
    header = [name.strip() for name in next(reader, [])]
    column = next((header.index(k) for k in _ID_FIELDS if k in header), None)
    if column is None:
        raise OistreamError(f"--image-ids: {url}: CSV without an ImageID column")
    entries = []
    for n, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) <= column:
            raise OistreamError(f"--image-ids: {url} line {n}: no ImageID field")
        entries.append((f"line {n}", row[column].strip()))
    return entries


def read_class_file(url: str, options: dict[str, Any] | None = None) -> list[str]:
    """Class names or MIDs, one per line; blank lines and ``#`` comments skipped."""
    try:
        fs, path = sources.filesystem(url, options)
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise OistreamError(f"--classes-file: {url} not found") from None
    except Exception as error:
        raise OistreamError(f"--classes-file: cannot read {url}: {one_line(error)}") from None
    names = [
        line.strip()
        for line in data.decode("utf-8", errors="replace").lstrip("\ufeff").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not names:
        raise OistreamError(f"--classes-file: {url} names no class")
    return names


def count_classes(
    csv_url: str,
    mids: Iterable[str],
    options: dict[str, Any] | None = None,
    opener: Callable[[], Any] | None = None,
) -> dict[str, tuple[int, int]]:
    """MID -> (images, instances) among the CSV's well-formed rows of ``mids``.

    Only LabelName and ImageID of each line are looked at, in numpy, so counting every class of
    the train CSV keeps a few bytes per row (the distinct image/label pairs), not a DataFrame.
    """
    # Here, not with the module: `oistream shard` reads its class file before numpy is imported.
    import numpy as np

    from oistream.sharding import catalog

    selected = frozenset(mids)
    width = max((len(m.encode()) for m in selected), default=0) + 1
    wanted = np.array(sorted(m.encode() for m in selected), dtype=f"S{width}")
    blocks = _read_line_blocks(csv_url, options, 8 * 2**20, opener)
    instances: dict[bytes, int] = {}
    pairs: list[np.ndarray] = []
    with contextlib.closing(blocks):
        header = bytes(next(blocks)[1]).decode("utf-8", errors="replace").lstrip("\ufeff").strip()
        if header != catalog.HEADER:
            raise OistreamError(f"{csv_url}: unexpected header {header[:200]!r}")
        for _, block in blocks:  # (offset in the file, block of whole lines)
            lines = catalog._Lines(block)
            candidates, labels = lines.select(wanted, width)
            if not len(candidates):
                continue
            image_ids = np.ascontiguousarray(lines.fixed_width(candidates, 1, 16)[0])
            for label, count in zip(*np.unique(labels, return_counts=True), strict=True):
                instances[bytes(label)] = instances.get(bytes(label), 0) + int(count)
            pair = np.empty(len(candidates), dtype=[("label", f"S{width}"), ("image", "S16")])
            pair["label"] = labels
            pair["image"] = image_ids.view("S16").ravel()
            pairs.append(np.unique(pair))
    images: dict[bytes, int] = {}
    if pairs:
        distinct = np.unique(np.concatenate(pairs))
        for label, count in zip(*np.unique(distinct["label"], return_counts=True), strict=True):
            images[bytes(label)] = int(count)
    return {mid: (images.get(mid.encode(), 0), instances.get(mid.encode(), 0)) for mid in selected}


__all__ = ["count_classes", "read_class_file", "read_image_ids"]
