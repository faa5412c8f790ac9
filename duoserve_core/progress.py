"""Long work: a progress bar while someone watches a terminal, and a clean stop on Ctrl-C or SIGTERM.

A bar is drawn only when stderr is a terminal, so CI logs, pipes, ``--json`` runs (their stdout is
the record; the bar would be on stderr, but a caller that wants silence passes ``quiet``) and the
notebooks' captured output stay free of carriage-return noise. tqdm rather than hand-written
counters: it rate-limits redraws, estimates the time left and cleans the line up after itself.

An interrupted command (``interruptible``) stops with one line on stderr and the shell's status for
the signal, 130 for SIGINT and 143 for SIGTERM (128 + the signal's number). Nothing half-done is
left: outputs are written at the end, atomically (``atomic``: a temporary beside the file, removed
when the write is interrupted), so the file a run would write is either complete or untouched.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def shows_progress(quiet: bool = False) -> bool:
    """Whether a bar would be drawn: not ``quiet`` and stderr is a terminal."""
    return not quiet and sys.stderr.isatty()


def _bar(**kwargs) -> tqdm:
    return tqdm(file=sys.stderr, leave=False, dynamic_ncols=True, **kwargs)


def progress(items: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it",
             quiet: bool = False) -> Iterator[T]:
    """``items``, with a bar on stderr where ``shows_progress(quiet)``."""
    if not shows_progress(quiet):
        return iter(items)
    return iter(_bar(iterable=items, desc=desc, total=total, unit=unit))


@contextmanager
def progress_bar(*, desc: str, total: int, unit: str = "it", quiet: bool = False) -> Iterator[Callable[..., object]]:
    """A bar advanced by hand, for work that is not one loop (a policy's repeats inside a loop over
    policies): yields ``tick(n=1)``, a no-op where no bar is drawn. The bar is cleared on the way out,
    an exception's included."""
    if not shows_progress(quiet):
        yield lambda n=1: None
        return
    with _bar(desc=desc, total=total, unit=unit) as bar:
        yield bar.update


def print_line(line: str) -> None:
    """Print ``line`` on stdout above any bar being drawn (a plain ``print`` would land inside the bar's line)."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the work is: a KeyboardInterrupt, so it unwinds like Ctrl-C does
    (atomic writes remove their temporary, ``finally`` blocks run, bars are cleared)."""


_terminated = threading.Event()  # set by SIGTERM's handler: code that must re-raise a swallowed interrupt asks


def _terminate(signum, frame) -> None:
    _terminated.set()
    raise Terminated


def reraise_interrupt() -> None:
    """Raise what interrupted the work, for code whose library swallowed it (scikit-learn's fit turns
    an interrupt into a warning): ``Terminated`` after SIGTERM, else ``KeyboardInterrupt``."""
    raise Terminated if _terminated.is_set() else KeyboardInterrupt


def interruptible(work: Callable[[], int], written: Callable[[], str] = lambda: "nothing written") -> int:
    """``work()``'s exit status, or 130 after Ctrl-C and 143 after SIGTERM, with one line on stderr:
    ``interrupted; `` and ``written()`` (what the run wrote before it stopped: by default nothing);
    141 and nothing more when stdout's reader has gone (a closed pipe).
    SIGTERM's handler is installed for the call (the main thread only can) and restored after."""
    main_thread = threading.current_thread() is threading.main_thread()
    _terminated.clear()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return work()
    except BrokenPipeError:  # stdout's reader left (``--json | head``): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except KeyboardInterrupt as exc:
        if sys.stderr.isatty():  # erase the line: a bar interrupted before it could clear itself would take the message
            sys.stderr.write("\r\x1b[K")
        # an exception may say what was kept after all (``bench``'s finished rows, after a timeout's SIGTERM)
        print(f"interrupted; {getattr(exc, 'written', None) or written()}", file=sys.stderr, flush=True)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
