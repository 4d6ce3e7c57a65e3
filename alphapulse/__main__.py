"""``python -m alphapulse``: the same entry point as the ``alphapulse`` console script."""

from alphapulse.cli import main

raise SystemExit(main())
