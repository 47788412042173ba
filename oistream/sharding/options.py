"""What `oistream shard` takes, with each default written once.

Light on purpose (no numpy, aiohttp or tqdm): the command line imports it to show the defaults
in ``--help`` before anything heavy is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from oistream import sources

# Requests kept in flight by one process: enough to hide ~100 ms of latency at ~2,500 GET/s.
DEFAULT_CONCURRENCY = 256
# A shard of 1,000 Open Images samples is ~0.3-0.5 GB: big enough for streaming reads, small
# enough that a failed shard costs little to redo.
DEFAULT_SAMPLES_PER_SHARD = 1000
# More local processes than this buys nothing: each already keeps `concurrency` requests in flight.
MAX_LOCAL_PROCESSES = 8


@dataclass(frozen=True)
class ShardOptions:
    """Everything `oistream shard` takes; each default is written here once (the CLI reads them).

    ``classes`` are names or MIDs as the user typed them; ``out`` and the two roots are fsspec
    URLs or local paths.
    """

    classes: Sequence[str]
    split: str
    out: str
    images: str = sources.DEFAULT_IMAGES
    metadata: str = sources.DEFAULT_METADATA
    per_class: int | None = None
    max_images: int | None = None
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    seed: int = 0
    executor: str = "local"
    scheduler: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    processes: int | None = None  # local worker processes; None = min(CPUs, MAX_LOCAL_PROCESSES)
    endpoint_url: str | None = None
    show_progress: bool = True
    zip_index_cache: str | None = None
