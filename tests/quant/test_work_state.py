"""WorkState on its own: checksums recorded as steps are saved, a damaged, missing or foreign state discarded
with one warning line, --discard-resume honoured, and a resumable state reopened as it was."""

import json
import logging

import pytest
import torch

from qtool.quant.work_state import STATE_FILE, WorkState


def saved_state(tmp_path, steps: int = 3) -> WorkState:
    state = WorkState.open(tmp_path / "out", "job-a")
    for index in range(steps):
        state.save_step(index, {"w": torch.full((4,), float(index))}, {"i": str(index)}, [torch.full((2, 3), float(index + 1))])
    return state


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_every_step_is_saved_with_its_checksum(tmp_path, caplog):
    state = saved_state(tmp_path)
    saved = json.loads((state.path / STATE_FILE).read_text())
    assert saved["completed_layers"] == 3 and saved["hidden_file"] == "hidden-0003.safetensors"
    assert sorted(saved["checksums"]) == ["hidden-0003.safetensors", "layer-0000.safetensors", "layer-0001.safetensors", "layer-0002.safetensors"]
    assert sorted(p.name for p in state.path.iterdir()) == sorted([STATE_FILE, *saved["checksums"]])  # old hidden states gone
    reopened = WorkState.open(tmp_path / "out", "job-a")
    assert reopened.completed_layers == 3 and torch.equal(reopened.load_hidden()[0], torch.full((2, 3), 3.0))
    assert torch.equal(reopened.load_step(1)[0]["w"], torch.full((4,), 1.0))
    assert warnings(caplog) == []


@pytest.mark.parametrize("damage,says", [
    (lambda path: (path / "layer-0001.safetensors").write_bytes((path / "layer-0001.safetensors").read_bytes()[:50]),
     "damaged (layer-0001.safetensors does not match its checksum)"),
    (lambda path: (path / "hidden-0003.safetensors").unlink(), "missing hidden-0003.safetensors"),
    (lambda path: (path / STATE_FILE).write_text("{\"finger"), "unreadable"),
])
def test_a_damaged_state_starts_over_with_one_warning(tmp_path, caplog, damage, says):
    state = saved_state(tmp_path)
    damage(state.path)
    reopened = WorkState.open(tmp_path / "out", "job-a")
    assert reopened.completed_layers == 0 and [p.name for p in reopened.path.iterdir()] == [STATE_FILE]
    [line] = warnings(caplog)
    assert says in line and str(state.path) in line and "starting over" in line


def test_other_arguments_and_discard_start_over(tmp_path, caplog):
    saved_state(tmp_path)
    assert WorkState.open(tmp_path / "out", "job-b").completed_layers == 0
    assert "from a run with other arguments" in warnings(caplog)[-1]
    saved_state(tmp_path / "again")
    assert WorkState.open(tmp_path / "again" / "out", "job-a", discard=True).completed_layers == 0
    assert "discarded (--discard-resume)" in warnings(caplog)[-1]


def test_the_first_resume_point_waits_for_ten_projected_saves_of_work():
    """Before any save is timed, large hidden states are projected to save at ASSUMED_SAVE_BYTES_PER_SECOND: the
    first step is a resume point only once the run has worked SAVE_OVERHEAD_RATIO such saves' time; the last step
    always is; small states always are."""
    import random
    import time

    from qtool.quant import work_state

    hidden = random.randint(2, 8) << 30
    projected = work_state.SAVE_OVERHEAD_RATIO * hidden / work_state.ASSUMED_SAVE_BYTES_PER_SECOND
    cadence = work_state.HiddenSaveCadence()
    assert not cadence.due(0, 32, hidden)
    assert cadence.due(31, 32, hidden) and cadence.due(0, 32, work_state.HIDDEN_SAVED_EVERY_STEP_BYTES)
    cadence.since -= projected * 1.01  # the run has worked a little longer than ten projected saves
    assert cadence.due(5, 32, hidden)
    cadence.saved(began=time.monotonic() - 0.5)  # a timed save of 0.5 s: from now on the ratio reads that
    assert not cadence.due(6, 32, hidden)
    cadence.since -= work_state.SAVE_OVERHEAD_RATIO * 0.5 * 1.01
    assert cadence.due(7, 32, hidden)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_saved_form_is_compact_on_the_host_and_equal(bits):
    """What the save thread is handed: uint8 codes, int32 zeros and g_idx, all in host memory, values unchanged."""
    from qtool.formats.quantized_weight import QuantizedWeight
    from qtool.quant.work_state import saved_form

    out, cols, group = int(torch.randint(1, 9, ())), 64, 32
    qw = QuantizedWeight(codes=torch.randint(0, 1 << bits, (out, cols), dtype=torch.int32), scales=torch.rand(cols // group, out),
                         zeros=torch.randint(0, 1 << bits, (cols // group, out), dtype=torch.int64),
                         g_idx=torch.arange(cols) // group, bits=bits, group_size=group)
    saved = saved_form(qw)
    assert saved.codes.dtype == torch.uint8 and saved.zeros.dtype == saved.g_idx.dtype == torch.int32
    assert all(t.device.type == "cpu" for t in (saved.codes, saved.scales, saved.zeros, saved.g_idx))
    assert torch.equal(saved.dequantize(), qw.dequantize())


def test_save_with_several_processes_takes_the_main_decision_and_gathers():
    """The GPTQ pipeline's form of HiddenSaveCadence.save: the decision comes from `agree` (the main process's),
    the hidden states through `gather` at a resume point before the last step, and a process without `write`
    still enters both collectives."""
    from qtool.quant.step_writer import StepWriter
    from qtool.quant.work_state import HiddenSaveCadence

    hidden = [torch.randn(3, 5)]
    big = 64 << 30  # never due by itself this early in the run
    for agreed, index, write_here in [(True, 2, True), (False, 2, True), (True, 2, False), (True, 7, True)]:
        calls: list[str] = []
        written: list = []

        def gather(local):
            calls.append("gather")
            return local + [torch.zeros(1)]

        def agree(due, agreed=agreed):
            calls.append(f"agree {due}")
            return agreed

        with StepWriter() as writer:
            HiddenSaveCadence().save(index, 8, hidden, written.append if write_here else None, writer, hidden_bytes=big,
                                     agree=agree, gather=gather)
        assert calls[0] == f"agree {index + 1 == 8}"  # the last step is always a resume point
        resume_point = agreed and index + 1 < 8
        assert calls[1:] == (["gather"] if resume_point else [])
        if not write_here:
            assert written == []
        elif not agreed:
            assert written == [None]
        else:
            assert len(written) == 1 and len(written[0]) == (2 if resume_point else 0)
