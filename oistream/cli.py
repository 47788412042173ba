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
from oistream.exiting import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, leave_now
from oistream.sharding.options import MAX_LOCAL_PROCESSES, ShardOptions


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help line (unless the line already says it); the epilog's
    example kept as written, descriptions wrapped."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # `is`, not `in`: a default of 0 equals False and must still be shown.
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        if action.option_strings or action.nargs in ("?", "*"):
            return f"{text} (default: %(default)s)"
        return text


def _example(*commands: str) -> str:
    return "example:\n" + "\n".join(f"  {command}" for command in commands)


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


def _add_metadata(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metadata",
        default=sources.default_metadata(),
        help="root holding v5/ mask zips and CSVs and v7/ class names "
        f"(default: ${sources.METADATA_VARIABLE} or {sources.DEFAULT_METADATA}"
        + ("; now %(default)s)" if os.environ.get(sources.METADATA_VARIABLE) else ")"),
    )


def _add_locations(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images",
        default=sources.default_images(),
        help="root holding {split}/{ImageID}.jpg "
        f"(default: ${sources.IMAGES_VARIABLE} or {sources.DEFAULT_IMAGES}"
        + ("; now %(default)s)" if os.environ.get(sources.IMAGES_VARIABLE) else ")"),
    )
    _add_metadata(parser)
    _add_endpoint(parser)


def _add_endpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url",
        default=None,
        help="S3 endpoint for s3:// URLs (default: $FSSPEC_S3_ENDPOINT_URL or $AWS_ENDPOINT_URL)",
    )


def _add_cache(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--cache",
        "--zip-index-cache",  # its old name, from when it held only the zips' directories
        metavar="DIR",
        default=ShardOptions.cache,
        help="metadata cache: class lists, CSVs, zip directories, each checked by one HEAD "
        "(size, ETag) before use (default: %(default)s, else ~/.cache/oistream)",
    )
    group.add_argument(
        "--no-cache", dest="cache", action="store_const", const=None, help="no metadata cache"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="oistream",
        description="Stream Open Images instance masks into WebDataset shards.",
        epilog=_example(
            "oistream classes traffic",
            "oistream shard --classes Person Car --split validation --per-class 100 "
            "--out shards/validation --dry-run",
        ),
    )
    parser.add_argument("--version", action="version", version=f"oistream {__version__}")
    commands = parser.add_subparsers(
        dest="command", parser_class=_Parser, metavar="COMMAND", title="commands"
    )

    classes = commands.add_parser(
        "classes",
        help="list segmentable classes matching QUERY",
        description="List the segmentable classes (MID, name) whose name or MID contains QUERY.",
        epilog=_example("oistream classes traffic --counts --split validation"),
    )
    classes.add_argument("query", nargs="?", help="part of a class name or MID (default: all)")
    classes.add_argument(
        "--counts", action="store_true", help="add images and instances per class (needs --split)"
    )
    classes.add_argument("--split", choices=sources.SPLITS, help="the split --counts reads")
    _add_metadata(classes)
    _add_endpoint(classes)
    _add_cache(classes)

    defaults = ShardOptions  # the dataclass's fields hold each default once
    shard = commands.add_parser(
        "shard",
        help="write WebDataset shards of a subset",
        description="Select images by class (and ImageID), fetch exactly their image objects "
        "and mask members, and write WebDataset shards plus manifest.json.",
        epilog=_example(
            "oistream shard --classes Person Car --split validation --per-class 100 "
            "--out shards/validation --dry-run",
            "oistream shard --classes-file classes.txt --split train validation "
            "--out s3://bucket/shards",
        ),
    )
    chosen = shard.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--classes", nargs="+", metavar="NAME|MID", help="classes to select")
    chosen.add_argument("--classes-file", metavar="FILE", help="one class name or MID per line")
    shard.add_argument(
        "--image-ids",
        metavar="FILE|URL",
        help="only these images (txt one per line, or CSV/JSON with an ImageID column/field), "
        "still filtered by class",
    )
    shard.add_argument(
        "--split",
        required=True,
        nargs="+",
        choices=sources.SPLITS,
        help="one split, or several: then --out is a parent of OUT/{split}",
    )
    shard.add_argument("--out", required=True, help="shard folder or URL (s3://bucket/prefix)")
    shard.add_argument("--per-class", type=_positive, help="images per class (default: all)")
    shard.add_argument("--max-images", type=_positive, help="cap on the images (default: none)")
    shard.add_argument(
        "--samples-per-shard",
        type=_positive,
        default=defaults.samples_per_shard,
        help="images per tar",
    )
    shard.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the selection order"
    )
    shard.add_argument(
        "--executor",
        choices=("local", "dask"),
        default=defaults.executor,
        help="where shards are built",
    )
    shard.add_argument("--scheduler", help="Dask scheduler address, with --executor dask")
    shard.add_argument(
        "--concurrency",
        type=_positive,
        default=defaults.concurrency,
        help="requests in flight per process",
    )
    shard.add_argument(
        "--processes",
        type=_positive,
        help=f"local worker processes (default: CPUs, at most {MAX_LOCAL_PROCESSES})",
    )
    _add_cache(shard)
    shard.add_argument(
        "--dry-run",
        action="store_true",
        help="plan and print counts and expected bytes; fetch no image or mask, write nothing",
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
        help="seconds without a byte before a request is retried (a class list or CSV: "
        f"the run stops, for a rerun) (default: {defaults.read_timeout:g})",
    )
    shard.add_argument(
        "--attempt-timeout",
        type=_positive_float,
        default=defaults.attempt_timeout,
        help=f"deadline of one request attempt in seconds (default: {defaults.attempt_timeout:g})",
    )
    shard.add_argument(
        "--evaluation-annotations",
        action=argparse.BooleanOptionalAction,
        default=defaults.evaluation_annotations,
        help="carry boxes, verified image-level labels and the hierarchy for `oistream "
        "evaluate` (default: on for validation and test, off for train)",
    )
    shard.add_argument(
        "--expand-hierarchy",
        action="store_true",
        help="a class stands for itself and its segmentable descendants (e.g. Vehicle)",
    )
    shard.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_locations(shard)

    inspect = commands.add_parser(
        "inspect",
        help="summarise a shard set",
        epilog=_example("oistream inspect shards/validation"),
    )
    inspect.add_argument("source", help="shard folder, URL or a single .tar")
    _add_endpoint(inspect)

    show = commands.add_parser(
        "show",
        help="draw an image with its masks and boxes",
        epilog=_example("oistream show shards/validation --out sample.png"),
    )
    show.add_argument("source", help="shard folder, URL or a single .tar")
    show.add_argument("--key", help="ImageID to draw (default: the first sample)")
    show.add_argument("--out", required=True, help="PNG file to write")
    _add_endpoint(show)

    export = commands.add_parser(
        "export",
        help="convert shards to another format (coco)",
        epilog=_example("oistream export coco shards/validation --out coco/validation"),
    )
    formats = export.add_subparsers(dest="format", required=True, parser_class=_Parser)
    coco = formats.add_parser(
        "coco",
        help="COCO instances JSON with RLE masks, plus the JPEGs",
        description="Write DIR/annotations.json (COCO instances, RLE masks at each image's "
        "size) and DIR/images/{ImageID}.jpg (byte for byte) from a shard set.",
        epilog=_example("oistream export coco shards/validation --out coco/validation"),
    )
    coco.add_argument("source", help="shard folder or URL holding manifest.json")
    coco.add_argument("--out", required=True, help="folder for annotations.json and images/")
    coco.add_argument("--no-images", action="store_true", help="write annotations.json only")
    _add_endpoint(coco)

    evaluate = commands.add_parser(
        "evaluate", help="Open Images challenge mask mAP and COCO AP of a predictions file"
    )
    evaluate.add_argument("shards", help="shard folder or URL (the ground truth)")
    evaluate.add_argument(
        "predictions",
        help="challenge CSV (ImageID,ImageWidth,ImageHeight,LabelName,Score,Mask) or a JSON "
        "list of {image_id, label, score, mask: {size, counts}}",
    )
    evaluate.add_argument("--out", help="also write the result to this JSON file")
    _add_endpoint(evaluate)

    commands.add_parser(
        "train", help="train Mask R-CNN on shards (`oistream train --help`; extra [train])"
    )
    commands.add_parser(
        "predict",
        help="run a trained checkpoint on images or shards (`oistream predict --help`; "
        "extra [train])",
    )
    fake = commands.add_parser(
        "fake-bucket",
        help="write a synthetic bucket with the real layout",
        epilog=_example("oistream fake-bucket /tmp/bucket --images 64 --serve"),
    )
    fake.add_argument("dir", help="folder to write the two buckets into")
    fake.add_argument("--images", type=_positive, default=64, help="train images")
    fake.add_argument("--seed", type=int, default=0, help="seed of the scenes")
    fake.add_argument("--image-size", type=_positive, default=320, help="long side in pixels")
    fake.add_argument("--zip64", action="store_true", help="Zip64 end records in every zip")
    fake.add_argument("--processes", type=_positive, default=1, help="processes rendering scenes")
    fake.add_argument("--serve", action="store_true", help="serve it on a local S3 endpoint")
    fake.add_argument("--port", type=int, default=5000, help="port for --serve")
    return parser


def _classes(args: argparse.Namespace) -> None:
    from oistream.sharding import classes
    from oistream.sharding.cache import MetadataCache
    from oistream.sharding.run import resolve_cache_dir

    if args.counts and not args.split:
        raise OistreamError("--counts needs --split S (the split whose CSV is counted)")
    options = sources.storage_options(args.metadata, args.endpoint_url)
    cache = MetadataCache(resolve_cache_dir(args.cache))
    known = classes.load_classes(args.metadata, options, cat=lambda url: cache.cat(url, options))
    found = classes.search_classes(args.query, known)
    if not found:
        close = classes.closest_names(args.query, known)
        hint = f"closest: {', '.join(close)}" if close else "run `oistream classes` for all"
        raise OistreamError(f"no segmentable class matches {args.query!r}; {hint}")
    if not args.counts:
        for oi_class in found:
            print(f"{oi_class.mid}\t{oi_class.name}")
        return
    from oistream.sharding.selection import count_classes

    csv_url = sources.segmentation_csv_url(args.metadata, args.split)
    counts = count_classes(
        csv_url, [c.mid for c in found], options, opener=lambda: cache.open(csv_url, options)
    )
    print(f"MID\tname\t{args.split} images\tinstances")
    for oi_class in found:
        images, instances = counts[oi_class.mid]
        print(f"{oi_class.mid}\t{oi_class.name}\t{images}\t{instances}")


def _shard(args: argparse.Namespace) -> None:
    from oistream.sharding.run import format_summary, run_splits
    from oistream.sharding.selection import read_class_file

    classes = args.classes
    if args.classes_file is not None:
        file_options = sources.storage_options(args.classes_file, args.endpoint_url)
        classes = read_class_file(args.classes_file, file_options)
    options = ShardOptions(
        classes=classes,
        split=args.split[0] if len(args.split) == 1 else args.split,
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
        overwrite=args.overwrite,
        max_member_bytes=args.max_mask_bytes,
        read_timeout=args.read_timeout,
        attempt_timeout=args.attempt_timeout,
        cache=args.cache,
        image_ids=args.image_ids,
        dry_run=args.dry_run,
        evaluation_annotations=args.evaluation_annotations,
        expand_hierarchy=args.expand_hierarchy,
    )
    reports = run_splits(options)
    print("\n".join(format_summary(report, report.out) for report in reports))


def _export(args: argparse.Namespace) -> None:
    try:
        from oistream.export import export_coco
    except ModuleNotFoundError as error:
        raise OistreamError(
            f"oistream export needs {error.name}: pip install 'oistream[train]'"
        ) from None

    options = sources.storage_options(args.source, args.endpoint_url)
    print(export_coco(args.source, args.out, images=not args.no_images, storage_options=options))


def _inspect(args: argparse.Namespace) -> None:
    from oistream.inspection import summarize

    print(summarize(args.source, sources.storage_options(args.source, args.endpoint_url)))


def _show(args: argparse.Namespace) -> None:
    from oistream.visualize import render_sample

    options = sources.storage_options(args.source, args.endpoint_url)
    print(render_sample(args.source, key=args.key, out=args.out, storage_options=options))


def _evaluate(args: argparse.Namespace) -> None:
    import json

    from oistream.evaluation import evaluate_shards, json_safe

    options = sources.storage_options(args.shards, args.endpoint_url)
    result = json_safe(evaluate_shards(args.shards, args.predictions, options))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as error:
            raise OistreamError(f"cannot write {args.out}: {error.strerror or error}") from None


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
    "export": _export,
    "evaluate": _evaluate,
    "fake-bucket": _fake_bucket,
}


# Commands whose code lives in the trainer package (`train/` in a checkout, installed as
# `oistream.trainer`); they parse their own arguments and need the `[train]` extra.
TRAINER_COMMANDS = {"train": "cli", "predict": "predict"}


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
    parser = build_parser()
    if not argv:  # plain `oistream`: what it can do, not an error
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
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


def run() -> NoReturn:
    """The command's entry point (``oistream``, ``python -m oistream``): ``main``, then an exit
    without the interpreter's teardown.

    Tearing down the modules the shard command loads (pandas, aiobotocore, aiohttp) took 0.2-0.5
    s after the work was done (``import oistream.sharding.run`` then exit: 0.96 s; the same
    with the ``atexit`` handlers run and then ``os._exit``: 0.77 s). By the time ``main``
    returns every file it wrote is closed and renamed, its worker processes are joined and its
    lease released; the ``atexit`` handlers still run (multiprocessing unlinks its semaphores
    there), then the output buffers are flushed. Trainer commands exit the usual way (CUDA and
    process groups shut down).
    """
    argv = sys.argv[1:]
    code = main(argv)
    if argv and argv[0] in TRAINER_COMMANDS:
        raise SystemExit(code)
    leave_now(code)
