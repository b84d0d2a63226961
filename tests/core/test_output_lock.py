"""output_lock between real processes: a second holder is refused at once with the first one's pid, and the lock
goes with its holder's death (an OS lock, not a file that says so)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qtool.core.errors import QtoolError
from qtool.core.output_lock import lock_file_for, output_lock

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from pathlib import Path
from qtool.core.output_lock import output_lock
with output_lock(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(600)
"""


def start_holder(output: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_a_second_process_is_refused_until_the_first_dies(tmp_path):
    out = tmp_path / "out"
    holder = start_holder(out)
    try:
        with pytest.raises(QtoolError, match=rf"another qtool run is writing {out} \(pid {holder.pid}\)"):
            with output_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the lock file stays, the OS lock does not
        holder.wait()
    assert lock_file_for(out).exists()
    with output_lock(out):
        assert lock_file_for(out).read_text() == f"{os.getpid()}\n"
    assert not lock_file_for(out).exists()
    assert not out.exists()


def test_a_lock_is_refused_within_one_process_too(tmp_path):
    # flock locks belong to open files, not processes: a nested run in this process must not slip through
    with output_lock(tmp_path / "out"):
        with pytest.raises(QtoolError, match=f"pid {os.getpid()}"):
            with output_lock(tmp_path / "out"):
                pass


def test_unwritable_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(QtoolError, match="cannot write to the folder"):
        with output_lock(tmp_path / "file" / "out"):
            pass
