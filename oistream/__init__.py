"""oistream: Open Images instance masks streamed from object storage into WebDataset shards.

``import oistream`` stays light (the command line imports it): the loader, which needs torch, and
the drawing code are imported on first use of one of their names.

Public API: ``ShardDataset``, ``make_loader``, ``ShardWarning``, ``image_id_to_int``,
``torchvision_decoders_unwarned`` (read side); ``draw_instances`` (pictures); ``OistreamError``
and ``one_line`` (errors); ``SHARD_FORMAT_VERSION``, ``__version__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oistream.errors import OistreamError, one_line

__version__ = "0.1.0"

__all__ = [
    "SHARD_FORMAT_VERSION",
    "OistreamError",
    "ShardDataset",
    "ShardWarning",
    "__version__",
    "draw_instances",
    "image_id_to_int",
    "make_loader",
    "one_line",
    "torchvision_decoders_unwarned",
]

if TYPE_CHECKING:
    from oistream.format import FORMAT_VERSION as SHARD_FORMAT_VERSION
    from oistream.loader import (
        ShardDataset,
        ShardWarning,
        image_id_to_int,
        make_loader,
        torchvision_decoders_unwarned,
    )
    from oistream.visualize import draw_instances

_LAZY = {
    "ShardDataset": "oistream.loader",
    "ShardWarning": "oistream.loader",
    "image_id_to_int": "oistream.loader",
    "make_loader": "oistream.loader",
    "torchvision_decoders_unwarned": "oistream.loader",
    "draw_instances": "oistream.visualize",
}


def __getattr__(name: str) -> Any:
    if name == "SHARD_FORMAT_VERSION":
        from oistream.format import FORMAT_VERSION

        return FORMAT_VERSION
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'oistream' has no attribute {name!r}")
