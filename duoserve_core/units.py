"""Byte sizes as people write them ("12GiB", "4.5GB", "15%")."""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_EXAMPLES = "write e.g. 12GiB, 4.5GB, 800MiB or 15%"


def parse_bytes(text: str | int | float, *, percent_of: int | None = None) -> int:
    """Parse a size such as ``12GiB``, ``4e9`` or ``15%`` (of ``percent_of`` bytes).

    A size is finite and not negative: ``1e400GiB`` and ``nan%`` raise ``ValueError`` naming the
    text, rather than an ``OverflowError`` from ``int(inf)`` or a budget of -1.2 GiB."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"size {text!r} must be a finite number of bytes, 0 or more; {_EXAMPLES}")
        return int(text)
    if not isinstance(text, str):
        raise ValueError(f"size {text!r} is not a number of bytes; {_EXAMPLES}")
    s = text.strip().lower().replace(" ", "")
    if s.endswith("%"):
        if percent_of is None:
            raise ValueError(f"size {text!r} is a percentage, but nothing to take it of is known here")
        try:
            pct = float(s[:-1])
        except ValueError:
            pct = math.nan
        if not math.isfinite(pct) or pct < 0:
            raise ValueError(f"cannot read size {text!r}: a percentage is a finite number, 0 or more; {_EXAMPLES}")
        return int(pct / 100.0 * percent_of)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: {_EXAMPLES}")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(value):
        raise ValueError(f"size {text!r} is too large to be a number of bytes; {_EXAMPLES}")
    return int(value)


def parse_slots(text: str) -> int:
    """``Nslots``: a whole number of expert slots, 0 or more (``2.5slots`` and ``abcslots`` raise ``ValueError``)."""
    n = text.strip().lower()[:-len("slots")] if text.strip().lower().endswith("slots") else None
    if n is None or not n.isdigit():
        raise ValueError(f"cannot read budget {text!r}: Nslots takes a whole number of expert slots, e.g. 8slots")
    return int(n)


def check_budget(text: str) -> str:
    """``text`` if it is a budget spelling ``memory.resolve_budget`` reads (bytes, %, Nslots or all), else
    ``ValueError`` naming it: a CLI checks its budgets before loading anything."""
    s = text.strip().lower()
    if s == "all":
        return text
    if s.endswith("slots"):
        parse_slots(s)
    else:
        parse_bytes(s, percent_of=1)
    return text


def format_bytes(n: int | float) -> str:
    """Human-readable binary size, e.g. ``12.00 GiB``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
