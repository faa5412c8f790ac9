"""``python -m duoserve_core.predict``: see :mod:`duoserve_core.predict.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
