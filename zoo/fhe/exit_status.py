"""Keep a failing process's exit status after concrete's runtime has run a circuit.

concrete registers an exit hook (``concrete.compiler._terminate_df_parallelization``) that ends
the process with status 0 once a circuit has run or been simulated in it: a ``zoo`` command, or
a test session, that fails afterwards would report success (seen: ``sys.exit(3)`` after one
``encrypt_run_decrypt`` left status 0). :func:`keep` drops that hook before a failing exit, so
that Python's own exit carries the status; a successful exit keeps concrete's clean teardown.
"""

from __future__ import annotations

import atexit
import sys


def keep(status: object) -> None:
    """Before exiting with ``status`` (a ``SystemExit.code``): if it is a failure, unregister
    concrete's exit hook so that the process ends with it."""
    if status in (None, 0):
        return
    compiler = sys.modules.get("concrete.compiler")
    hook = getattr(compiler, "_terminate_df_parallelization", None)
    if hook is not None:
        atexit.unregister(hook)
