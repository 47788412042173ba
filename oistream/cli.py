"""The `oistream` command line (DESIGN section 3).

Bad input ends with one line on stderr and a non-zero exit, never a traceback; the work itself
lives in the modules each subcommand calls.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from oistream import __version__, sources
from oistream.errors import OistreamError, one_line
from oistream.sharding.options import MAX_LOCAL_PROCESSES, ShardOptions

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _add_locations(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images",
        default=sources.DEFAULT_IMAGES,
        help="root holding {split}/{ImageID}.jpg (default: %(default)s)",
    )
    parser.add_argument(
        "--metadata",
        default=sources.DEFAULT_METADATA,
        help="root holding v5/ mask zips and CSVs and v7/ class names (default: %(default)s)",
    )
    _add_endpoint(parser)


def _add_endpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url",
        default=None,
        help="S3 endpoint for s3:// URLs (default: $FSSPEC_S3_ENDPOINT_URL or $AWS_ENDPOINT_URL)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="oistream",
        description="Stream Open Images instance masks into WebDataset shards.",
    )
    parser.add_argument("--version", action="version", version=f"oistream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    classes = commands.add_parser("classes", help="list segmentable classes matching QUERY")
    classes.add_argument("query", nargs="?", help="part of a class name or MID")
    classes.add_argument("--metadata", default=sources.DEFAULT_METADATA)
    _add_endpoint(classes)

    defaults = ShardOptions  # the dataclass's fields hold each default once
    shard = commands.add_parser("shard", help="write WebDataset shards of a subset")
    shard.add_argument("--classes", nargs="+", required=True, metavar="NAME|MID")
    shard.add_argument("--split", required=True, choices=sources.SPLITS)
    shard.add_argument("--out", required=True, help="shard folder or URL (s3://bucket/prefix)")
    shard.add_argument("--per-class", type=_positive, help="images per class (default: all)")
    shard.add_argument("--max-images", type=_positive, help="cap on the images in total")
    shard.add_argument(
        "--samples-per-shard",
        type=_positive,
        default=defaults.samples_per_shard,
        help="images per tar (default: %(default)s)",
    )
    shard.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the selection order (default: 0)"
    )
    shard.add_argument(
        "--executor",
        choices=("local", "dask"),
        default=defaults.executor,
        help="where shards are built (default: %(default)s)",
    )
    shard.add_argument("--scheduler", help="Dask scheduler address, with --executor dask")
    shard.add_argument(
        "--concurrency",
        type=_positive,
        default=defaults.concurrency,
        help="requests in flight per process (default: %(default)s)",
    )
    shard.add_argument(
        "--processes",
        type=_positive,
        help=f"local worker processes (default: CPUs, at most {MAX_LOCAL_PROCESSES})",
    )
    shard.add_argument(
        "--zip-index-cache",
        metavar="DIR",
        help="keep the mask zips' central directories here (keyed by size and ETag) so "
        "later runs skip reading them",
    )
    shard.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out holding files oistream did not write, or another "
        "selection's shards (which are then rebuilt)",
    )
    shard.add_argument(
        "--max-mask-bytes",
        type=_positive,
        default=defaults.max_member_bytes,
        help="cap on one mask member, declared or inflated; over it the image fails "
        f"(default: {defaults.max_member_bytes // 2**20} MiB)",
    )
    shard.add_argument(
        "--read-timeout",
        type=_positive_float,
        default=defaults.read_timeout,
        help="seconds without a byte before a request is retried "
        f"(default: {defaults.read_timeout:g})",
    )
    shard.add_argument(
        "--attempt-timeout",
        type=_positive_float,
        default=defaults.attempt_timeout,
        help=f"deadline of one request attempt in seconds (default: {defaults.attempt_timeout:g})",
    )
    shard.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_locations(shard)

    inspect = commands.add_parser("inspect", help="summarise a shard set")
    inspect.add_argument("source", help="shard folder, URL or a single .tar")
    _add_endpoint(inspect)

    show = commands.add_parser("show", help="draw an image with its masks and boxes")
    show.add_argument("source", help="shard folder, URL or a single .tar")
    show.add_argument("--key", help="ImageID to draw (default: the first sample)")
    show.add_argument("--out", required=True, help="PNG file to write")
    _add_endpoint(show)

    commands.add_parser(
        "train", help="train Mask R-CNN on shards (`oistream train --help`; extra [train])"
    )
    fake = commands.add_parser("fake-bucket", help="write a synthetic bucket with the real layout")
    fake.add_argument("dir")
    fake.add_argument("--images", type=_positive, default=64, help="train images (default: 64)")
    fake.add_argument("--seed", type=int, default=0)
    fake.add_argument("--image-size", type=_positive, default=320, help="long side in pixels")
    fake.add_argument("--zip64", action="store_true", help="Zip64 end records in every zip")
    fake.add_argument(
        "--processes", type=_positive, default=1, help="processes rendering scenes (default: 1)"
    )
    fake.add_argument("--serve", action="store_true", help="serve it on a local S3 endpoint")
    fake.add_argument("--port", type=int, default=5000, help="port for --serve")
    return parser


def _classes(args: argparse.Namespace) -> None:
    from oistream.sharding import catalog

    options = sources.storage_options(args.metadata, args.endpoint_url)
    found = catalog.search_classes(args.query, catalog.load_classes(args.metadata, options))
    if not found:
        raise OistreamError(f"no segmentable class matches {args.query!r}")
    for oi_class in found:
        print(f"{oi_class.mid}\t{oi_class.name}")


def _shard(args: argparse.Namespace) -> None:
    from oistream.sharding.run import format_summary, run_shard

    options = ShardOptions(
        classes=args.classes,
        split=args.split,
        out=args.out,
        images=args.images,
        metadata=args.metadata,
        per_class=args.per_class,
        max_images=args.max_images,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        executor=args.executor,
        scheduler=args.scheduler,
        concurrency=args.concurrency,
        processes=args.processes,
        endpoint_url=args.endpoint_url,
        show_progress=not args.quiet,
        zip_index_cache=args.zip_index_cache,
        overwrite=args.overwrite,
        max_member_bytes=args.max_mask_bytes,
        read_timeout=args.read_timeout,
        attempt_timeout=args.attempt_timeout,
    )
    report = run_shard(options)
    print(format_summary(report, args.out))


def _inspect(args: argparse.Namespace) -> None:
    from oistream.inspection import summarize

    print(summarize(args.source, sources.storage_options(args.source, args.endpoint_url)))


def _show(args: argparse.Namespace) -> None:
    from oistream.visualize import render_sample

    options = sources.storage_options(args.source, args.endpoint_url)
    print(render_sample(args.source, key=args.key, out=args.out, storage_options=options))


def _fake_bucket(args: argparse.Namespace) -> None:
    from oistream.testing.fakebucket import make_fake_bucket

    summary = make_fake_bucket(
        args.dir,
        images=args.images,
        seed=args.seed,
        image_size=args.image_size,
        zip64=args.zip64,
        processes=args.processes,
    )
    splits = summary.get("splits", summary)
    counts = ", ".join(
        f"{split} {info['images']} images" for split, info in splits.items() if "images" in info
    )
    print(f"fake bucket at {args.dir}: {counts}")
    if args.serve:
        try:
            from oistream.testing.s3server import serve
        except ModuleNotFoundError as error:
            raise OistreamError(
                f"--serve needs {error.name}: pip install 'oistream[serve]'"
            ) from None
        serve(args.dir, port=args.port)


COMMANDS = {
    "classes": _classes,
    "shard": _shard,
    "inspect": _inspect,
    "show": _show,
    "fake-bucket": _fake_bucket,
}


# Commands whose code lives in the trainer package (`train/` in a checkout, installed as
# `oistream.trainer`); they parse their own arguments and need the `[train]` extra.
TRAINER_COMMANDS = {"train": "cli"}


def _trainer_module(name: str):
    """The trainer's module ``name``, from the installed package or from a checkout's ``train/``."""
    for package in ("oistream.trainer", "train"):
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as error:
            if error.name in ("torch", "torchvision", "webdataset", "numba", "pycocotools"):
                raise OistreamError(
                    f"this command needs {error.name}: pip install 'oistream[train]'"
                ) from None
            if error.name not in (package, f"{package}.{name}", package.split(".")[0]):
                raise
    raise OistreamError("the trainer is not installed: pip install 'oistream[train]'")


def _run_trainer_command(command: str, argv: list[str]) -> int:
    try:
        module = _trainer_module(TRAINER_COMMANDS[command])
    except OistreamError as error:
        print(f"oistream {command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    return module.main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINER_COMMANDS:
        return _run_trainer_command(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except OistreamError as error:
        print(f"oistream {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(
            f"oistream {args.command}: interrupted; rerun the same command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception as error:
        if os.environ.get("OISTREAM_DEBUG"):
            raise
        print(
            f"oistream {args.command}: unexpected error: {one_line(error)} "
            "(set OISTREAM_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return 0
