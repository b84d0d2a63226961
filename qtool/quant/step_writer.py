"""A run's finished steps saved on a thread of their own, so that writing a layer's results (and, at the cadence,
the hidden states: hundreds of MB to GBs for a 7B, with an fsync and a checksum each) overlaps the next steps' work
instead of adding to it. Saves queue and run one at a time in the order submitted, so the saved state moves on as
it would without the thread; a save that fails drops those queued after it (each builds on the ones before) and
its error reaches the run's thread at the next submit or wait. Leaving the block (an error or an interruption
included) waits for every queued save, so every step that finished is saved when the run stops."""

from __future__ import annotations

import queue
import threading
from typing import Callable


class StepWriter:
    """`with StepWriter() as writer: ... writer.submit(save) ...`"""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, save: Callable[[], None]) -> None:
        """Queue save() behind the saves already submitted and return at once (an earlier save's error, if any,
        is raised here instead, and save is not queued)."""
        self._raise_error()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="qtool-save-step", daemon=True)
            self._thread.start()
        self._queue.put(save)

    def wait(self) -> None:
        """Wait until every queued save has run; raise the error of one that failed."""
        if self._thread is not None:
            self._queue.join()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _work(self) -> None:
        while True:
            save = self._queue.get()
            try:
                if save is None:
                    return
                if self._error is None:  # after a failure the queued saves are dropped until it is raised
                    save()
            except BaseException as exc:  # raised on the run's thread at the next submit or wait
                self._error = exc
            finally:
                self._queue.task_done()

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "StepWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self.wait()
                return
            try:  # the run already failed: its error is the one to see; the queued saves still finish
                self.wait()
            except BaseException:
                pass
        finally:
            self._stop()
