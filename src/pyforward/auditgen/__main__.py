"""``python -m pyforward.auditgen``: see `pyforward.auditgen.cli`."""

from pyforward.auditgen.cli import main

raise SystemExit(main())
