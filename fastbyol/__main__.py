"""`python -m fastbyol ...` is the `fastbyol` command.

Python puts the current folder first on `sys.path` for `-m` (unless -P or PYTHONSAFEPATH): standing in a run folder or
a dataset, a file there named like a module fastbyol imports later (numpy.py, tqdm.py, an --arch module) would run.
That first entry is dropped before anything else is imported, so `python -m fastbyol` imports what the `fastbyol`
command does; a folder of your own encoders is named explicitly (PYTHONPATH=.).
"""

import os
import sys


def _drop_implicit_cwd() -> None:
    if sys.flags.safe_path or not sys.path:
        return
    try:
        implicit = os.path.realpath(sys.path[0] or os.curdir) == os.path.realpath(os.getcwd())
    except OSError:  # the current folder is gone: nothing can be imported from it anyway
        implicit = True
    if implicit:
        del sys.path[0]


_drop_implicit_cwd()

from .cli import main  # noqa: E402  (after the path is cleaned)

raise SystemExit(main())
