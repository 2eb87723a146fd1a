"""Stop long work cleanly on SIGINT / SIGTERM.

A cluster scheduler sends SIGTERM before it preempts a job and a person presses Ctrl-C; both
should end a run at the next point where its files are consistent, not in the middle of a write.
Long loops run inside ``stop_on_signals()`` and call ``stop.check()`` at their safe points, after
saving what a rerun needs. ``Interrupted`` is an ``FsarError``: the CLI prints its one line and
exits with ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), as shells do.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fsar.errors import FsarError

RERUN_HINT = "interrupted: rerun the same command to resume"


class Interrupted(FsarError):
    """The run stopped at a safe point because a signal arrived."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"{RERUN_HINT} ({name}{'; ' + detail if detail else ''})")


class StopRequest:
    """Set by the installed handlers; polled by the loop at its safe points."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self, detail: str = "") -> None:
        """Raise ``Interrupted`` if a signal arrived since the loop started."""
        if self.signum is not None:
            raise Interrupted(self.signum, detail)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block SIGINT and SIGTERM only record a stop request.

    A second SIGINT while a stop is pending raises ``KeyboardInterrupt`` at once, so a person can
    still break out of a loop that is stuck. Outside the main thread (where handlers cannot be
    installed) the block does nothing and signals keep their default behaviour.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, _frame: object) -> None:
        if stop.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
