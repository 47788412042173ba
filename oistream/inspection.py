"""`oistream inspect`: what a shard set holds, from its manifest or by reading one tar."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from typing import Any

from oistream import sources
from oistream.errors import OistreamError
from oistream.format import MANIFEST_NAME, read_manifest

SHARDS_LISTED = 10


def summarize(source: str, options: dict[str, Any] | None = None) -> str:
    if source.endswith(".tar"):
        return _summarize_tar(source, options)
    manifest = read_manifest(source, options)
    if manifest is None:
        raise OistreamError(f"no {MANIFEST_NAME} in {source}: not a shard folder")
    return format_manifest(manifest, source)


def format_manifest(manifest: dict[str, Any], source: str) -> str:
    totals = manifest["totals"]
    lines = [
        f"{source}: {manifest['split']} split, format {manifest['format_version']}, "
        f"oistream {manifest['oistream_version']}, plan {manifest['plan_hash'][:12]}",
        f"sources: images {manifest['sources']['images']}, "
        f"metadata {manifest['sources']['metadata']}",
        f"{totals['shards']} shards, {totals['samples']} images, {totals['instances']} instances, "
        f"{totals['bytes'] / 1e6:.1f} MB",
        "classes:",
    ]
    per_class = totals.get("instances_per_class", {})
    images_per_class = totals.get("images_per_class")  # manifests before issue 14 lack it
    for oi_class in manifest["classes"][1:]:
        lines.append(
            f"  {oi_class['index']:>3}  {oi_class['mid']:<12} {oi_class['name']:<24} "
            + (
                f"{images_per_class.get(oi_class['name'], 0)} images, "
                if isinstance(images_per_class, dict)
                else ""
            )
            + f"{per_class.get(oi_class['name'], 0)} instances"
        )
    lines.append("shards:")
    for shard in manifest["shards"][:SHARDS_LISTED]:
        lines.append(
            f"  {shard['name']}  {shard['samples']} images  {shard['instances']} instances  "
            f"{shard['bytes'] / 1e6:.1f} MB  sha256 {shard['sha256'][:16]}"
        )
    if len(manifest["shards"]) > SHARDS_LISTED:
        lines.append(f"  ... {len(manifest['shards']) - SHARDS_LISTED} more")
    failures = manifest.get("failures", [])
    if failures:
        reasons = Counter(_reason_kind(f["reason"]) for f in failures)
        lines.append(f"failures: {len(failures)} image(s) left out")
        for reason, count in reasons.most_common():
            lines.append(f"  {count} x {reason}")
    else:
        lines.append("failures: none")
    return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    """Group reasons by their shape: "mask X is missing" and "mask Y is missing" are one kind."""
    words = reason.split()
    return " ".join("…" if any(c.isdigit() for c in w) and len(w) > 8 else w for w in words[:6])


def _summarize_tar(source: str, options: dict[str, Any] | None) -> str:
    fs, path = sources.filesystem(source, options)
    samples: set[str] = set()
    labels: Counter[str] = Counter()
    size = 0
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                size += member.size
                key, _, extension = member.name.rpartition("/")[2].partition(".")
                samples.add(key)
                if extension == "json":
                    handle = tar.extractfile(member)
                    record = json.loads(handle.read()) if handle else {}
                    labels.update(x.get("label", "?") for x in record.get("instances", []))
    except FileNotFoundError:
        raise OistreamError(f"{source} does not exist") from None
    except tarfile.TarError as error:
        raise OistreamError(f"{source} is not a readable tar: {error}") from None
    lines = [
        f"{source}: {len(samples)} images, {sum(labels.values())} instances, "
        f"{size / 1e6:.1f} MB of members"
    ]
    lines += [f"  {label}: {count}" for label, count in labels.most_common()]
    return "\n".join(lines)
