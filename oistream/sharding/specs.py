"""What a shard job is given to build: its samples' records, as plain data.

Kept apart from ``plan.py`` (which makes them from the catalog, with pandas) so that a shard
worker, which only unpickles and reads them, never imports pandas: ~0.7 s of CPU per worker
process at its start.

A sample's instance records travel as the JSON text the shard will hold, not as dicts: the
worker only has to put them in the sample's JSON. Measured on a 20% subset (18,800 images,
54,623 instances, clicks 1-20 per instance): unpickling the dicts in the workers cost 2.6 s of
CPU and encoding them again 1.1 s; the text costs neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass
class SampleSpec:
    image_id: str
    # (field, mask_path) of each instance in CSV order: the members to fetch and their names.
    masks: list[tuple[str, str]]
    # The JSON array of the instance records (DESIGN section 4), ``class_index`` filled in.
    instances_json: str
    # Additive sample JSON fields (the evaluation annotations ``image_labels``, ``boxes``), as
    # the members of a JSON object without its braces; "" when there are none.
    extra_json: str = ""

    @property
    def instances(self) -> list[dict[str, Any]]:
        """The instance records as dicts (parsed from the text: for inspection and tests)."""
        return json.loads(self.instances_json)

    def record_json(self, split: str, width: int, height: int) -> bytes:
        """The sample's JSON member: keys in DESIGN section 4's order, then the extra fields."""
        head = json.dumps(
            {"image_id": self.image_id, "split": split, "width": width, "height": height},
            separators=(",", ":"),
        )
        extra = f",{self.extra_json}" if self.extra_json else ""
        return f'{head[:-1]},"instances":{self.instances_json}{extra}}}'.encode()


@dataclass
class ShardSpec:
    """One shard with its samples' records: what a worker needs to build it."""

    index: int
    name: str
    samples: list[SampleSpec]


__all__ = ["SampleSpec", "ShardSpec"]
