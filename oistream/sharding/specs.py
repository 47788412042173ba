"""What a shard job is given to build: its samples' records, as plain data.

Kept apart from ``plan.py`` (which makes them from the catalog, with pandas) so that a shard
worker, which only unpickles and reads them, never imports pandas: ~0.7 s of CPU per worker
process at its start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SampleSpec:
    image_id: str
    # JSON-ready instance records (DESIGN section 4) in CSV order, ``class_index`` filled in.
    instances: list[dict[str, Any]]
    # Additive sample JSON fields: the evaluation annotations (``image_labels``, ``boxes``).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardSpec:
    """One shard with its samples' records: what a worker needs to build it."""

    index: int
    name: str
    samples: list[SampleSpec]


__all__ = ["SampleSpec", "ShardSpec"]
