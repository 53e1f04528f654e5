"""How slap answers SIGINT and SIGTERM: one line, exit 128 + the signal number, no half-written output.

Before a command runs (and while it imports torch) nothing has been written, so a signal exits at once
(`exit_at_once`); inside a command it raises `Stopped` (`stop_once`), so every writer's cleanup runs on the way out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

from slapcli.errors import Stopped

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Set once a command has finished: a signal from then on, while the process winds down, changes nothing (the
# output is complete), so it is ignored rather than reported as "no output was written".
finished = threading.Event()


def stop_message(signum: int) -> str:
    what = "terminated" if signum == signal.SIGTERM else "interrupted"
    return f"{what}: no output was written; rerun the same command to continue"


def exit_at_once(signum: int, frame: object) -> None:
    # Nothing has been written yet, so there is nothing to clean up; exiting at once also skips the teardown of
    # half-imported native libraries (torch), which a raised exception would go through.
    if finished.is_set():
        return
    os.write(2, f"{stop_message(signum)}\n".encode())
    os._exit(128 + signum)


def stop_once(signum: int, frame: object) -> None:
    # Later signals are ignored: they would cut short the cleanup the first one started (temporary files
    # being removed on the way out). SIGKILL still stops everything, and resume covers that too.
    if finished.is_set():
        return
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Stopped(signum)


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[int, object], None]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to `handler` inside the block, then put back what was there."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    # A signal the caller ignores stays ignored (SIGINT in a background job), and so does a handler that
    # someone else installed; only the defaults and our own handlers are replaced.
    ours = (signal.default_int_handler, signal.SIG_DFL, exit_at_once, stop_once)
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS if signal.getsignal(signum) in ours}
    for signum in previous:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def importing() -> contextlib.AbstractContextManager[None]:
    """Around a command's imports of the stages (torch, transformers: seconds): a signal meanwhile exits at once
    with the same one line, not through a traceback from deep inside an import."""
    return on_stop_signals(exit_at_once)
