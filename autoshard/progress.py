"""The planning progress display: what the planner is doing, on stderr, while a plan takes time.

Planning a large step takes seconds to minutes, and a user who sees nothing cannot tell a slow
solve from a hang. Once a plan has taken ``DELAY`` seconds, each phase and solver message is
shown: on a terminal as one line rewritten in place (name, elapsed seconds, phase, latest
message), as users know from tqdm, with a ticker that keeps the seconds moving between messages;
elsewhere (a log file, CI) as plain lines, one per message. Nothing is shown for a plan that
takes less. ``compile(..., progress=False)`` or ``AUTOSHARD_PROGRESS=0`` silences it; messages
go to the ``autoshard`` logger either way.

The display never decides anything: the clock only chooses when to print.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import sys
import threading
import time
from typing import Iterator, TextIO

#: Seconds a plan runs before the display shows anything.
DELAY = 1.0
#: Seconds between ticks of the terminal line's clock.
TICK = 0.5

_current: contextvars.ContextVar["PlanningProgress | None"] = contextvars.ContextVar(
    "autoshard_progress", default=None)


def progress_enabled(requested: bool | None) -> bool:
    """``compile``'s ``progress``: True or False as given; None reads ``AUTOSHARD_PROGRESS``
    (on unless it is "0", "false", "no" or "off")."""
    if requested is not None:
        return bool(requested)
    return os.environ.get("AUTOSHARD_PROGRESS", "1").strip().lower() not in (
        "0", "false", "no", "off")


class PlanningProgress:
    """The display for one plan of the step ``name``, writing to ``stream``."""

    def __init__(self, name: str, stream: TextIO | None = None):
        self.name = name
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.phase_name = "tracing"
        self.message = ""
        self.shown = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def phase(self, name: str, detail: str = "") -> None:
        self.phase_name, self.message = name, detail
        self._show()

    def report(self, message: str) -> None:
        self.message = message
        self._show()

    def close(self, summary: str) -> None:
        """Stop the ticker; where anything was shown, end with ``summary``."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            if not self.shown:
                return
            if self.terminal:
                self.stream.write("\r\033[K")
            self.stream.write(f"autoshard: {summary}\n")
            self.stream.flush()

    # -- drawing -------------------------------------------------------------------------------

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        text = f"autoshard: planning {self.name} [{elapsed:5.1f}s] {self.phase_name}"
        return text + (f": {self.message}" if self.message else "")

    def _show(self) -> None:
        if time.monotonic() - self.start < DELAY:
            return
        with self._lock:
            self.shown = True
            if self.terminal:
                width = shutil.get_terminal_size((100, 20)).columns
                self.stream.write("\r\033[K" + self._line()[:max(width - 1, 20)])
            else:
                self.stream.write(self._line() + "\n")
            self.stream.flush()
        if self.terminal and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(TICK):
            with self._lock:
                width = shutil.get_terminal_size((100, 20)).columns
                self.stream.write("\r\033[K" + self._line()[:max(width - 1, 20)])
                self.stream.flush()


@contextlib.contextmanager
def planning(name: str, enabled: bool, stream: TextIO | None = None
             ) -> Iterator[PlanningProgress | None]:
    """The display for planning ``name`` while the block runs (None when not ``enabled``, or
    inside another plan's display: a nested plan reports to the outer one)."""
    outer = _current.get()
    if not enabled or outer is not None:
        yield outer if enabled else None
        return
    display = PlanningProgress(name, stream)
    token = _current.set(display)
    summary = f"planned {name}"
    try:
        yield display
        summary = f"planned {name} in {time.monotonic() - display.start:.1f}s"
    except BaseException:
        summary = f"planning {name} stopped after {time.monotonic() - display.start:.1f}s"
        raise
    finally:
        _current.reset(token)
        display.close(summary)


def phase(name: str, detail: str = "") -> None:
    """Enter phase ``name`` of the plan being displayed (nothing when none is)."""
    display = _current.get()
    if display is not None:
        display.phase(name, detail)


def report(message: str) -> None:
    """Show ``message`` (a solver's or a pass's) on the plan being displayed."""
    display = _current.get()
    if display is not None:
        display.report(message)
