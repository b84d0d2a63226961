"""StepWriter: saves run on another thread, one at a time and in order; a save's error reaches the run's thread;
leaving the block waits for the save in flight, also when the run fails."""

from __future__ import annotations

import random
import threading
import time

import pytest

from qtool.quant.step_writer import StepWriter


def test_saves_run_in_order_one_at_a_time_off_the_run_thread():
    done, running, threads = [], [], set()
    lock = threading.Lock()

    def save(step: int) -> None:
        with lock:
            running.append(step)
            assert len(running) == 1, running  # never two in flight
        threads.add(threading.current_thread().name)
        time.sleep(random.uniform(0, 0.01))
        with lock:
            running.remove(step)
        done.append(step)

    steps = random.randint(3, 8)
    with StepWriter() as writer:
        for step in range(steps):
            writer.submit(lambda step=step: save(step))
    assert done == list(range(steps))
    assert threads == {"qtool-save-step"}


def test_a_failed_save_is_raised_at_the_next_submit_and_later_saves_still_run():
    done = []

    def fail() -> None:
        raise OSError("disk full (injected by the test)")

    with StepWriter() as writer:
        writer.submit(fail)
        with pytest.raises(OSError, match="disk full"):
            writer.submit(lambda: done.append(1))
        writer.submit(lambda: done.append(2))
    assert done == [2]


def test_leaving_the_block_waits_for_the_save_in_flight_and_raises_its_error():
    release, done = threading.Event(), []

    def slow() -> None:
        release.wait(5)
        done.append("saved")

    with pytest.raises(OSError, match="injected"):
        with StepWriter() as writer:
            writer.submit(lambda: (_ for _ in ()).throw(OSError("injected by the test")))
    writer = StepWriter()
    with pytest.raises(KeyboardInterrupt):
        with writer:
            writer.submit(slow)
            threading.Timer(0.05, release.set).start()
            raise KeyboardInterrupt  # the run stops: the save in flight still ends before the block is left
    assert done == ["saved"]
