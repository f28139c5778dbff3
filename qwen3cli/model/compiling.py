"""When numba compiles: its "numba:compile" event fires only on a cache miss (a kernel loaded
from the on-disk cache raises none), so a front end can say "compiling" exactly while it is,
for whichever kernels the model's layouts turn out to use, and skip a warm-up otherwise.

A list of kernel names to check for cached entries goes stale as layouts change (one did: it
checked Q8_0's kernels only, so every start of a file of another type warmed up again).
"""

from __future__ import annotations

from typing import Callable

from numba.core import event

KIND = "numba:compile"


class CompileWatch(event.Listener):
    """Counts compilations and calls `started()` / `ended()` around each outermost one (a
    kernel's compile compiles the functions it calls inside its own event)."""

    def __init__(self, started: Callable[[], None] = lambda: None, ended: Callable[[], None] = lambda: None):
        self.count = 0
        self._depth = 0
        self._started, self._ended = started, ended

    def on_start(self, ev) -> None:
        self._depth += 1  # events arrive under numba's global compiler lock: no races here
        if self._depth == 1:
            self.count += 1
            self._started()

    def on_end(self, ev) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._ended()

    def install(self) -> CompileWatch:
        """Listen for the rest of the process (kernels can first compile long after load)."""
        event.register(KIND, self)
        return self

    def remove(self) -> None:
        event.unregister(KIND, self)

