"""Stop a run cleanly when the scheduler asks: SIGTERM (Slurm, Kubernetes, spot preemption) or SIGINT.

Inside ``with StopRequest() as stop:`` the first signal only sets ``stop.signal_name``, and the request holds until
the process stops: the run finishes what ``stop.doing`` names (the current optimizer step, then a checkpoint; the
replay pool; the task's evaluation and folder; the report), then exits with ``EXIT_STOPPED``. A second signal restores
the handlers that were there before and re-sends itself, so it acts at once as it would have without us (SIGTERM ends
the process, SIGINT raises ``KeyboardInterrupt``); a re-run resumes from what was written.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType


# the exit status of a run stopped by a signal after writing its checkpoint: EX_TEMPFAIL, "try again later"
EXIT_STOPPED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A context manager that turns the first SIGTERM/SIGINT into a request (``signal_name``) the loop polls."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.doing = "the current optimizer step, then saving a checkpoint"  # what finishes before the stop
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None:  # the second one: act as if we had never been here
            self._restore()
            os.kill(os.getpid(), signum)
            return
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name} received: finishing {self.doing}, then stopping (send it again to stop at once)",
            flush=True,
        )
