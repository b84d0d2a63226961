"""StepWriter: saves queue and run on another thread, one at a time and in order, while the run goes on; a save's
error reaches the run's thread and drops the saves queued behind it; leaving the block waits for every queued save,
also when the run fails."""

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


def test_submit_returns_while_the_saves_before_it_still_run():
    release, done = threading.Event(), []
    with StepWriter() as writer:
        writer.submit(lambda: (release.wait(5), done.append(1)))
        writer.submit(lambda: done.append(2))  # queued behind the first, which is still waiting
        assert done == []
        release.set()
        writer.wait()
        assert done == [1, 2]


def test_a_failed_save_drops_the_queued_ones_and_is_raised_once_then_later_saves_run():
    done = []

    def fail() -> None:
        raise OSError("disk full (injected by the test)")

    with StepWriter() as writer:
        writer.submit(fail)
        writer.submit(lambda: done.append(1))  # builds on the failed one: dropped
        with pytest.raises(OSError, match="disk full"):
            writer.wait()
        writer.submit(lambda: done.append(2))
    assert done == [2]
    with StepWriter() as writer:
        writer.submit(fail)
        writer._queue.join()
        with pytest.raises(OSError, match="disk full"):
            writer.submit(lambda: done.append(3))  # the error comes first, the save is not queued
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
            writer.submit(lambda: done.append("queued"))
            threading.Timer(0.05, release.set).start()
            raise KeyboardInterrupt  # the run stops: the saves in flight and queued still end before the block is left
    assert done == ["saved", "queued"]
