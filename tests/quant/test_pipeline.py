"""The quantize pipeline end to end on a tiny random Llama: checkpoint contents, GPTQ against RTN, resume after an
interruption (bit-identical output), atomic output and --force, linears the GPTQ layout cannot hold."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtool.core.errors import QtoolError
from qtool.config.schema import CalibrationConfig, QuantConfig
from qtool.quant.pipeline import quantize_model
from qtool.quant.work_state import WorkState
from qtool.checkpoints.sources import load_model


def job(calibration_text: Path, samples: int = 8, seqlen: int = 32, **fields) -> QuantConfig:
    calibration = CalibrationConfig(source=str(calibration_text), samples=samples, seqlen=seqlen, seed=0)
    return replace(QuantConfig(calibration=calibration), **fields)


def mean_nll(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits.float()
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:]))


def held_out_ids(seed: int = 1, length: int = 64) -> torch.Tensor:
    """Random ids of the tiny model's vocabulary (not the calibration text)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (length,), generator=g)


def test_gptq_checkpoint_is_complete_and_loads(tmp_path, tiny_model_dir, calibration_text):
    config = job(calibration_text, bits=4, group_size=64)  # 96 columns: the last group of q/k/v/gate/up is partial
    result = quantize_model(str(tiny_model_dir), config, tmp_path / "out", device="cpu")
    out = tmp_path / "out"
    assert result.layers == 2 and result.quantized_linears == 14 and not result.skipped_linears
    assert not WorkState.folder_for(out).exists()
    written = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (written["bits"], written["group_size"], written["sym"], written["checkpoint_format"]) == (4, 64, True, "gptq")
    assert written["meta"]["qtool_config"] == config.to_dict()  # the job reads back exactly
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].shape == (96 * 4 // 32, 96)
    assert tensors["model.layers.0.self_attn.q_proj.scales"].shape == (2, 96)
    assert tensors["model.layers.1.mlp.down_proj.scales"].shape == (3, 96)
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    quantized = load_model(str(out), device="cpu", dtype="float32").model
    float_model = load_model(str(tiny_model_dir), device="cpu", dtype="float32").model
    ids = held_out_ids()
    assert math.isfinite(mean_nll(quantized, ids))
    # 4-bit of a random model: close to the float model, not equal to it
    with torch.no_grad():
        a, b = quantized(ids.unsqueeze(0)).logits, float_model(ids.unsqueeze(0)).logits
    assert not torch.equal(a, b)
    assert float((a - b).abs().mean()) < 0.3 * float(b.abs().mean())


def layer_output_error(model_dir: Path, out: Path, ids: torch.Tensor) -> float:
    reference = load_model(str(model_dir), device="cpu", dtype="float32").model
    quantized = load_model(str(out), device="cpu", dtype="float32").model
    with torch.no_grad():
        return float((quantized(ids.unsqueeze(0)).logits - reference(ids.unsqueeze(0)).logits).square().mean())


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_beats_rtn_on_held_out_text(tmp_path, tiny_model_dir, calibration_text, tiny_tokenizer, bits):
    # text like the calibration text, but not of it
    import random

    rng = random.Random(7)
    words = calibration_text.read_text().split()
    text = " ".join(rng.choice(words) for _ in range(150))
    ids = torch.tensor(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    errors = {}
    for method in ("gptq", "rtn"):
        out = tmp_path / method
        quantize_model(str(tiny_model_dir), job(calibration_text, method=method, bits=bits, group_size=32, samples=16), out, device="cpu")
        errors[method] = layer_output_error(tiny_model_dir, out, ids)
    assert errors["gptq"] < errors["rtn"]


@pytest.mark.parametrize(
    "fields",
    [
        dict(bits=3, group_size=-1, sym=False, checkpoint_format="gptq_v2"),
        dict(bits=4, group_size=64, desc_act=True, static_groups=True),
        dict(bits=8, group_size=32, desc_act=True, true_sequential=False, mse=True),
        dict(bits=2, group_size=32, sym=False),
    ],
    ids=["3bit-perchannel-asym-v2", "4bit-actorder-static", "8bit-actorder-mse-parallel", "2bit-asym-v1"],
)
def test_settings_reach_the_checkpoint(tmp_path, tiny_model_dir, calibration_text, fields):
    config = job(calibration_text, **fields)
    quantize_model(str(tiny_model_dir), config, tmp_path / "out", device="cpu")
    written = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    for key in ("bits", "group_size", "sym", "desc_act", "static_groups", "true_sequential", "checkpoint_format"):
        assert written[key] == getattr(config, key), key
    model = load_model(str(tmp_path / "out"), device="cpu", dtype="float32").model
    assert math.isfinite(mean_nll(model, held_out_ids()))
    if fields.get("desc_act") and not fields.get("static_groups"):
        g_idx = load_file(str(tmp_path / "out" / "model.safetensors"))["model.layers.0.self_attn.q_proj.g_idx"]
        assert not torch.equal(g_idx, torch.arange(96, dtype=torch.int32) // fields["group_size"])


class Interrupt(Exception):
    pass


def straight_and_interrupted(tmp_path, calibration_text, make_tiny_model_dir, layers: int, stop_after: int):
    """(model, config, the output of an uninterrupted run, the output of a run stopped after layer `stop_after`)."""
    model_dir = make_tiny_model_dir(tmp_path / "model", num_hidden_layers=layers)
    config = job(calibration_text, bits=4, group_size=32, desc_act=True)
    quantize_model(str(model_dir), config, tmp_path / "straight", device="cpu")

    def stop(done: int, total: int, detail: str = "") -> None:
        if done == stop_after and detail.startswith("layer"):
            raise Interrupt

    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        quantize_model(str(model_dir), config, resumed, device="cpu", progress=stop)
    return model_dir, config, tmp_path / "straight", resumed


def test_interrupted_run_resumes_to_identical_bytes(tmp_path, calibration_text, make_tiny_model_dir):
    model_dir, config, straight, resumed = straight_and_interrupted(tmp_path, calibration_text, make_tiny_model_dir,
                                                                    layers=3, stop_after=2)
    assert not resumed.exists()  # the output appears only when complete
    assert json.loads((WorkState.folder_for(resumed) / "job.json").read_text())["completed_layers"] == 2
    result = quantize_model(str(model_dir), config, resumed, device="cpu")
    assert result.resumed_from_layer == 2
    assert (resumed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert not WorkState.folder_for(resumed).exists()


def test_large_hidden_states_are_saved_at_a_cadence_and_resume_from_the_last_save(tmp_path, calibration_text,
                                                                                    make_tiny_model_dir, monkeypatch):
    """Hidden states above HIDDEN_SAVED_EVERY_STEP_BYTES (a 7B model's 4 GiB a layer) are saved only when the work
    since the last save took SAVE_OVERHEAD_RATIO times that save: here every state counts as large and the ratio
    is out of reach, so the first layer and the last save them and the ones between write their weights alone.
    Interrupted after layer 3 of 4, the run resumes after layer 1 and redoes 2 and 3: the same bytes."""
    import qtool.quant.work_state as work_state

    monkeypatch.setattr(work_state, "HIDDEN_SAVED_EVERY_STEP_BYTES", 0)
    monkeypatch.setattr(work_state, "SAVE_OVERHEAD_RATIO", 1e9)
    monkeypatch.setattr(work_state, "ASSUMED_SAVE_BYTES_PER_SECOND", float("inf"))  # the first step: a resume point
    model_dir, config, straight, resumed = straight_and_interrupted(tmp_path, calibration_text, make_tiny_model_dir,
                                                                    layers=4, stop_after=3)
    state = json.loads((WorkState.folder_for(resumed) / "job.json").read_text())
    assert state["completed_layers"] == 1 and state["hidden_file"] == "hidden-0001.safetensors"
    assert (WorkState.folder_for(resumed) / "layer-0002.safetensors").is_file()  # written, not yet a resume point
    result = quantize_model(str(model_dir), config, resumed, device="cpu")
    assert result.resumed_from_layer == 1
    assert (resumed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()


def test_a_run_stopped_while_writing_resumes_with_every_layer_done(tmp_path, calibration_text, make_tiny_model_dir,
                                                                     monkeypatch):
    """The last layer is a resume point that saves no hidden states (no step reads them): stopped while the
    checkpoint is written, the run resumes with every layer done, from an empty hidden-state file, to the same bytes."""
    import qtool.quant.work_state as work_state

    monkeypatch.setattr(work_state, "HIDDEN_SAVED_EVERY_STEP_BYTES", 0)  # every state counts as large
    model_dir = make_tiny_model_dir(tmp_path / "model", num_hidden_layers=3)
    config = job(calibration_text, bits=4, group_size=32)
    quantize_model(str(model_dir), config, tmp_path / "straight", device="cpu")

    def stop(done: int, total: int, detail: str = "") -> None:
        if detail == "writing checkpoint":
            raise Interrupt

    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        quantize_model(str(model_dir), config, resumed, device="cpu", progress=stop)
    folder = WorkState.folder_for(resumed)
    state = json.loads((folder / "job.json").read_text())
    assert state["completed_layers"] == 3
    assert load_file(str(folder / state["hidden_file"])) == {}
    result = quantize_model(str(model_dir), config, resumed, device="cpu")
    assert result.resumed_from_layer == 3
    assert (resumed / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()


def test_changed_arguments_start_afresh(tmp_path, calibration_text, tiny_model_dir):
    out = tmp_path / "out"

    def stop_after_first_layer(done: int, total: int, detail: str = "") -> None:
        if done == 1 and detail.startswith("layer"):
            raise Interrupt

    with pytest.raises(Interrupt):
        quantize_model(str(tiny_model_dir), job(calibration_text, bits=4), out, device="cpu", progress=stop_after_first_layer)
    result = quantize_model(str(tiny_model_dir), job(calibration_text, bits=3), out, device="cpu")
    assert result.resumed_from_layer == 0


def test_existing_output_needs_force_and_survives_failure(tmp_path, tiny_model_dir, calibration_text):
    out = tmp_path / "out"
    quantize_model(str(tiny_model_dir), job(calibration_text, method="rtn"), out, device="cpu")
    (out / "keep.txt").write_text("previous")  # a qtool output (it has the marker), so --force may replace it
    with pytest.raises(QtoolError, match="already exists"):
        quantize_model(str(tiny_model_dir), job(calibration_text), out, device="cpu")
    with pytest.raises(QtoolError, match="missing.txt"):
        quantize_model(str(tiny_model_dir), job(tmp_path / "missing.txt"), out, device="cpu", force=True)

    def interrupt(done: int, total: int, detail: str = "") -> None:
        if done == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        quantize_model(str(tiny_model_dir), job(calibration_text), out, device="cpu", force=True, progress=interrupt)
    assert (out / "keep.txt").read_text() == "previous"
    quantize_model(str(tiny_model_dir), job(calibration_text), out, device="cpu", force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_linears_the_layout_cannot_hold_stay_float(tmp_path, calibration_text, make_tiny_model_dir):
    # intermediate 80 is not a multiple of 32: gate/up (out 80) and down (in 80) cannot be packed
    model_dir = make_tiny_model_dir(tmp_path / "model", intermediate_size=80)
    result = quantize_model(str(model_dir), job(calibration_text, group_size=32), tmp_path / "out", device="cpu")
    assert sorted(result.skipped_linears) == sorted(
        f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")
    )
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16
    assert "model.layers.0.mlp.up_proj.qweight" not in tensors
    written = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert any("up_proj" in pattern and pattern.startswith("-:") for pattern in written["dynamic"])
    model = load_model(str(tmp_path / "out"), device="cpu", dtype="float32").model
    assert math.isfinite(mean_nll(model, held_out_ids()))


def test_quantized_input_is_refused(tmp_path, tiny_model_dir, calibration_text):
    quantize_model(str(tiny_model_dir), job(calibration_text), tmp_path / "q", device="cpu")
    with pytest.raises(QtoolError, match="already quantized"):
        quantize_model(str(tmp_path / "q"), job(calibration_text), tmp_path / "q2", device="cpu")


def test_batch_tokens_sets_the_forward_calls_and_leaves_the_checkpoint_unchanged_on_the_cpu(tmp_path, monkeypatch, make_tiny_model_dir):
    """calibration.batch_tokens is how many calibration tokens go through a layer per call: one sample per call and
    all of them in one call give the same checkpoint on the CPU (the Hessians are per-sample sums; a sample's
    forward does not depend on its batch there)."""
    import dataclasses

    import qtool.quant.pipeline as pipeline_module

    calls = []
    real = pipeline_module.sample_batches

    def counted(inputs, max_tokens):
        batches = real(inputs, max_tokens)
        calls.append((max_tokens, len(batches)))
        return batches

    monkeypatch.setattr(pipeline_module, "sample_batches", counted)
    model_dir = make_tiny_model_dir(tmp_path / "model", num_hidden_layers=2, seed=5)
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(4000)))
    base = QuantConfig(bits=4, group_size=32, calibration=CalibrationConfig(source=str(text), samples=6, seqlen=32))
    outputs = {}
    for batch_tokens in (32, 6 * 32):
        config = dataclasses.replace(base, calibration=dataclasses.replace(base.calibration, batch_tokens=batch_tokens))
        quantize_model(str(model_dir), config, tmp_path / f"out-{batch_tokens}", device="cpu")
        # the tensors (the configs written beside them record the setting)
        outputs[batch_tokens] = {p.name: p.read_bytes() for p in (tmp_path / f"out-{batch_tokens}").glob("*.safetensors")}
    # the process's share (one process: all), then per layer: six calls of one sample, then one of six
    assert calls == [(32, 6)] * 3 + [(192, 1)] * 3
    assert outputs[32] == outputs[192] and outputs[32]
