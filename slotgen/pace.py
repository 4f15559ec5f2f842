"""Time estimates that never extrapolate one-time costs.

The first chunk of a render pays for compilation (``--compile``), lazy initialisation and cache warm-up;
a compiled model can recompile while its memory grows to its steady size. :class:`SteadyPace` therefore
ignores the first ``skip`` items and gives a pace only once the last ``window`` items agree (each within
``tolerance`` of their median); until then there is no estimate rather than a wrong one.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class SteadyPace:
    """Seconds per item from steady-state items only (see the module docstring)."""

    skip: int = 1
    window: int = 3
    tolerance: float = 0.25
    seconds: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.seconds.append(float(seconds))

    @property
    def per_item(self) -> float | None:
        """The median of the last ``window`` items once they agree, else None."""
        recent = self.seconds[self.skip:][-self.window:]
        if len(recent) < self.window:
            return None
        mid = statistics.median(recent)
        if mid <= 0 or any(abs(s - mid) > self.tolerance * mid for s in recent):
            return None
        return mid

    def remaining(self, items_left: int) -> float | None:
        """Seconds for ``items_left`` more items at the steady pace; None until there is one."""
        pace = self.per_item
        return None if pace is None else pace * max(0, items_left)


def clock(seconds: float | None) -> str:
    """``1:05:03`` / ``4:07`` for an estimate, ``-`` for none."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, m = divmod(s, 3600)
    return f"{h}:{m // 60:02d}:{s % 60:02d}" if h else f"{m // 60}:{s % 60:02d}"
