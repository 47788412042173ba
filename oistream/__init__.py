"""oistream: Open Images instance masks streamed from object storage into WebDataset shards.

``import oistream`` stays light (the command line imports it); the loader, which needs torch, is
imported on first use of one of its names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "SHARD_FORMAT_VERSION",
    "ShardDataset",
    "ShardWarning",
    "__version__",
    "image_id_to_int",
    "make_loader",
]

if TYPE_CHECKING:
    from oistream.format import FORMAT_VERSION as SHARD_FORMAT_VERSION
    from oistream.loader import ShardDataset, ShardWarning, image_id_to_int, make_loader


def __getattr__(name: str) -> Any:
    if name == "SHARD_FORMAT_VERSION":
        from oistream.format import FORMAT_VERSION

        return FORMAT_VERSION
    if name in ("ShardDataset", "ShardWarning", "image_id_to_int", "make_loader"):
        from oistream import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'oistream' has no attribute {name!r}")
