"""``python -m duoserve_core.predict``: see :mod:`duoserve_core.predict.cli`."""

from .cli import main

raise SystemExit(main())
