"""How the command line reports a failure: one line on a line of its own, and the exit status.

``fsar.cli.main`` decides which failures are expected (``FsarError``, ``OSError``, YAML syntax);
these helpers say them in one line, keep them off a live progress bar and handle a reader of
our output that went away (``fsar cache info STORE | head``).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import traceback

# torch re-raises a DataLoader worker's exception with the worker's traceback in its message
WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def describe_error(err: BaseException) -> str:
    """One line naming an expected failure; an OSError as ``path: reason`` (e.g. ``No space left
    on device``, ``Read-only file system``, ``Not a directory``)."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        paths = [str(err.filename)] + ([str(err.filename2)] if err.filename2 is not None else [])
        text = f"{' -> '.join(paths)}: {err.strerror}"
    elif isinstance(err, OSError) and err.strerror:
        text = err.strerror
    else:
        text = str(err) or type(err).__name__
    if WORKER_TRACEBACK in text:  # re-raised from a DataLoader worker: keep the worker's message
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def error_line(line: str, debug: bool) -> None:
    """Print ``line`` to stderr on a line of its own (after the traceback with FSAR_DEBUG)."""
    close_progress_bars()
    if debug:
        traceback.print_exc()
    print(line, file=sys.stderr)


def close_progress_bars() -> None:
    """A live tqdm bar leaves the cursor after its text: close it so the error starts a line."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None:
        return
    for bar in list(getattr(tqdm.tqdm, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()
    sys.stderr.flush()


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (not some other broken pipe)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or stdout has no descriptor
        return False


def stdout_closed() -> int:
    """The reader of our output went away (``fsar cache info STORE | head``): stop quietly.

    Python's documented recipe: point stdout at devnull so the flush at exit does not raise again.
    The exit status is the one a program killed by SIGPIPE reports to shells (128 + 13).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE
