"""``python -m ajpq.cli``: the ``ajpq`` console script."""

from ajpq.cli import main

raise SystemExit(main())
