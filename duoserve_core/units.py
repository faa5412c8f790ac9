"""Byte sizes as people write them ("12GiB", "4.5GB", "15%")."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(text: str | int | float, *, percent_of: int | None = None) -> int:
    """Parse a size such as ``12GiB``, ``4e9`` or ``15%`` (of ``percent_of`` bytes)."""
    if isinstance(text, (int, float)):
        return int(text)
    s = text.strip().lower().replace(" ", "")
    if s.endswith("%"):
        if percent_of is None:
            raise ValueError(f"size {text!r} is a percentage, but nothing to take it of is known here")
        return int(float(s[:-1]) / 100.0 * percent_of)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: write e.g. 12GiB, 4.5GB, 800MiB or 15%")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_bytes(n: int | float) -> str:
    """Human-readable binary size, e.g. ``12.00 GiB``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
