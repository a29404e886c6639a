"""`python -m trillm`: the same command line as the `trillm` script (trillm/cli.py)."""

from __future__ import annotations

from trillm.cli import main

raise SystemExit(main())
