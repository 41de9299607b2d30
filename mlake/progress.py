"""Progress bars with counts and rates, for terminals and for logs.

On a terminal (stderr is a TTY, or bars are asked for) a bar is a ``tqdm`` bar.  Elsewhere (a
job's log file, a background run, CI) tqdm would print nothing useful, so a bar is a
:class:`LogBar`: one log line with the count, the total, the rate and the latest status every
10% of the total and at the end.  ``mlake pipeline`` and the single-analysis commands (``mlake
trace``, ``mlake lens``, ``mlake neurons``, ``mlake edit transfer``, ``mlake probe``) share it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any


class LogBar:
    """A progress bar as log lines: the count, the total, the rate and the latest status
    (``set_postfix_str``), every 10% of the total and at the end."""

    def __init__(self, desc: str, total: int | None, unit: str, log: Callable[[str], None]):
        self.desc, self.total, self.unit, self.log = desc, total, unit, log
        self.n = 0
        self.started = time.perf_counter()
        self._next = 0.1
        self._status = ""

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.total and self.n / self.total >= self._next:
            self._next = math.floor(10 * self.n / self.total) / 10 + 0.1
            self._say()

    def reset(self, total: int | None = None) -> None:
        self.total, self.n, self._next = total, 0, 0.1

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        del refresh
        self._status = text

    def _say(self) -> None:
        seconds = time.perf_counter() - self.started
        rate = self.n / seconds if seconds > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        status = f" ({self._status})" if self._status else ""
        self.log(f"{self.desc}: {self.n}{of} {self.unit}s, {rate:.2f} {self.unit}/s{status}")

    def close(self) -> None:
        if self.n and (not self.total or self.n < self.total):
            self._say()


class Bars:
    """Makes progress bars: tqdm on stderr when it is a terminal (or ``enabled``), else
    :class:`LogBar` log lines through ``log``."""

    def __init__(self, enabled: bool | None, log: Callable[[str], None]) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.log = log

    def __call__(self, desc: str, total: int | None, unit: str) -> Any:
        if not self.enabled:
            return LogBar(desc, total, unit, self.log)
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{desc:<10}", unit=unit, dynamic_ncols=True)


def progress_bar(desc: str, total: int | None, unit: str, log: Callable[[str], None]) -> Any:
    """A bar for one command's work: tqdm on a terminal, else log lines through ``log``."""
    return Bars(None, log)(desc, total, unit)
