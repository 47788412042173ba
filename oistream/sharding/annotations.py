"""Evaluation annotations for the shards: boxes (with IsGroupOf), human-verified image-level
labels and the class hierarchy, streamed from the split's CSVs (DESIGN sections 2 and 4).

Only the rows of the planned images and of the selected classes' relatives in the hierarchy
(the classes themselves, their ancestors and their descendants) are kept: what the challenge
metric needs to expand the ground truth up the hierarchy and to know which classes each image
verified. The CSVs are read in blocks, never whole (train's box CSV is 1.1 GB).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from oistream import sources
from oistream.errors import OistreamError
from oistream.sharding.classes import OIClass
from oistream.sharding.textfiles import _read_line_blocks, _read_text

if TYPE_CHECKING:  # numpy comes with it, which a shard run imports on a thread (run_splits)
    from oistream.sharding.rows import Rows

BOX_HEADER = (
    "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,"
    "IsDepiction,IsInside"
)
LABEL_HEADER = "ImageID,Source,LabelName,Confidence"
_BLOCK_BYTES = 8 << 20
_MAX_HIERARCHY_BYTES = 1 << 22  # the real file is 89 KB


def box_csv_url(metadata_root: str, split: str) -> str:
    """Train's boxes are V4's (``2018_04/train/``); validation's and test's are under ``v5/``."""
    if split == "train":
        return sources.join(metadata_root, "2018_04", "train", "train-annotations-bbox.csv")
    return sources.join(metadata_root, "v5", f"{split}-annotations-bbox.csv")


def image_labels_csv_url(metadata_root: str, split: str) -> str:
    return sources.join(metadata_root, "v5", f"{split}-annotations-human-imagelabels-boxable.csv")


def hierarchy_url(metadata_root: str) -> str:
    return sources.join(metadata_root, "2018_04", "bbox_labels_600_hierarchy.json")


def _cat(cache: Any, options: dict | None) -> Any:
    """Whole-file reads through the metadata cache (``cache.MetadataCache``), when there is one."""
    return None if cache is None else (lambda url: cache.cat(url, options))


def load_hierarchy(
    metadata_root: str, options: dict | None = None, cache: Any = None
) -> dict[str, Any]:
    """The class hierarchy JSON, checked to be a tree of ``{"LabelName", "Subcategory"}``."""
    url = hierarchy_url(metadata_root)
    text = _read_text(url, options, cat=_cat(cache, options))
    if len(text) > _MAX_HIERARCHY_BYTES:
        raise OistreamError(f"{url}: {len(text)} bytes is not a class hierarchy")
    try:
        tree = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise OistreamError(f"{url} is not valid JSON: {error}") from None
    from oistream.evaluation import Hierarchy

    Hierarchy(tree)  # validates the shape (one line on failure)
    return tree


def relatives(tree: dict[str, Any], mids: Iterable[str]) -> set[str]:
    """The classes, their ancestors and their descendants (``Subcategory`` links)."""
    from oistream.evaluation import Hierarchy

    h = Hierarchy(tree)
    out: set[str] = set()
    for mid in mids:
        out.update(h.to_ancestors(mid))
        out.update(h.to_descendants(mid))
    return out


def pruned_hierarchy(tree: dict[str, Any], keep: set[str]) -> dict[str, Any]:
    """The tree cut down to the nodes in ``keep`` and the paths to them (for the manifest)."""

    def prune(node: dict[str, Any]) -> dict[str, Any] | None:
        subs = [p for p in (prune(s) for s in node.get("Subcategory", [])) if p is not None]
        if not subs and node["LabelName"] not in keep:
            return None
        out: dict[str, Any] = {"LabelName": node["LabelName"]}
        if subs:
            out["Subcategory"] = subs
        return out

    return prune(tree) or {"LabelName": tree["LabelName"]}


def expand_to_segmentable(
    queries: Sequence[str],
    tree: dict[str, Any],
    segmentable: list[OIClass],
    boxable_names: dict[str, str],
) -> list[str]:
    """``--expand-hierarchy``: each query (name or MID, segmentable or not, e.g. Vehicle) -> the
    MIDs of itself if segmentable and of its segmentable descendants, in hierarchy order."""
    from oistream.evaluation import descendant_mids

    segmentable_mids = {c.mid for c in segmentable}
    by_name: dict[str, list[str]] = {}
    for mid, name in boxable_names.items():
        by_name.setdefault(name.casefold(), []).append(mid)
    for c in segmentable:
        by_name.setdefault(c.name.casefold(), []).append(c.mid)
    out: dict[str, None] = {}
    for query in queries:
        key = query.strip()
        mids = [key] if key in boxable_names or key in segmentable_mids else []
        mids = mids or list(dict.fromkeys(by_name.get(key.casefold(), [])))
        if len(mids) != 1:
            what = "ambiguous" if mids else "unknown"
            raise OistreamError(f"{what} class {query!r} for --expand-hierarchy")
        found = [m for m in [mids[0], *descendant_mids(tree, mids[0])] if m in segmentable_mids]
        if not found:
            raise OistreamError(f"{query!r} has no segmentable class at or below it")
        out.update(dict.fromkeys(found))
    return list(out)


@dataclass
class Annotations:
    """Per planned image, the ``image_labels`` and ``boxes`` fields its sample JSON carries."""

    per_image: dict[str, dict[str, Any]] = field(default_factory=dict)
    malformed_rows: int = 0


def read_annotations(
    metadata_root: str,
    split: str,
    image_ids: Iterable[str],
    mids: set[str],
    segmentation_rows: Rows,
    options: dict | None = None,
    cache: Any = None,
) -> Annotations:
    """Stream the split's box and image-level label CSVs, keeping rows of ``image_ids`` and
    ``mids``. ``has_mask`` says whether the segmentation CSV has a mask for that box (the same
    image, class and coordinates, as the challenge merges them)."""
    wanted = set(image_ids)
    result = Annotations(
        {
            image_id: {"image_labels": {"positive": [], "negative": []}, "boxes": []}
            for image_id in wanted
        }
    )
    columns = ("ImageID", "LabelName", "BoxXMin", "BoxYMin", "BoxXMax", "BoxYMax")
    masked = set(zip(*(segmentation_rows[c].tolist() for c in columns), strict=True))
    boxes = _stream_rows(
        box_csv_url(metadata_root, split), BOX_HEADER, wanted, mids, options, cache
    )
    for frame in boxes:
        for row in frame.itertuples(index=False):
            try:
                xmin, xmax, ymin, ymax = (
                    float(row.XMin),
                    float(row.XMax),
                    float(row.YMin),
                    float(row.YMax),
                )
                group_of = int(row.IsGroupOf) == 1  # train marks unknown as -1
            except ValueError:
                result.malformed_rows += 1
                continue
            if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (xmin, xmax, ymin, ymax)) or (
                xmin > xmax or ymin > ymax
            ):
                result.malformed_rows += 1
                continue
            key = (row.ImageID, row.LabelName, xmin, ymin, xmax, ymax)
            result.per_image[row.ImageID]["boxes"].append(
                {
                    "label": row.LabelName,
                    "box": [xmin, ymin, xmax, ymax],
                    "is_group_of": group_of,
                    "has_mask": key in masked,
                }
            )
    labels = _stream_rows(
        image_labels_csv_url(metadata_root, split), LABEL_HEADER, wanted, mids, options, cache
    )
    for frame in labels:
        for row in frame.itertuples(index=False):
            confidence = row.Confidence.strip()
            if confidence not in ("0", "1"):
                result.malformed_rows += 1
                continue
            side = "positive" if confidence == "1" else "negative"
            kept = result.per_image[row.ImageID]["image_labels"][side]
            if row.LabelName not in kept:
                kept.append(row.LabelName)
    for fields in result.per_image.values():
        for side in ("positive", "negative"):
            fields["image_labels"][side].sort()
    return result


def _stream_rows(
    url: str,
    header: str,
    image_ids: set[str],
    mids: set[str],
    options: dict | None,
    cache: Any = None,
):
    """DataFrames (all columns str) of the rows whose ImageID and LabelName are wanted; read
    through the metadata cache when there is one, so a rerun moves no body bytes.

    pandas is imported here, not with the module: only a split with evaluation annotations
    (validation, test) needs it, and a train run is spared its 0.4 s of CPU."""
    import pandas as pd

    columns = header.split(",")
    opener = None if cache is None else (lambda: cache.open(url, options))
    blocks = _read_line_blocks(url, options, _BLOCK_BYTES, opener)
    with contextlib.closing(blocks):
        _, header_line = next(blocks)  # (offset in the file, bytes)
        first = bytes(header_line).decode("utf-8", errors="replace").lstrip("\ufeff").strip()
        # V6+ train appends XClick columns: the first 13 must be the documented ones.
        if first.split(",")[: len(columns)] != columns:
            raise OistreamError(f"{url}: unexpected header {first[:200]!r}; expected {header!r}")
        width = len(first.split(","))
        for _, block in blocks:
            try:
                frame = pd.read_csv(
                    io.BytesIO(block),
                    header=None,
                    names=list(range(width)),
                    usecols=list(range(len(columns))),
                    dtype=str,
                    keep_default_na=False,
                    on_bad_lines="skip",
                    encoding_errors="replace",
                    engine="c",
                )
            except (pd.errors.ParserError, ValueError) as error:
                raise OistreamError(f"{url}: unreadable rows ({error})") from None
            frame.columns = columns
            keep = frame["ImageID"].isin(image_ids) & frame["LabelName"].isin(mids)
            if keep.any():
                yield frame.loc[keep]


def expanded_queries(
    queries: Sequence[str],
    segmentable: list[OIClass],
    metadata_root: str,
    options: dict | None,
    cache: Any = None,
) -> list[str]:
    """The class queries of ``--expand-hierarchy`` as segmentable MIDs."""
    from oistream.sharding.classes import _parse_descriptions

    tree = load_hierarchy(metadata_root, options, cache)
    url = sources.class_descriptions_url(metadata_root)
    names = _parse_descriptions(_read_text(url, options, cat=_cat(cache, options)))
    return expand_to_segmentable(queries, tree, segmentable, names)


def annotate_plan(
    plan: Any,
    table: Any,
    metadata_root: str,
    setting: bool | None,
    options: dict | None,
    cache: Any = None,
) -> dict[str, Any] | None:
    """Attach the evaluation annotations to ``plan``; returns the manifest's record of them
    (``None`` when off). ``setting`` None: on for validation/test when the files exist."""
    if setting is False or (setting is None and plan.split == "train"):
        return None
    try:
        tree = load_hierarchy(metadata_root, options, cache)
        mids = relatives(tree, [c.mid for c in plan.classes])
        found = read_annotations(
            metadata_root, plan.split, plan.image_ids(), mids, table.rows, options, cache
        )
    except OistreamError as error:
        if setting is None and "not found" in str(error):
            import sys

            print(f"note: no evaluation annotations ({error})", file=sys.stderr)
            return None
        raise
    plan.attach_annotations(found.per_image)
    plan.evaluation_record = {
        "hierarchy": tree,
        "evaluation_annotations": {
            "boxes": box_csv_url(metadata_root, plan.split),
            "image_labels": image_labels_csv_url(metadata_root, plan.split),
            "classes": sorted(mids),
            "malformed_rows": found.malformed_rows,
        },
    }
    return plan.evaluation_record
