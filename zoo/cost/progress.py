"""Progress bars for the steps a person waits for, with an ETA from what they cost before.

Compiling, generating keys and running one image in real FHE are single calls that report
nothing while they run. :func:`waiting` shows a bar that fills against an expected duration
(the cost model's estimate, or the time the same step took when the build was made) and says
``elapsed<remaining``; without an estimate it shows the elapsed time only. Bars go to stderr and
are hidden when stderr is not a terminal (tqdm's ``disable=None``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

TICK_SECONDS = 0.5


@contextlib.contextmanager
def waiting(
    desc: str, expected_seconds: float | None = None, disable: bool | None = None
) -> Iterator[None]:
    """A bar for the duration of the ``with`` block, filling against ``expected_seconds``."""
    from tqdm.auto import tqdm

    total = round(expected_seconds, 1) if expected_seconds else None
    fmt = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} (expected {total:.0f} s)"
    bar = tqdm(total=total, desc=desc, disable=disable, leave=False,
               bar_format=fmt if total else "{desc}: {elapsed}")  # fmt: skip
    done = threading.Event()
    started = time.perf_counter()

    def tick() -> None:
        while not done.wait(TICK_SECONDS):
            elapsed = time.perf_counter() - started
            bar.n = min(elapsed, total * 0.99) if total else elapsed
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()
