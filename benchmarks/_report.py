"""How the benchmarks print their figures."""

from __future__ import annotations


def format_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} GB"


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"
