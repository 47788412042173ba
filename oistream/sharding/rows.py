"""Catalog rows as named numpy columns: the few table operations a shard run needs, no pandas.

A shard run filters, concatenates and groups a few thousand rows (1% of train) to a few hundred
thousand (a whole class), and importing pandas for that cost more than the work: 0.4-0.5 s of
CPU on a 2-core EPYC VM, against 0.1 s for numpy, in a 1% run of ~2.2 s whose every CPU second
held up its requests (0.4 s of extra work on a thread made it 0.35-0.6 s slower). String
columns are object arrays of ``str``, number columns float64; ``to_frame`` gives the pandas
view to whoever wants one.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np


class Rows:
    """Equal-length named columns (numpy arrays) in a fixed order; never modified in place."""

    __slots__ = ("_columns", "_length")

    def __init__(self, columns: Mapping[str, np.ndarray]) -> None:
        self._columns = dict(columns)
        lengths = {len(values) for values in self._columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns of different lengths: {sorted(lengths)}")
        self._length = lengths.pop() if lengths else 0

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, name: str) -> np.ndarray:
        return self._columns[name]

    def __repr__(self) -> str:
        return f"Rows({self._length} rows: {', '.join(self._columns)})"

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self._columns)

    @property
    def empty(self) -> bool:
        return self._length == 0

    def take(self, rows: np.ndarray) -> Rows:
        """The rows at ``rows``: positions, or a boolean mask as long as the table."""
        return Rows({name: values[rows] for name, values in self._columns.items()})

    def select(self, names: Iterable[str]) -> Rows:
        """Only the columns ``names``, in that order."""
        return Rows({name: self._columns[name] for name in names})

    def with_columns(self, **columns: np.ndarray) -> Rows:
        """These columns added (or replaced)."""
        return Rows({**self._columns, **columns})

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        """The rows of ``parts`` one after another; every part must have the same columns."""
        if not parts:
            raise ValueError("nothing to concatenate")
        names = parts[0].columns
        if any(part.columns != names for part in parts):
            raise ValueError(f"parts with other columns than {names}")
        return Rows({n: np.concatenate([part[n] for part in parts]) for n in names})

    def to_frame(self) -> Any:
        """The rows as a pandas DataFrame (string columns of dtype ``str``)."""
        import pandas as pd

        return pd.DataFrame(
            {
                name: pd.Series(values, dtype=str if values.dtype == object else values.dtype)
                for name, values in self._columns.items()
            }
        )


def factorize(values: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """A code per value and the distinct values, both in order of first appearance.

    A dict, not ``np.unique``: sorting an object array compares Python strings one pair at a
    time, and the order of first appearance would need restoring after it.
    """
    index: dict[Any, int] = {}
    codes = np.fromiter(
        (index.setdefault(value, len(index)) for value in values.tolist()),
        dtype=np.intp,
        count=len(values),
    )
    return codes, list(index)


def group_positions(values: np.ndarray) -> dict[Any, np.ndarray]:
    """Per distinct value, in order of first appearance, the positions holding it (ascending)."""
    if not len(values):
        return {}
    codes, distinct = factorize(values)
    order = np.argsort(codes, kind="stable")
    ends = np.cumsum(np.bincount(codes, minlength=len(distinct)))
    return dict(zip(distinct, np.split(order, ends[:-1]), strict=True))


def isin(values: np.ndarray, wanted: Collection[Any]) -> np.ndarray:
    """Whether each value is in ``wanted`` (any collection of hashables; a set is fastest)."""
    wanted = wanted if isinstance(wanted, (set, frozenset, dict)) else set(wanted)
    found = (value in wanted for value in values.tolist())
    return np.fromiter(found, dtype=bool, count=len(values))
