"""Progress bars for long work: tqdm on stderr while someone watches a terminal, nothing otherwise.

A bar is drawn only when stderr is a terminal, so CI logs, pipes, ``--json`` runs (their stdout is
the record; the bar would be on stderr, but a caller that wants silence passes ``quiet``) and the
notebooks' captured output stay free of carriage-return noise. tqdm rather than hand-written
counters: it rate-limits redraws, estimates the time left and cleans the line up after itself.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def shows_progress(quiet: bool = False) -> bool:
    """Whether a bar would be drawn: not ``quiet`` and stderr is a terminal."""
    return not quiet and sys.stderr.isatty()


def progress(items: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it",
             quiet: bool = False) -> Iterator[T]:
    """``items``, with a bar on stderr where ``shows_progress(quiet)``."""
    if not shows_progress(quiet):
        return iter(items)
    return iter(tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True))
