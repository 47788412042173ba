"""What `oistream shard` takes, with each default written once.

Light on purpose (no numpy, aiohttp or tqdm): the command line imports it to show the defaults
in ``--help`` before anything heavy is loaded.
"""

from __future__ import annotations

import os
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


def local_processes(processes: int | None) -> int:
    """``--processes`` as given, or the default: one per CPU, at most MAX_LOCAL_PROCESSES."""
    return processes or min(os.cpu_count() or 1, MAX_LOCAL_PROCESSES)


# Open Images' mask PNGs are tens to hundreds of kB (a 1600 px 8-bit mask is under 2 MB). A
# member declaring more, or inflating to more, is refused: a zip bomb fails its image, and one
# member never costs more than this in memory (``--max-mask-bytes``).
DEFAULT_MAX_MEMBER_BYTES = 32 * 1024 * 1024
# Whole objects fetched without a range are images (Open Images JPEGs are at most a few MB):
# a body over this is refused as it arrives instead of filling memory.
DEFAULT_MAX_OBJECT_BYTES = 64 * 1024 * 1024
# Seconds without a byte before a request attempt is abandoned and retried (``--read-timeout``).
DEFAULT_READ_TIMEOUT = 15.0
# Deadline of one request attempt in seconds (``--attempt-timeout``): a request's largest body,
# an 8 MB span, needs that long only below 140 kB/s.
DEFAULT_ATTEMPT_TIMEOUT = 60.0
# Written as the user reads it in --help; resolved when a run starts (cache.default_cache_dir).
DEFAULT_CACHE = "$XDG_CACHE_HOME/oistream"


@dataclass(frozen=True)
class ShardOptions:
    """Everything `oistream shard` takes; each default is written here once (the CLI reads them).

    ``classes`` are names or MIDs as the user typed them; ``out`` and the two roots are fsspec
    URLs or local paths. ``cache`` is the metadata cache folder (``DEFAULT_CACHE`` stands for
    ``$XDG_CACHE_HOME/oistream``, else ``~/.cache/oistream``; None turns the cache off).
    ``image_ids`` is a file or URL of ImageIDs (txt, CSV or JSON) the selection is limited to.
    ``dry_run`` plans and estimates, fetches no image or mask and writes nothing to ``out``.
    """

    classes: Sequence[str]
    split: str | Sequence[str]  # several: ``out`` is their parent (``run_splits``)
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
    # Write into an ``out`` holding files oistream did not write, or another plan's shards.
    overwrite: bool = False
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    read_timeout: float = DEFAULT_READ_TIMEOUT
    attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT
    cache: str | None = DEFAULT_CACHE
    image_ids: str | None = None
    dry_run: bool = False
    # Boxes, verified image-level labels and the hierarchy for the challenge metric. None: on for
    # validation and test (skipped with a note when the metadata root lacks their files), off
    # for train (its box CSV is 1.1 GB); True: on, and their files must be there.
    evaluation_annotations: bool | None = None
    # Each class given stands for itself (if segmentable) and its segmentable descendants.
    expand_hierarchy: bool = False
