"""``python -m server serve ...``, the same as the ``ditcache`` command."""

from server.cli import main

raise SystemExit(main())
