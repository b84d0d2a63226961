"""A run's finished steps saved on a thread of their own, so that writing a layer's results (and, at the cadence,
the hidden states: hundreds of MB to GBs for a 7B, with an fsync and a checksum each) overlaps the next layer's
work instead of adding to it. One save is in flight at a time and they run in order, so the saved state moves on
as it would without the thread; leaving the block (an error or an interruption included) waits for the save in
flight, so every step that finished is saved when the run stops."""

from __future__ import annotations

import threading
from typing import Callable


class StepWriter:
    """`with StepWriter() as writer: ... writer.submit(save) ...`"""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, save: Callable[[], None]) -> None:
        """Run save() on a new thread once the previous save has finished (its error, if any, is raised here)."""
        self.wait()

        def run() -> None:
            try:
                save()
            except BaseException as exc:  # raised on the run's thread at the next submit or wait
                self._error = exc

        self._thread = threading.Thread(target=run, name="qtool-save-step")
        self._thread.start()

    def wait(self) -> None:
        """Wait for the save in flight; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> "StepWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.wait()
            return
        try:  # the run already failed: its error is the one to see; the save in flight still finishes
            self.wait()
        except BaseException:
            pass
