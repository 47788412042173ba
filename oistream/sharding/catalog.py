"""The catalog: which segmentation rows belong to the selected classes (``classes``: which exist).

The train segmentation CSV has ~2.7M rows. Other tools read it whole with pandas before they
filter it. Here it is streamed in blocks of bytes, and numpy finds every line's field count and
LabelName straight from the bytes; only the lines of the selected classes are parsed, from the
same bytes, into ``Rows`` (named numpy columns; pandas is not imported). Rows of other classes
never become Python objects, memory stays O(block + kept rows), and with a few classes kept the
scan is about twice as fast as pandas parsing the whole file. Field counts are checked on every
line, so rows with too few fields are counted too (pandas' C parser would pad them silently);
kept rows are then validated column by column, vectorised where it pays.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from oistream import sources
from oistream.errors import OistreamError
from oistream.sharding.rows import Rows, group_positions, isin
from oistream.sharding.textfiles import MAX_ROW_BYTES, _read_line_blocks, cannot_read

COLUMNS = (
    "MaskPath",
    "ImageID",
    "LabelName",
    "BoxID",
    "BoxXMin",
    "BoxXMax",
    "BoxYMin",
    "BoxYMax",
    "PredictedIoU",
    "Clicks",
)
HEADER = ",".join(COLUMNS)
STRING_COLUMNS = ("MaskPath", "ImageID", "LabelName", "BoxID", "Clicks")
BOX_COLUMNS = ("BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax")

# The file is read in blocks of chunksize * this many bytes: 8 MiB by default, about 45k real
# rows (150-200 bytes each). Measured on 1M rows: as fast as 16 or 32 MiB blocks and lighter, as
# the numpy temporaries are a few times the block size.
_BLOCK_BYTES_PER_ROW = 32
_MAX_EXAMPLES = 5
# Lines read again after the scan share one ranged read when this close (a few lines of a
# block, or of one image); farther apart they are separate ranges, fetched concurrently, at
# most this many bytes at a time.
_SPAN_GAP = 64 * 2**10
_SPAN_BATCH_BYTES = 8 * 2**20
_NEWLINE, _CR, _COMMA = ord("\n"), ord("\r"), ord(",")
_IS_LOWER_HEX = np.zeros(256, dtype=bool)
_IS_LOWER_HEX[list(b"0123456789abcdef")] = True

# Every group is atomic and every quantifier possessive, so the engine never backtracks into
# what it matched: the check is linear in the field's length. The plain pattern this replaces
# took 10 s for an 81-byte field (four clicks and a stray character) and doubled per click.
_NUMBER = r"(?>[-+]?+(?:[0-9]++(?:\.[0-9]*+)?+|\.[0-9]++)(?:[eE][-+]?+[0-9]++)?+)"
_CLICK = rf"(?>{_NUMBER}[ \t]++{_NUMBER}[ \t]++[01])"
# One pattern serves both the vectorised check of kept rows and parse_clicks, so a row that
# passes validation always parses.
_CLICKS_PATTERN = rf"[ \t\r\n]*+(?:{_CLICK}(?>[ \t]*+;[ \t]*+{_CLICK})*+)?+[ \t\r\n]*+"
# Size caps, far above real data (rows are 150-400 bytes, Clicks 1-20 triples of ~20 bytes):
# a longer field or row (MAX_ROW_BYTES, textfiles) is malformed and counted, and never reaches
# a parser or the pattern.
MAX_FIELD_BYTES = {
    "Clicks": 4096,
    "PredictedIoU": 32,
    **dict.fromkeys(("BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax"), 32),
}
_CLICKS_RE = re.compile(_CLICKS_PATTERN)
# The published form of one click and its separator: 9 a digit, t the flag 0 or 1.
_TRIPLE = b"9.99999 9.99999 t;"
# Which byte may stand at each place of a triple, flattened: index place * 256 + byte.
_TRIPLE_ALLOWED = np.zeros((len(_TRIPLE), 256), dtype=bool)
for _place, _byte in enumerate(_TRIPLE):
    _TRIPLE_ALLOWED[
        _place, {ord("9"): list(b"0123456789"), ord("t"): list(b"01")}.get(_byte, [_byte])
    ] = True
_TRIPLE_ALLOWED = _TRIPLE_ALLOWED.ravel()
_TRIPLE_COLUMNS = np.arange(len(_TRIPLE), dtype=np.int32) * 256
_CLICKS_ROWS_PER_STEP = 512  # measured: 2.3 us a row here, the pattern 5.3


# ---------------------------------------------------------------------------------------------
# Segmentation rows


@dataclass
class SegmentationTable:
    # Only rows of the selected MIDs, in CSV order; columns exactly the CSV header. String columns
    # are str, box columns and PredictedIoU float64 (NaN where PredictedIoU is empty).
    rows: Rows
    total_rows: int  # data rows seen in the CSV (blank lines are not rows)
    malformed: int  # rows skipped: wrong field count anywhere, or invalid among the kept ones
    malformed_examples: list[str] = field(default_factory=list)  # "line N: why", up to 5
    duplicates: int = 0  # valid rows dropped because an earlier row has the same MaskPath


@dataclass(frozen=True)
class Selection:
    """What the plan will take (DESIGN section 4), so the catalog can keep only rows it can use.

    With ``per_class`` the plan takes per class the first N images in seeded hash order; with
    only ``max_images`` the first N of all images (of ``image_ids`` alone, when given). Neither
    limit: every row may be used.
    """

    per_class: int | None = None
    max_images: int | None = None
    seed: int = 0
    image_ids: Collection[str] | None = None  # only these images may be taken (--image-ids)


def hash_order_key(image_id: str, seed: int) -> bytes:
    """A seeded, version-proof hash: ID order is biased (prefix 0 first), hash order is not."""
    return hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()


def hash_order_keys(image_ids: Iterable[str], seed: int) -> np.ndarray:
    """``hash_order_key`` of each ID as uint64, ordered as the digests' bytes are."""
    return _hash_keys([i.encode() for i in image_ids], seed)


def _hash_keys(image_ids: Iterable[bytes], seed: int) -> np.ndarray:
    # A copy of a hash already fed the seed, not a new one per ID: 0.18 against 0.25 s for
    # 500k IDs (the constructor's keyword parsing), the bounded scan's largest single cost.
    seeded = hashlib.blake2b(f"{seed}:".encode(), digest_size=8)
    digests = b"".join(map(functools.partial(_digest_after, seeded.copy), image_ids))
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def _digest_after(copy: Callable[[], Any], image_id: bytes) -> bytes:
    hashed = copy()
    hashed.update(image_id)
    return hashed.digest()


def _hash_keys_of_rows(image_ids: np.ndarray, seed: int) -> np.ndarray:
    """``hash_order_key`` of each row's ImageID, given as fixed-width bytes (``S16``): hashed
    once per run of rows of one image (the published CSV keeps an image's rows together), not
    once per row. Runs, not ``np.unique``: 0.3 ms against 5.4 ms for 27k scattered IDs."""
    if not len(image_ids):
        return np.zeros(0, dtype=np.uint64)
    starts = np.ones(len(image_ids), dtype=bool)
    starts[1:] = image_ids[1:] != image_ids[:-1]
    return _hash_keys(image_ids[starts].tolist(), seed)[np.cumsum(starts) - 1]


def read_segmentations(
    csv_url: str,
    mids: Iterable[str],
    options: dict | None = None,
    chunksize: int = 250_000,
    opener: Callable[[], Any] | None = None,
    *,
    selection: Selection | None = None,
) -> SegmentationTable:
    """Stream a segmentation CSV and keep the valid rows whose LabelName is one of ``mids``.

    Lines with other than 10 fields are counted as malformed wherever they are (their class
    cannot be trusted); content is validated only on the rows of the selected classes.
    ``chunksize`` bounds the work per step: the file is read ``chunksize * 32`` bytes at a time.
    ``opener()`` opens the file instead of fsspec (the metadata cache passes its own); lines
    read again are read through fsspec, by ranges.
    With a ``selection`` that limits the images, only the rows of images the plan may take are
    kept (all their rows of the selected classes, so the plan is the one the whole table gives);
    memory then follows the selection, not how common its classes are. So does the work: a
    row's values are parsed and checked only while its own class can still take its image, or
    once the selection has taken it, so ``malformed`` counts bad identifiers and values among
    those rows (bad field counts among all rows).
    """
    mids = frozenset(mids)
    bound = None
    if selection is not None and (selection.per_class, selection.max_images) != (None, None):
        bound = _SelectionBound(selection, mids)
    block_bytes = max(1, chunksize) * _BLOCK_BYTES_PER_ROW
    blocks = _read_line_blocks(csv_url, options, block_bytes, opener)
    with contextlib.closing(blocks):
        table = _filter_rows(csv_url, blocks, mids, bound)
    if bound is not None:
        rows, malformed, examples = _bounded_rows(csv_url, options, mids, bound)
        table.malformed += malformed
        table.malformed_examples += examples[: _MAX_EXAMPLES - len(table.malformed_examples)]
        # Repeats share their image, so they change no selection; counted among these rows only.
        table.rows, table.duplicates = _drop_repeats(rows)
    return table


def _filter_rows(
    csv_url: str,
    blocks: Iterator[tuple[int, bytes | memoryview]],
    selected: frozenset[str],
    bound: _SelectionBound | None = None,
) -> SegmentationTable:
    header_line = bytes(next(blocks)[1])
    header = header_line.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")
    if header != HEADER:
        raise OistreamError(f"{csv_url}: unexpected header {header[:200]!r}; expected {HEADER!r}")
    scan = _BlockScan(selected)
    pending = None if bound is None else _PendingRows(scan, bound)

    frames: list[Rows] = []
    total_rows = malformed = 0
    examples: list[tuple[int, str]] = []  # (line number, reason): the first few in the file
    first_line_number = 2  # the header is line 1

    def note(rejected: list[tuple[int, str]], first: int) -> None:
        examples.extend((first + line, reason) for line, reason in rejected)
        examples[:] = sorted(examples)[:_MAX_EXAMPLES]

    for offset, block in blocks:  # offset: of the block in the file, to read lines again
        lines = _Lines(block)
        total_rows += lines.rows
        if pending is None:
            scanned = scan(lines)
            malformed += scanned.malformed
            if len(scanned.rows):
                frames.append(scanned.rows)
            note(scanned.rejected, first_line_number)
        else:
            for ranked in scan.rank(lines, pending.bound, pending.batch_lines):
                malformed += ranked.malformed
                note(ranked.rejected, first_line_number)
                pending.add(lines, ranked, offset, first_line_number)
        first_line_number += len(lines)
    if pending is not None:
        pending.flush()
        malformed += pending.malformed
        note(pending.rejected, 0)

    rows, duplicates = _drop_repeats(Rows.concat(frames) if frames else _empty_rows())
    return SegmentationTable(
        rows=rows,
        total_rows=total_rows,
        malformed=malformed,
        malformed_examples=[f"line {line}: {reason}" for line, reason in examples],
        duplicates=duplicates,
    )


def _drop_repeats(rows: Rows) -> tuple[Rows, int]:
    """A MaskPath names one instance (ImageID, class, BoxID): a repeat is the same instance
    again, never a second one. The first row wins; how many were dropped."""
    paths = rows["MaskPath"].tolist()
    if len(set(paths)) == len(paths):
        return rows, 0
    # Walked backwards, the last position stored for a path is its first.
    first = dict(zip(reversed(paths), range(len(paths) - 1, -1, -1), strict=True))
    keep = np.zeros(len(paths), dtype=bool)
    keep[list(first.values())] = True
    return rows.take(keep), len(paths) - len(first)


class _Scanned(NamedTuple):
    """What ``_BlockScan`` makes of one block of lines."""

    rows: Rows  # valid rows of the selected classes
    lines: np.ndarray  # their line numbers in the block
    malformed: int
    rejected: list[tuple[int, str]]  # (line, reason), the first few


class _Ranked(NamedTuple):
    """``_BlockScan.rank``: the lines of one block still to check, and those only placed."""

    lines: np.ndarray  # to check and parse
    labels: np.ndarray  # their LabelName, fixed-width bytes
    keys: np.ndarray  # their images' order keys
    deferred_lines: np.ndarray  # rank, but past their own class's threshold (see rank)
    deferred_keys: np.ndarray
    malformed: int  # lines of the wrong shape
    rejected: list[tuple[int, str]]


class _BlockScan:
    """Field counts, selection by label and validation of one block of lines."""

    def __init__(self, selected: frozenset[str]) -> None:
        # Fixed-width byte strings one longer than the longest MID: a longer label cannot match.
        self.label_width = max((len(m.encode()) for m in selected), default=0) + 1
        self.wanted_labels = np.array(
            sorted(m.encode() for m in selected), dtype=f"S{self.label_width}"
        )

    def __call__(self, lines: _Lines) -> _Scanned:
        """Valid rows of the selected classes, their line numbers, malformed count and
        reasons."""
        malformed, rejected, candidates, labels = self._shape_and_labels(lines)
        return self.check(lines, candidates, labels, malformed, rejected)

    def _shape_and_labels(
        self, lines: _Lines
    ) -> tuple[int, list[tuple[int, str]], np.ndarray, np.ndarray]:
        """Lines of the wrong shape (count, first few reasons), then the well-formed lines of
        the selected classes and their labels."""
        wrong = lines.wrong_shape()
        rejected = [(int(i), lines.shape_problem(int(i))) for i in wrong[:_MAX_EXAMPLES]]
        candidates, labels = lines.select(self.wanted_labels, self.label_width)
        return len(wrong), rejected, candidates, labels

    def rank(self, lines: _Lines, bound: _SelectionBound, step: int) -> Iterator[_Ranked]:
        """With a selection ``bound``: the lines worth checking, without checking them, in
        slices of at most ``step`` candidate lines (the first slice carries the block's
        malformed count and reasons).

        Rows whose image ranks past the bound's ceiling are dropped before anything but their
        field count is checked: no selection can take them (the ceiling only falls), so the
        work follows the selection. The key is hashed from the ImageID's bytes as they stand;
        a row that ranks is then checked whole, one that does not is never counted as
        malformed. Of the rows that rank, those past their own class's threshold are only
        placed (``_SelectionBound.defer``) and checked if read again: the ceiling is the rarest
        class's threshold, which falls slowest. On a 2.69M-row CSV whose selected classes hold
        half the rows, --per-class 1000: 19.9 s of CPU with every candidate row parsed, 10.0 s
        with values skipped, 7.5 s with identifiers skipped as well, 7.0-7.3 s with rows
        deferred, 5.2 s checked in batches too (``_PendingRows``; pandas' read 12.4 s then).

        Each slice is ranked against the bound as the slices before it left it (the caller
        offers them in between): ranked as one, the first 8 MiB block of the shard benchmark's
        CSV had all of its 30,581 candidate rows parsed, because no class had its N yet; in
        slices, the bound is set after the first and the rest of the block is mostly skipped.
        """
        malformed, rejected, candidates, labels = self._shape_and_labels(lines)
        image_ids = np.ascontiguousarray(lines.fixed_width(candidates, 1, 16)[0])
        keys = _hash_keys_of_rows(image_ids.view("S16").ravel(), bound.seed)
        for first in range(0, max(1, len(candidates)), max(1, step)):
            part = slice(first, first + step)
            yield self._rank_slice(
                candidates[part], labels[part], keys[part], bound, malformed, rejected
            )
            malformed, rejected = 0, []

    @staticmethod
    def _rank_slice(
        candidates: np.ndarray,
        labels: np.ndarray,
        keys: np.ndarray,
        bound: _SelectionBound,
        malformed: int,
        rejected: list[tuple[int, str]],
    ) -> _Ranked:
        ceiling = bound.ceiling()
        rankable = keys <= ceiling if ceiling is not None else np.zeros(len(keys), bool)
        candidates, labels, keys = candidates[rankable], labels[rankable], keys[rankable]
        parse = bound.may_take(labels, keys)
        return _Ranked(
            candidates[parse],
            labels[parse],
            keys[parse],
            candidates[~parse],
            keys[~parse],
            malformed,
            rejected,
        )

    def check(
        self,
        lines: _Lines,
        candidates: np.ndarray,
        labels: np.ndarray,
        malformed: int = 0,
        rejected: list[tuple[int, str]] | None = None,
    ) -> _Scanned:
        """Identifiers, sizes and values of ``candidates`` (lines of selected labels, of ten
        fields): the valid ones parsed, the rest counted and the first few explained."""
        rejected = list(rejected or [])
        identifiers = _identifier_fields(lines, candidates, labels)
        checks = _identifier_checks(lines, identifiers, labels) + _size_checks(lines, candidates)
        invalid, why = _rejections(candidates, checks)
        malformed += int(invalid.sum())
        rejected += why
        survivors = np.flatnonzero(~invalid)  # into the identifiers gathered before the cut
        candidates, labels = candidates[survivors], labels[survivors]
        if not len(candidates):
            return _Scanned(_empty_rows(), candidates, malformed, rejected)
        numbers, clicks, checks = _parse_and_check_values(lines, candidates)
        invalid, why = _rejections(candidates, checks)
        malformed += int(invalid.sum())
        rejected += why
        valid = ~invalid
        numbers = {column: values[valid] for column, values in numbers.items()}
        kept = survivors[valid]
        fields = {column: gathered[kept] for column, (gathered, _) in identifiers.items()}
        rows = _rows_of(fields, labels[valid], numbers, clicks[valid])
        return _Scanned(rows, candidates[valid], malformed, rejected)


class _PendingRows:
    """Ranked lines of several blocks, checked and offered to the bound together.

    Once every class holds its N, a block keeps a few hundred lines to check, and pandas'
    read_csv costs ~3.5 ms a call whatever it reads: 104 calls were ~0.4 s of the 7 s a 2.69M-row
    CSV took at 50%. The bound sees the rows a batch late; it only ever tightens, so a late
    offer costs a few more rows checked, never a different selection.
    """

    # Lines gathered before they are checked: ~1 MB of CSV.
    _BATCH_LINES = 4096

    def __init__(self, scan: _BlockScan, bound: _SelectionBound) -> None:
        self.scan, self.bound = scan, bound
        self.batch_lines = self._BATCH_LINES
        self.malformed = 0
        self.rejected: list[tuple[int, str]] = []  # (line number in the file, reason)
        self._parts: list[bytes] = []
        self._places: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._count = 0

    def add(self, lines: _Lines, ranked: _Ranked, offset: int, first_line_number: int) -> None:
        """One block's ranked lines (``offset``: the block's in the file; ``first_line_number``:
        its first line's number); its deferred lines go to the bound at once."""
        deferred = ranked.deferred_lines
        self.bound.defer(
            offset + lines.starts[deferred], offset + lines.ends[deferred], ranked.deferred_keys
        )
        chosen = ranked.lines
        if len(chosen):
            self._parts.append(lines.take(chosen))
            self._places.append(
                (
                    offset + lines.starts[chosen],
                    offset + lines.ends[chosen],
                    ranked.keys,
                    first_line_number + chosen,
                )
            )
            self._count += len(chosen)
        if self._count >= self.batch_lines:
            self.flush()

    def flush(self) -> None:
        """Check the gathered lines as one block and offer the valid rows to the bound."""
        if not self._count:
            return
        batch = _Lines(b"".join(self._parts))
        starts, stops, keys, numbers = (np.concatenate(c) for c in zip(*self._places, strict=True))
        self._parts, self._places, self._count = [], [], 0
        candidates, labels = batch.select(self.scan.wanted_labels, self.scan.label_width)
        if len(candidates) != len(keys):  # the same bytes, selected again: a bug, not data
            raise RuntimeError(f"{len(candidates)} lines selected again from {len(keys)} taken")
        scanned = self.scan.check(batch, candidates, labels)
        self.malformed += scanned.malformed
        found = [(int(numbers[line]), reason) for line, reason in scanned.rejected]
        self.rejected = sorted(self.rejected + found)[:_MAX_EXAMPLES]
        valid = scanned.lines
        self.bound.offer(scanned.rows, starts[valid], stops[valid], keys[valid])


class _SelectionBound:
    """While the CSV streams, keeps only the rows of images the plan may still select.

    Per class (or, with only ``max_images``, over all classes) it holds the keys of the N
    best-ranked images seen so far; N smallest of a stream, so a class's threshold only falls.
    A row is kept while its image is among the best of some class. A row whose image is not (yet)
    may still be needed: a later row can show the image carries another class that ranks it in
    its N. Such rows cost 32 bytes each (key, the line's place in the file, whether the line was
    checked) instead of a row, and the few that turn out needed are read again at the end. A
    row ranked past every class's threshold can never be needed and is forgotten.
    """

    # Helper columns, dropped before the table is used: the image's key, its line's place.
    _KEY, _START, _STOP = "_order_key", "_line_start", "_line_stop"
    # Rows beyond twice what survived the last pruning, plus this, trigger the next one.
    _PRUNE_SLACK = 65_536

    def __init__(self, selection: Selection, mids: frozenset[str]) -> None:
        self.seed = selection.seed
        self.image_ids = selection.image_ids
        self.per_class = selection.per_class is not None
        limit = selection.per_class if self.per_class else selection.max_images
        self.limit = max(0, int(limit or 0))
        self.groups = sorted(mids) if self.per_class else [""]
        self.best: dict[str, np.ndarray] = {}
        self._chosen_keys: np.ndarray | None = None
        self.kept: list[Rows] = []
        self.kept_rows = self.rows_after_prune = 0
        # (key, start, stop, checked) of lines not kept, as uint64 rows; checked is 0 for lines
        # deferred unparsed (``defer``), 1 for lines that were valid rows.
        self.spare: list[np.ndarray] = []
        self.spare_rows = self.spare_after_prune = 0

    def offer(self, rows: Rows, starts: np.ndarray, stops: np.ndarray, keys: np.ndarray) -> None:
        """Valid rows of one block in CSV order, with the file offsets of their lines and their
        images' order keys (``_BlockScan`` hashed them to rank the rows before parsing)."""
        if self.image_ids is not None and len(rows):
            wanted = isin(rows["ImageID"], self.image_ids)
            rows, starts, stops, keys = (
                rows.take(wanted),
                starts[wanted],
                stops[wanted],
                keys[wanted],
            )
        if not len(rows):
            return
        if self.per_class:
            labels = rows["LabelName"]
            for label in set(labels.tolist()):
                self._rank(label, keys[labels == label])
        else:
            self._rank("", keys)
        chosen = self._chosen()
        inside = np.isin(keys, chosen)
        place = {self._KEY: keys, self._START: starts.astype(np.int64), self._STOP: stops}
        self.kept.append(rows.with_columns(**place).take(inside))
        self.kept_rows += int(inside.sum())
        self._keep_spare(_places(keys[~inside], starts[~inside], stops[~inside], checked=True))
        if self.kept_rows > 2 * self.rows_after_prune + self._PRUNE_SLACK:
            self._prune_kept(chosen)
        if self.spare_rows > 2 * self.spare_after_prune + self._PRUNE_SLACK:
            self._prune_spare()

    def defer(self, starts: np.ndarray, stops: np.ndarray, keys: np.ndarray) -> None:
        """Lines of one block left unparsed (``may_take`` said no): kept as places only."""
        self._keep_spare(_places(keys, starts, stops, checked=False))

    def may_take(self, labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Per row (its label as fixed-width bytes, its key): whether its own class can still
        rank its image, or another class has already taken it."""
        names = np.array([g.encode() for g in self.groups], dtype=labels.dtype)
        order = np.argsort(names)
        thresholds = np.array([self._threshold(g) for g in self.groups], dtype=np.uint64)
        if self.per_class:
            own = thresholds[order][np.searchsorted(names[order], labels)]
        else:
            own = np.full(len(keys), thresholds[0], dtype=np.uint64)
        return (keys <= own) | np.isin(keys, self._chosen())

    def finish(self) -> tuple[Rows | None, np.ndarray]:
        """The kept rows of the chosen images (CSV columns and the line's start), and the places
        (key, start, stop, checked) of lines to read again."""
        chosen = self._chosen()
        kept = Rows.concat(self.kept) if self.kept else None
        if kept is not None:
            kept = kept.take(np.isin(kept[self._KEY], chosen)).select((*COLUMNS, self._START))
        spare = np.concatenate(self.spare) if self.spare else np.zeros((0, 4), dtype=np.uint64)
        needed = spare[np.isin(spare[:, 0], chosen)]
        return kept, needed

    def _rank(self, group: str, keys: np.ndarray) -> None:
        best = self.best.get(group)
        if self.limit == 0:
            return
        if best is not None and len(best) >= self.limit:
            keys = keys[keys < best[-1]]
            if not len(keys):  # the usual case once the class is full: nothing changes
                return
        merged = np.union1d(best, keys) if best is not None else np.unique(keys)
        self.best[group] = merged[: self.limit]
        self._chosen_keys = None

    def _threshold(self, group: str) -> np.uint64:
        """The worst key ``group`` still takes: its N-th best, or any while it has fewer."""
        best = self.best.get(group)
        if best is None or len(best) < self.limit:
            return np.uint64(np.iinfo(np.uint64).max)
        return best[-1]

    def _chosen(self) -> np.ndarray:
        """The keys some class takes, sorted; kept until a class's best change (``_rank``)."""
        if self._chosen_keys is None:
            best = [np.zeros(0, dtype=np.uint64), *self.best.values()]
            self._chosen_keys = np.unique(np.concatenate(best))
        return self._chosen_keys

    def ceiling(self) -> np.uint64 | None:
        """Past this key no image can be selected any more; None: none can be at all."""
        if self.limit == 0:
            return None
        return max(self._threshold(g) for g in self.groups)

    def _keep_spare(self, spare: np.ndarray) -> None:
        ceiling = self.ceiling()
        if ceiling is None or not len(spare):
            return
        spare = spare[spare[:, 0] <= ceiling]
        if len(spare):
            self.spare.append(spare)
            self.spare_rows += len(spare)

    def _prune_kept(self, chosen: np.ndarray) -> None:
        kept = Rows.concat(self.kept)
        inside = np.isin(kept[self._KEY], chosen)
        left = kept.take(~inside)
        self._keep_spare(
            _places(left[self._KEY], left[self._START], left[self._STOP], checked=True)
        )
        self.kept = [kept.take(inside)]
        self.kept_rows = self.rows_after_prune = len(self.kept[0])

    def _prune_spare(self) -> None:
        ceiling = self.ceiling()
        spare = np.concatenate(self.spare)
        self.spare = [spare[spare[:, 0] <= ceiling]] if ceiling is not None else []
        self.spare_rows = self.spare_after_prune = sum(len(x) for x in self.spare)


def _places(keys: np.ndarray, starts: np.ndarray, stops: np.ndarray, checked: bool) -> np.ndarray:
    """Rows ``(key, start, stop, checked)`` as uint64, column by column: stacking uint64 keys
    with int64 offsets would promote to float64."""
    places = np.empty((len(keys), 4), dtype=np.uint64)
    for column, values in enumerate((keys, starts, stops)):
        places[:, column] = values
    places[:, 3] = checked
    return places


def _bounded_rows(
    csv_url: str, options: dict | None, selected: frozenset[str], bound: _SelectionBound
) -> tuple[Rows, int, list[str]]:
    """The chosen images' rows in CSV order: those kept, and those read again from the file;
    with the malformed rows found among the lines read again that had been left unchecked."""
    kept, needed = bound.finish()
    parts = [] if kept is None else [kept]
    malformed, examples = 0, []
    if len(needed):
        starts, stops = needed[:, 1].astype(np.int64), needed[:, 2].astype(np.int64)
        scanned = _BlockScan(selected)(_Lines(_read_spans(csv_url, options, starts, stops)))
        again, valid = scanned.rows, scanned.lines
        keys = hash_order_keys(again["ImageID"].tolist(), bound.seed)
        # A line checked on the first pass is valid again, a deferred one may not be; its key
        # is the same either way (both hashed its bytes): anything else means the file changed.
        bad = np.ones(len(needed), dtype=bool)
        bad[valid] = False
        if (bad & (needed[:, 3] == 1)).any() or not np.array_equal(keys, needed[valid, 0]):
            raise OistreamError(f"{csv_url} changed while it was read; run again")
        malformed = scanned.malformed
        for line, reason in sorted(scanned.rejected)[:_MAX_EXAMPLES]:
            examples.append(f"at byte {starts[line]}: {reason}")
        parts.append(again.with_columns(**{bound._START: starts[valid]}))
    if not parts:
        return _empty_rows(), malformed, examples
    rows = Rows.concat(parts)
    rows = rows.take(np.argsort(rows[bound._START], kind="stable"))
    return rows.select(COLUMNS), malformed, examples


def _read_spans(url: str, options: dict | None, starts: np.ndarray, stops: np.ndarray) -> bytes:
    """The file's bytes at each (start, stop) in the order given, each followed by a newline.

    Nearby spans share one ranged read, so a remote CSV costs a few requests, not one per line.
    """
    order = np.argsort(starts, kind="stable")
    starts, stops = starts[order], stops[order]
    first = np.concatenate(([0], np.flatnonzero(starts[1:] - stops[:-1] > _SPAN_GAP) + 1))
    last = np.concatenate((first[1:], [len(starts)])) - 1
    range_starts, range_stops = starts[first].tolist(), stops[last].tolist()
    pieces = [b""] * len(starts)
    try:
        fs, path = sources.filesystem(url, options)
    except Exception as error:
        raise cannot_read(url, error) from error
    batch_start = 0
    while batch_start < len(first):  # a few MiB per batch of ranges: memory stays bounded
        sizes = np.cumsum(np.subtract(range_stops[batch_start:], range_starts[batch_start:]))
        batch_stop = batch_start + max(1, int(np.searchsorted(sizes, _SPAN_BATCH_BYTES)))
        batch = range(batch_start, batch_stop)
        try:
            blobs = fs.cat_ranges(
                [path] * len(batch),
                range_starts[batch_start:batch_stop],
                range_stops[batch_start:batch_stop],
                on_error="raise",
            )
        except Exception as error:
            raise cannot_read(url, error) from error
        for r, blob in zip(batch, blobs, strict=True):
            lo, hi = range_starts[r], range_stops[r]
            if not isinstance(blob, bytes) or len(blob) != hi - lo:  # a server that ignored Range
                raise OistreamError(f"{url} changed while it was read; run again")
            for k in range(first[r], last[r] + 1):
                pieces[order[k]] = blob[starts[k] - lo : stops[k] - lo]
        batch_start = batch_stop
    return b"".join(piece + b"\n" for piece in pieces)


class _Lines:
    """A block of complete newline-terminated lines seen through numpy, never split in Python.

    Line bounds, comma positions and field counts are computed once per block; fields of chosen
    lines are then gathered as fixed-width byte arrays so that checks run vectorised.
    """

    def __init__(self, block: bytes | memoryview) -> None:
        self.block = block
        self.data = np.frombuffer(block, dtype=np.uint8)
        self.ends = np.flatnonzero(self.data == _NEWLINE)
        self.starts = np.concatenate(([0], self.ends[:-1] + 1))
        self.commas = np.flatnonzero(self.data == _COMMA)
        self.first_comma = np.searchsorted(self.commas, self.starts)
        self.field_counts = np.searchsorted(self.commas, self.ends) - self.first_comma + 1
        lengths = self.ends - self.starts
        self.blank = (lengths == 0) | ((lengths == 1) & (self.data[self.ends - 1] == _CR))
        self.overlong = lengths > MAX_ROW_BYTES

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def rows(self) -> int:
        return int(len(self.ends) - self.blank.sum())

    def wrong_shape(self) -> np.ndarray:
        """Lines that are too long or do not hold exactly 10 fields (blank lines are neither)."""
        return np.flatnonzero(((self.field_counts != len(COLUMNS)) | self.overlong) & ~self.blank)

    def shape_problem(self, line: int) -> str:
        if self.overlong[line]:
            return f"row longer than {MAX_ROW_BYTES} bytes"
        return f"{self.field_counts[line]} fields, expected {len(COLUMNS)}"

    def field_bounds(self, lines: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Start and stop offsets of field ``k`` of ``lines`` (which must have all 10 fields)."""
        start = self.starts[lines] if k == 0 else self.commas[self.first_comma[lines] + k - 1] + 1
        last = k == len(COLUMNS) - 1
        stop = self.ends[lines] if last else self.commas[self.first_comma[lines] + k]
        return start, stop

    def fixed_width(self, lines: np.ndarray, k: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Field ``k`` of ``lines`` as an (n, width) uint8 array, zero past its end; and lengths."""
        start, stop = self.field_bounds(lines, k)
        data = self.data
        if len(start) and int(start.max()) + width > len(data):  # only near the block's end
            data = np.concatenate((data, np.zeros(width, dtype=np.uint8)))
        # Rows of a window view, not an (n, width) index array: 1.0 against 5.8 ms for 27k
        # 40-byte fields of an 8 MiB block.
        values = sliding_window_view(data, max(width, 1))[start, :width]
        # Multiplying by the mask, not assigning through it: 13% less time for the two fields
        # the bounded scan cuts (64 MiB of CSV, 0.092 -> 0.080 s).
        values *= np.arange(width) < (stop - start)[:, None]
        return values, stop - start

    def select(self, wanted_labels: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Well-formed lines whose LabelName is one of ``wanted_labels``, and their labels."""
        candidates = np.flatnonzero((self.field_counts == len(COLUMNS)) & ~self.overlong)
        if not len(wanted_labels) or not len(candidates):
            return candidates[:0], wanted_labels[:0]
        values, lengths = self.fixed_width(candidates, 2, width)
        labels = np.ascontiguousarray(values).view(f"S{width}").ravel()
        # A NUL byte inside a label would hide behind numpy's stripping of trailing NULs.
        keep = np.isin(labels, wanted_labels) & (np.char.str_len(labels) == lengths)
        return candidates[keep], labels[keep]

    def text(self, line: int, first: int, last: int | None = None) -> str:
        """Fields ``first``..``last`` of one line as written, for messages."""
        start = self.field_bounds(np.array([line]), first)[0][0]
        stop = self.field_bounds(np.array([line]), first if last is None else last)[1][0]
        return bytes(self.data[start:stop]).decode("utf-8", errors="replace").rstrip("\r")

    def take(self, lines: np.ndarray) -> bytes:
        """The bytes of ``lines``, newlines included, in order (as ``lines`` are sorted).

        Slices joined, not a mask repeated over the block: that cost ~10 ms per 8 MiB block
        whatever the number of lines, and once the selection is bound a block keeps ~200.
        """
        block = self.block
        ends = (self.ends[lines] + 1).tolist()
        starts = self.starts[lines].tolist()
        return b"".join([block[a:b] for a, b in zip(starts, ends, strict=True)])


_Check = tuple[np.ndarray, Callable[[int], str]]  # (failed per candidate, line -> reason)


def _rejections(
    lines: np.ndarray, checks: list[_Check]
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Which candidates fail any check, and (line, reason) of the first few: their first failure."""
    invalid = np.zeros(len(lines), dtype=bool)
    for failed, _ in checks:
        invalid |= failed
    examples = []
    for position in np.flatnonzero(invalid)[:_MAX_EXAMPLES].tolist():
        line = int(lines[position])
        describe = next(describe for failed, describe in checks if failed[position])
        examples.append((line, describe(line)))
    return invalid, examples


def _identifier_fields(
    lines: _Lines, candidates: np.ndarray, labels: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MaskPath, ImageID and BoxID of ``candidates`` as ``fixed_width`` gives them (values,
    lengths): checked by ``_identifier_checks``, then decoded by ``_rows_of``."""
    mask_path_width = 16 + 1 + labels.dtype.itemsize + 1 + 8 + len(".png")
    return {
        "MaskPath": lines.fixed_width(candidates, 0, mask_path_width),
        "ImageID": lines.fixed_width(candidates, 1, 16),
        "BoxID": lines.fixed_width(candidates, 3, 8),
    }


def _identifier_checks(
    lines: _Lines, identifiers: dict[str, tuple[np.ndarray, np.ndarray]], labels: np.ndarray
) -> list[_Check]:
    """ImageID and BoxID lowercase hex of the right length; MaskPath built from them, on bytes."""
    image_ids, image_id_lengths = identifiers["ImageID"]
    box_ids, box_id_lengths = identifiers["BoxID"]
    mask_paths, mask_path_lengths = identifiers["MaskPath"]
    mask_path_ok = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):  # one pass per selected class, each vectorised
        rows = labels == label
        n = int(rows.sum())
        expected = np.hstack(
            [
                image_ids[rows],
                _repeated(b"_" + label.replace(b"/", b"") + b"_", n),
                box_ids[rows],
                _repeated(b".png", n),
            ]
        )
        width = expected.shape[1]
        mask_path_ok[rows] = (mask_path_lengths[rows] == width) & np.all(
            mask_paths[rows, :width] == expected, axis=1
        )
    image_id_ok = (image_id_lengths == 16) & _IS_LOWER_HEX[image_ids].all(axis=1)
    box_id_ok = (box_id_lengths == 8) & _IS_LOWER_HEX[box_ids].all(axis=1)
    return [
        (~image_id_ok, lambda i: f"ImageID {lines.text(i, 1)[:40]!r} is not 16 lowercase hex"),
        (~box_id_ok, lambda i: f"BoxID {lines.text(i, 3)[:40]!r} is not 8 lowercase hex"),
        (
            ~mask_path_ok,
            lambda i: f"MaskPath {lines.text(i, 0)[:60]!r} is not ImageID_LabelName_BoxID.png",
        ),
    ]


def _size_checks(lines: _Lines, candidates: np.ndarray) -> list[_Check]:
    """Value fields within MAX_FIELD_BYTES, so an oversized field is never parsed."""
    checks: list[_Check] = []
    for column, cap in MAX_FIELD_BYTES.items():
        k = COLUMNS.index(column)
        start, stop = lines.field_bounds(candidates, k)

        def describe(i: int, column: str = column, cap: int = cap) -> str:
            return f"{column} longer than {cap} bytes"

        checks.append((stop - start > cap, describe))
    return checks


def _repeated(constant: bytes, n: int) -> np.ndarray:
    return np.broadcast_to(np.frombuffer(constant, dtype=np.uint8), (n, len(constant)))


def _published_clicks(lines: _Lines, candidates: np.ndarray) -> np.ndarray:
    """Which Clicks fields are in the published form: ``d.ddddd d.ddddd t`` triples joined by ``;``.

    That form is a subset of what the clicks pattern accepts, so a row passing here is valid;
    a row failing here may still be valid and is left to the pattern. A field in that form, with
    a ``;`` put after it, is whole 18-byte triples: the fields' bytes end to end are then checked
    as one (triples, 18) array against a table of the bytes allowed at each place.
    """
    start, stop = lines.field_bounds(candidates, len(COLUMNS) - 1)
    lengths = stop - start
    ok = (lengths % len(_TRIPLE) == len(_TRIPLE) - 1) & (lengths > 0)
    for first in range(0, len(candidates), _CLICKS_ROWS_PER_STEP):  # bounds the temporaries
        rows = np.flatnonzero(ok[first : first + _CLICKS_ROWS_PER_STEP]) + first
        if not len(rows):
            continue
        with_separator = lengths[rows] + 1  # the byte after a field (its line's end) becomes ";"
        offsets = np.concatenate(([0], np.cumsum(with_separator)))
        places = np.repeat(start[rows] - offsets[:-1], with_separator) + np.arange(offsets[-1])
        values = lines.data[np.minimum(places, len(lines.data) - 1)]
        values[offsets[1:] - 1] = ord(";")
        triples = values.reshape(-1, len(_TRIPLE))
        triple_ok = _TRIPLE_ALLOWED[_TRIPLE_COLUMNS + triples].all(axis=1)
        ok[rows] = np.logical_and.reduceat(triple_ok, offsets[:-1] // len(_TRIPLE))
    return ok


def _parse_and_check_values(
    lines: _Lines, candidates: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray, list[_Check]]:
    """The number columns (float64) and Clicks (str) of the candidate lines; checks of boxes,
    PredictedIoU and Clicks."""
    numbers, is_number, blank = {}, {}, {}
    for column in (*BOX_COLUMNS, "PredictedIoU"):
        numbers[column], is_number[column], blank[column] = _parse_numbers(
            lines, candidates, COLUMNS.index(column)
        )
    box = {c: numbers[c] for c in BOX_COLUMNS}
    box_finite = np.logical_and.reduce([is_number[c] & np.isfinite(box[c]) for c in BOX_COLUMNS])
    with np.errstate(invalid="ignore"):
        box_in_order = (
            (box["BoxXMin"] >= 0)
            & (box["BoxXMin"] <= box["BoxXMax"])
            & (box["BoxXMax"] <= 1)
            & (box["BoxYMin"] >= 0)
            & (box["BoxYMin"] <= box["BoxYMax"])
            & (box["BoxYMax"] <= 1)
        )
    iou = numbers["PredictedIoU"]
    iou_number = is_number["PredictedIoU"] & np.isfinite(iou)
    iou_unparsable = ~iou_number & ~blank["PredictedIoU"]
    numbers["PredictedIoU"] = np.where(iou_number, iou, np.nan)  # blank: missing
    clicks = _field_texts(lines, candidates, COLUMNS.index("Clicks"))
    # The regex costs ~9 us a row; rows in the published form pass a vectorised test instead.
    clicks_ok = _published_clicks(lines, candidates)
    if not clicks_ok.all():
        rest = clicks[~clicks_ok]
        clicks_ok[~clicks_ok] = [_CLICKS_RE.fullmatch(value) is not None for value in rest]
    start, stop = lines.field_bounds(candidates, COLUMNS.index("Clicks"))
    carriage_returns = np.flatnonzero((stop > start) & (lines.data[stop - 1] == _CR))
    if len(carriage_returns):  # CRLF line ends leave "\r" on the last field
        clicks[carriage_returns] = [clicks[i].rstrip("\r") for i in carriage_returns.tolist()]
    return (
        numbers,
        clicks,
        [
            (~box_finite, lambda i: f"box {lines.text(i, 4, 7)[:60]!r} is not four numbers"),
            (
                ~box_in_order,
                lambda i: f"box {lines.text(i, 4, 7)[:60]!r} is not in [0, 1], min<=max",
            ),
            (iou_unparsable, lambda i: f"PredictedIoU {lines.text(i, 8)[:40]!r} is not a number"),
            (
                ~clicks_ok,
                lambda i: f"Clicks {lines.text(i, 9)[:40]!r} are not 'x y t;...' triples",
            ),
        ],
    )


# At most this many digits make a plain decimal computed exactly in float64: 10**15 < 2**53.
_PLAIN_DIGITS = 15


def _parse_numbers(
    lines: _Lines, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Field ``k`` of each candidate as a float64 as Python's ``float()`` reads its ASCII text
    (NaN where it is none); whether it is a number; whether it is blank (empty or whitespace).

    Plain decimals (a sign, up to 15 digits, a point: every value the real files hold) are
    computed vectorised, as the integer of their digits over a power of ten: both exact in
    float64, so the one IEEE division rounds correctly, as ``float()`` does. The rest (exponents,
    blanks, ``inf``, garbage) go to ``float()`` one by one. The size checks cap the field at
    ``MAX_FIELD_BYTES``; it is gathered as wide as its longest value, and the digits are summed
    one byte column at a time: with (rows, 32) temporaries this parse took 0.5 of the 1.3 s an
    unbounded read of the shard benchmark's CSV (246,749 rows kept) cost.
    """
    start, stop = lines.field_bounds(candidates, k)
    width = min(int((stop - start).max()), MAX_FIELD_BYTES[COLUMNS[k]]) if len(start) else 0
    if width == 0:
        return np.full(len(start), np.nan), np.zeros(len(start), bool), stop == start
    raw, lengths = lines.fixed_width(candidates, k, width)
    integer = np.zeros(len(lengths))  # the digits as one integer, exact below 2**53
    digits = np.zeros(len(lengths), dtype=np.int64)
    decimals = np.zeros(len(lengths), dtype=np.int64)  # digits after the point
    points = np.zeros(len(lengths), dtype=np.int64)
    for column in raw.T:  # bytes past a field's end are 0: neither digit nor point
        digit = (column >= ord("0")) & (column <= ord("9"))
        integer = np.where(digit, integer * 10 + (column - ord("0")), integer)
        digits += digit
        decimals += digit & (points > 0)
        points += column == ord(".")
    negative = raw[:, 0] == ord("-")
    signed = negative | (raw[:, 0] == ord("+"))
    plain = (
        (digits >= 1)
        & (digits <= _PLAIN_DIGITS)
        & (points <= 1)
        & (digits + points + signed == lengths)
    )
    values = np.where(plain, integer / 10.0**decimals, np.nan)
    values[plain & negative] *= -1
    is_number, blank = plain.copy(), lengths == 0
    rest = np.flatnonzero(~plain & ~blank)
    texts = np.ascontiguousarray(raw[rest]).view(f"S{width}").ravel().tolist()
    for row, text in zip(rest.tolist(), texts, strict=True):
        if len(text) != lengths[row]:  # it held a NUL byte, which the view cut off
            continue
        try:
            string = text.decode("ascii")
        except UnicodeDecodeError:
            continue
        try:
            values[row] = float(string)
            is_number[row] = True
        except ValueError:
            blank[row] = string.isspace()
    return values, is_number, blank


def _field_texts(lines: _Lines, candidates: np.ndarray, k: int) -> np.ndarray:
    """Field ``k`` of each candidate as ``str`` (bad UTF-8 replaced), an object array."""
    start, stop = lines.field_bounds(candidates, k)
    block = lines.block
    texts = np.empty(len(candidates), dtype=object)
    bounds = zip(start.tolist(), stop.tolist(), strict=True)
    texts[:] = [str(block[a:b], "utf-8", "replace") for a, b in bounds]
    return texts


def _decoded(fixed: np.ndarray) -> np.ndarray:
    """An (n, width) uint8 array of fields (0 past their ends) as an object array of ``str``.

    A list of ``bytes.decode`` calls: 0.16 s a million 16-byte IDs, against 0.29 s for numpy's
    ``astype("U").astype(object)``.
    """
    fields = np.ascontiguousarray(fixed).view(f"S{max(1, fixed.shape[1])}").ravel()
    texts = np.empty(len(fields), dtype=object)
    texts[:] = [field.decode("utf-8", "replace") for field in fields.tolist()]
    return texts


def _rows_of(
    identifiers: dict[str, np.ndarray],
    labels: np.ndarray,
    numbers: dict[str, np.ndarray],
    clicks: np.ndarray,
) -> Rows:
    """Valid lines as rows: their identifiers' bytes (``_identifier_fields``, checked), labels,
    numbers and Clicks."""
    distinct, codes = np.unique(labels, return_inverse=True)
    # One shared string per class instead of one per row: ~12% less memory for a few classes.
    names = np.empty(len(distinct), dtype=object)
    names[:] = [label.decode("utf-8", "replace") for label in distinct.tolist()]
    texts = {name: _decoded(values) for name, values in identifiers.items()}
    texts.update(LabelName=names[codes.ravel()], Clicks=clicks)
    return Rows({c: texts[c] if c in STRING_COLUMNS else numbers[c] for c in COLUMNS})


def _empty_rows() -> Rows:
    return Rows(
        {c: np.zeros(0, dtype=object if c in STRING_COLUMNS else np.float64) for c in COLUMNS}
    )


# ---------------------------------------------------------------------------------------------
# Instances


def parse_clicks(clicks: str) -> list[list[float]]:
    """``"x y t;x y t"`` -> ``[[x, y, t], ...]`` with x, y floats and t the int 0 or 1."""
    if _CLICKS_RE.fullmatch(clicks) is None:
        raise ValueError(f"malformed clicks: {clicks[:60]!r}")
    if not clicks.strip():
        return []
    triples: list[list[float]] = []
    for part in clicks.split(";"):
        x, y, t = part.split()
        triples.append([float(x), float(y), int(t)])
    return triples


# The published form of a Clicks field (``_TRIPLE``s joined by ";"): its numbers are JSON
# numbers as they stand, so its JSON is a rewrite of the text.
_PUBLISHED_CLICKS_RE = re.compile(
    r"[0-9]\.[0-9]{5} [0-9]\.[0-9]{5} [01](?:;[0-9]\.[0-9]{5} [0-9]\.[0-9]{5} [01])*"
)


def clicks_json(clicks: str) -> str:
    """The JSON text of ``parse_clicks(clicks)`` (equal once parsed; the published form keeps
    its digits, ``0.50000`` stays ``0.50000``).

    The published form is rewritten as text: parsing it into floats and encoding them again
    cost 45 us an instance, most of the plan's time on a 20% subset (54,623 instances).
    """
    if _PUBLISHED_CLICKS_RE.fullmatch(clicks) is not None:
        return "[[" + clicks.replace(" ", ",").replace(";", "],[") + "]]"
    return json.dumps(parse_clicks(clicks), separators=(",", ":"))


def iter_image_instances(
    table: SegmentationTable,
    image_ids: Iterable[str] | None = None,
    clicks: Callable[[str], Any] = parse_clicks,
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Per image, its instances in CSV order as JSON-ready dicts (DESIGN section 4).

    Images come in order of first appearance in the CSV, or in the order of ``image_ids``; an ID
    with no rows in the table raises KeyError. Clicks are converted here by ``clicks`` (parsed
    into lists by default, ``clicks_json`` gives their JSON text), only for these rows.
    """
    rows = table.rows
    positions = group_positions(rows["ImageID"])
    order = list(positions) if image_ids is None else image_ids
    columns = {c: rows[c].tolist() for c in COLUMNS}
    for image_id in order:
        if image_id not in positions:
            raise KeyError(f"image {image_id!r} has no rows of the selected classes")
        instances = []
        for i in positions[image_id].tolist():
            iou = columns["PredictedIoU"][i]
            instances.append(
                {
                    "mask_path": columns["MaskPath"][i],
                    "label": columns["LabelName"][i],
                    "box_id": columns["BoxID"][i],
                    # The CSV orders the box as XMin, XMax, YMin, YMax; the shard format is xyxy.
                    "box": [
                        columns["BoxXMin"][i],
                        columns["BoxYMin"][i],
                        columns["BoxXMax"][i],
                        columns["BoxYMax"][i],
                    ],
                    "predicted_iou": None if math.isnan(iou) else iou,
                    "clicks": clicks(columns["Clicks"][i]),
                }
            )
        yield image_id, instances
