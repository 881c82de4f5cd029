"""``python -m server serve ...``, the same as the ``ditcache`` command."""

from .cli import main

raise SystemExit(main())
