"""Which classes exist: the segmentable class list and the display names, matched to queries.

Kept apart from the catalog (which scans the segmentation CSV with numpy) so that a shard run
reads its class lists before numpy is imported: the import runs on a thread meanwhile
(``preimport.import_in_background``).
"""

from __future__ import annotations

import csv
import difflib
import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from oistream import sources
from oistream.errors import OistreamError
from oistream.sharding.textfiles import _Missing, _read_text


@dataclass(frozen=True)
class OIClass:
    mid: str  # "/m/01g317"
    name: str  # "Person"


def load_classes(
    metadata_root: str, options: dict | None = None, cat: Callable[[str], bytes] | None = None
) -> list[OIClass]:
    """The segmentable classes, in the order of ``classes-segmentation.txt``, with display names.

    Names come from V7's ``oidv7-class-descriptions-boxable.csv`` (with header) or, when that file
    does not exist, from V5's ``class-descriptions-boxable.csv`` (no header). ``cat(url)`` reads
    a whole file instead of fsspec's ``cat_file`` (the metadata cache passes its own).
    """
    segmentable_url = sources.segmentable_classes_url(metadata_root)
    # The two lists are independent: the descriptions are read beside the segmentable list, so
    # their round trips (a HEAD and a GET each) overlap instead of following one another.
    with ThreadPoolExecutor(max_workers=1) as pool:
        descriptions = pool.submit(_read_descriptions, metadata_root, options, cat)
        text = _read_text(segmentable_url, options, cat=cat)
        names = _parse_descriptions(descriptions.result())
    mids = list(dict.fromkeys(line.strip() for line in text.splitlines()))
    mids = [mid for mid in mids if mid]
    # A segmentable MID without a description would be a broken metadata root; keep it usable by
    # its MID rather than dropping a class the masks contain.
    return [OIClass(mid, names.get(mid, mid)) for mid in mids]


def _read_descriptions(
    metadata_root: str, options: dict | None, cat: Callable[[str], bytes] | None
) -> str:
    """V7's class descriptions, or V5's where V7's file does not exist."""
    v7_url = sources.class_descriptions_url(metadata_root)
    v5_url = sources.v5_class_descriptions_url(metadata_root)
    try:
        return _read_text(v7_url, options, missing_ok=True, cat=cat)
    except _Missing:
        try:
            return _read_text(v5_url, options, missing_ok=True, cat=cat)
        except _Missing:
            raise OistreamError(
                f"class descriptions not found: neither {v7_url} nor {v5_url}"
            ) from None


def _parse_descriptions(text: str) -> dict[str, str]:
    """MID -> display name; the ``LabelName,DisplayName`` header line (V7) is optional (V5)."""
    names: dict[str, str] = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 2 or row[:2] == ["LabelName", "DisplayName"]:
            continue
        names.setdefault(row[0].strip(), row[1].strip())
    return names


def search_classes(query: str | None, classes: list[OIClass]) -> list[OIClass]:
    """Classes whose name or MID contains ``query``, case-insensitively; all of them for None."""
    if not query or not query.strip():
        return list(classes)
    needle = query.strip().casefold()
    return [c for c in classes if needle in c.name.casefold() or needle in c.mid.casefold()]


def resolve_classes(queries: Sequence[str], classes: list[OIClass]) -> list[OIClass]:
    """Each query as a display name (case-insensitive) or a MID, in the order given, no repeats."""
    by_mid = {c.mid.casefold(): c for c in classes}
    by_name: dict[str, list[OIClass]] = {}
    for c in classes:
        by_name.setdefault(c.name.casefold(), []).append(c)

    resolved: dict[str, OIClass] = {}
    unknown: list[str] = []
    for query in queries:
        key = query.strip().casefold()
        if key in by_mid:
            found = by_mid[key]
        elif len(by_name.get(key, [])) == 1:
            found = by_name[key][0]
        elif key in by_name:
            mids = ", ".join(c.mid for c in by_name[key])
            raise OistreamError(f"class name {query!r} is ambiguous ({mids}); give the MID")
        else:
            unknown.append(query)
            continue
        resolved.setdefault(found.mid, found)
    if unknown:  # every one of them at once, not one per attempt
        raise OistreamError("; ".join(unknown_class_message(q, classes) for q in unknown))
    return list(resolved.values())


def closest_names(query: str, classes: list[OIClass], n: int = 5) -> list[str]:
    """Display names closest to ``query`` (difflib), best first; used by `shard` and `classes`."""
    names = {c.name.casefold(): c.name for c in classes}
    close = difflib.get_close_matches(query.strip().casefold(), list(names), n=n, cutoff=0.5)
    return [names[c] for c in close]


def unknown_class_message(query: str, classes: list[OIClass]) -> str:
    close = closest_names(query, classes)
    if not close:
        return f"unknown class {query!r}; list the classes with `oistream classes [QUERY]`"
    return f"unknown class {query!r}; closest: {', '.join(close)}"
