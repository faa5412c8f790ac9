"""``python -m duoserve_core``: see :mod:`duoserve_core.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
