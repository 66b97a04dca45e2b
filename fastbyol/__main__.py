"""`python -m fastbyol ...` is the `fastbyol` command."""

from .cli import main

raise SystemExit(main())
