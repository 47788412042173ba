"""oistream: Open Images instance masks streamed from object storage into WebDataset shards.

``import oistream`` stays light (the command line imports it); the loader, which needs torch, is
imported on first use of ``ShardDataset`` or ``make_loader``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
SHARD_FORMAT_VERSION = 1

__all__ = ["SHARD_FORMAT_VERSION", "ShardDataset", "__version__", "make_loader"]

if TYPE_CHECKING:
    from oistream.loader import ShardDataset, make_loader


def __getattr__(name: str) -> Any:
    if name in ("ShardDataset", "make_loader"):
        from oistream import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'oistream' has no attribute {name!r}")
