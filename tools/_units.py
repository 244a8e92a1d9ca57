"""Command-line sizes: the one parser ``grafos-bench`` and ``grafos-fabric serve`` share."""

from __future__ import annotations

import argparse
import re

__all__ = ["parse_size"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"64"``, ``"2b"``, ``"4K"``, ``"4KiB"``, ``"1 MiB"``, ``"2MB"``, ``"4G"`` -> bytes (binary units).

    Anything else (empty, zero, negative, fractional, an unknown unit) is an
    :class:`argparse.ArgumentTypeError`, which argparse reports as a usage error.
    """
    m = _SIZE.fullmatch(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 4K, 1MiB, 512M, 4G)")
    value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value
