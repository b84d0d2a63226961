"""Outputs of `quantize` that can't be mixed or lost: one run per output (an OS lock), never over an input, --force
only over what qtool wrote, and a resume state that is checked before use and saved after every layer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from qtool.config.schema import CalibrationConfig, QuantConfig
from qtool.core.errors import QtoolError
from qtool.quant.pipeline import quantize_model
from qtool.quant.work_state import WorkState

REPO = Path(__file__).resolve().parents[2]


def job(calibration_text: Path, seed: int = 0, **fields) -> QuantConfig:
    calibration = CalibrationConfig(source=str(calibration_text), samples=8, seqlen=32, seed=seed)
    return replace(QuantConfig(calibration=calibration), **{"bits": 4, "group_size": 32, **fields})


class Interrupt(Exception):
    pass


def stop_after(layers: int):
    def progress(done: int, total: int, detail: str = "") -> None:
        if done == layers and detail.startswith("layer"):
            raise Interrupt
    return progress


def weights(directory: Path) -> bytes:
    return (directory / "model.safetensors").read_bytes()


@pytest.fixture
def three_layers(tmp_path, make_tiny_model_dir, calibration_text):
    """A 3-layer model and the checkpoint of an uninterrupted run of `job`."""
    model_dir = make_tiny_model_dir(tmp_path / "model", num_hidden_layers=3)
    quantize_model(str(model_dir), job(calibration_text), tmp_path / "straight", device="cpu")
    return model_dir, tmp_path / "straight"


def test_a_second_run_on_the_same_output_fails_at_once(tmp_path, three_layers, calibration_text):
    model_dir, straight = three_layers
    out = tmp_path / "out"
    refused = []

    def start_a_second_run(done: int, total: int, detail: str = "") -> None:
        if done == 1 and detail.startswith("layer") and not refused:
            with pytest.raises(QtoolError) as excinfo:
                quantize_model(str(model_dir), job(calibration_text, seed=1), out, device="cpu")
            refused.append(excinfo.value.message)

    quantize_model(str(model_dir), job(calibration_text), out, device="cpu", progress=start_a_second_run)
    assert refused == [f"another qtool run is writing {out} (pid {os.getpid()})"]
    assert weights(out) == weights(straight)  # the first run's layers alone, none of the second's


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dataclasses import replace
    from qtool.config.schema import CalibrationConfig, QuantConfig
    from qtool.quant.pipeline import quantize_model

    model, calibration, out = sys.argv[1:4]
    config = replace(QuantConfig(calibration=CalibrationConfig(source=calibration, samples=8, seqlen=32, seed=0)), bits=4, group_size=32)

    def hang_after_first_layer(done, total, detail=""):
        if done == 1 and detail.startswith("layer"):
            print("holding", flush=True)
            time.sleep(600)

    quantize_model(model, config, Path(out), device="cpu", progress=hang_after_first_layer)
""")


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path, three_layers, calibration_text):
    model_dir, straight = three_layers
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(model_dir), str(calibration_text), str(out)],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "holding"
        # the first layer's save runs on the child's save thread, after its progress report: wait for it to land
        state = WorkState.folder_for(out) / "job.json"
        deadline = time.monotonic() + 60
        while not (state.exists() and json.loads(state.read_text())["completed_layers"] == 1):
            assert time.monotonic() < deadline, "the child never saved its first layer"
            time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(QtoolError, match=rf"another qtool run is writing .*out \(pid {child.pid}\)"):
            quantize_model(str(model_dir), job(calibration_text), out, device="cpu")
        assert time.monotonic() - started < 10  # at once, not after loading and calibrating
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    result = quantize_model(str(model_dir), job(calibration_text), out, device="cpu")  # the dead holder's lock is gone
    assert result.resumed_from_layer == 1
    assert weights(out) == weights(straight)


def test_output_equal_to_inside_or_around_the_input_is_refused(tmp_path, tiny_model_dir, calibration_text):
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    for output, message in [(tiny_model_dir, "is the input"), (tiny_model_dir / "q", "inside the input"),
                            (tmp_path, "input .* is inside the output")]:
        with pytest.raises(QtoolError, match=message):
            quantize_model(str(tiny_model_dir), job(calibration_text), output, device="cpu", force=True)
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before


def test_force_replaces_only_what_qtool_wrote(tmp_path, tiny_model_dir, calibration_text):
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "holiday.jpg").write_text("keep me")
    with pytest.raises(QtoolError, match="qtool did not write") as excinfo:
        quantize_model(str(tiny_model_dir), job(calibration_text, method="rtn"), unrelated, device="cpu", force=True)
    assert str(unrelated) in excinfo.value.message
    assert (unrelated / "holiday.jpg").read_text() == "keep me"

    out = tmp_path / "out"
    quantize_model(str(tiny_model_dir), job(calibration_text, method="rtn"), out, device="cpu")
    marker = json.loads((out / ".qtool-output.json").read_text())
    assert marker["written_by"] == "qtool"
    quantize_model(str(tiny_model_dir), job(calibration_text, method="rtn", bits=8), out, device="cpu", force=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8


def test_state_is_saved_after_every_layer(tmp_path, three_layers, calibration_text):
    model_dir, straight = three_layers
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        quantize_model(str(model_dir), job(calibration_text), out, device="cpu", progress=stop_after(1))
    result = quantize_model(str(model_dir), job(calibration_text), out, device="cpu")
    assert result.resumed_from_layer == 1
    assert weights(out) == weights(straight)


def test_a_damaged_state_is_discarded_with_a_warning(tmp_path, three_layers, calibration_text, caplog):
    model_dir, straight = three_layers
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        quantize_model(str(model_dir), job(calibration_text), out, device="cpu", progress=stop_after(2))
    layer = WorkState.folder_for(out) / "layer-0000.safetensors"
    layer.write_bytes(layer.read_bytes()[:100])  # truncated, as by a full disk
    result = quantize_model(str(model_dir), job(calibration_text), out, device="cpu", force=True)
    assert result.resumed_from_layer == 0
    assert weights(out) == weights(straight)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "layer-0000.safetensors" in warnings[0] and "starting over" in warnings[0]


def test_discard_resume_starts_over(tmp_path, three_layers, calibration_text):
    model_dir, straight = three_layers
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        quantize_model(str(model_dir), job(calibration_text), out, device="cpu", progress=stop_after(2))
    result = quantize_model(str(model_dir), job(calibration_text), out, device="cpu", discard_resume=True)
    assert result.resumed_from_layer == 0
    assert weights(out) == weights(straight)
