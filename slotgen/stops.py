"""How a long command stops: the one place the CLI's commands share their signal handling.

The first SIGINT (Ctrl-C), SIGTERM or SIGHUP (the terminal closed) asks the command to stop at its next
safe point: a render finishes its chunk, closes playable videos and writes a snapshot; a training run
writes its checkpoint. A second signal aborts at once (``KeyboardInterrupt``), keeping what the last
checkpoint sealed. Either way the command exits 130 with one line saying what stays and how to go on.
``kill -9`` cannot be caught: the last periodic checkpoint (``--snapshot-every``, ``--checkpoint-every``)
is what resumes.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from slotgen.render import InterruptGuard

EXIT_INTERRUPTED = 130
"""The exit status of every stopped command (128 + SIGINT, what shells report for Ctrl-C)."""


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def say(message: str) -> None:
    """One line on stderr; nothing (no exception) when stderr is gone (a closed terminal)."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class _AtOnce(InterruptGuard):
    """The first signal aborts: for a command with no safe point to stop at (nothing written until its end)."""

    def _handle(self, signum, frame) -> None:
        self.signum = signum  # the next call of the base handler raises KeyboardInterrupt
        super()._handle(signum, frame)


@contextmanager
def stoppable(notice: Callable[[str], str], aborted: str, *, at_once: bool = False) -> Iterator[InterruptGuard]:
    """``with stoppable(lambda sig: "...", "...") as should_stop:`` the block runs with SIGINT/SIGTERM/SIGHUP
    caught: the first prints ``notice(SIGNAME)`` and makes ``should_stop()`` true; a second aborts the
    block, prints ``aborted`` and exits 130 (``SystemExit``). ``at_once``: the first signal aborts (a
    command that writes its result only at its end, atomically, and has no checkpoint to write)."""
    with (_AtOnce if at_once else InterruptGuard)(lambda signum: say(notice(signal_name(signum)))) as guard:
        try:
            yield guard
        except KeyboardInterrupt:
            guard._previous = {s: signal.SIG_IGN for s in guard._previous}  # exiting: a late signal changes nothing
            say(aborted)
            raise SystemExit(EXIT_INTERRUPTED) from None
