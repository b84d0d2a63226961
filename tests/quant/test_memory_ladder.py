"""Out of GPU memory inside a layer: the layer is redone lower down the ladder (one sample per batch, activations
on the host, the CPU), each step logged, and what it writes is what an unconstrained run writes. Tested on the CPU
by raising torch.OutOfMemoryError from inside the layer's work on the first try."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from qtool.config.schema import CalibrationConfig, QuantConfig
from qtool.core.errors import QtoolError
from qtool.quant.memory_ladder import LadderRun, climb_down, ladder
from qtool.quant.pipeline import quantize_model

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_rungs_leave_out_what_changes_nothing():
    assert [r.name for r in ladder(CPU, CPU)] == ["as planned", "with one sample per batch"]
    assert [r.name for r in ladder(GPU, CPU)] == ["as planned", "with one sample per batch", "on the CPU"]
    full = ladder(GPU, GPU)
    assert [r.name for r in full] == ["as planned", "with one sample per batch", "with the activations in host memory", "on the CPU"]
    assert [(r.storage.type, r.compute.type) for r in full] == [("cuda", "cuda"), ("cuda", "cuda"), ("cpu", "cuda"), ("cpu", "cpu")]
    assert full[0].max_batch_tokens is None and all(r.max_batch_tokens == 1 for r in full[1:])


def test_climb_down_restores_and_logs_each_step(caplog):
    rungs = ladder(GPU, GPU)
    tried, restored = [], []

    def attempt(rung):
        tried.append(rung.name)
        if len(tried) < 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "done"

    with caplog.at_level(logging.WARNING, logger="qtool.quant.memory_ladder"):
        result, index = climb_down(rungs, 0, attempt, lambda: restored.append(1), "layer 3/8")
    assert (result, index, len(restored)) == ("done", 2, 2)
    assert tried == [r.name for r in rungs[:3]]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["layer 3/8: out of GPU memory as planned; redoing it with one sample per batch",
                        "layer 3/8: out of GPU memory with one sample per batch; redoing it with the activations in host memory"]
    # a run that started lower starts there; one that runs out on the last rung is one line
    with pytest.raises(QtoolError, match="layer 1/2: out of memory even on the CPU"):
        climb_down(rungs, 3, lambda rung: (_ for _ in ()).throw(torch.OutOfMemoryError("no")), lambda: None, "layer 1/2")
    with pytest.raises(ValueError):  # anything else is not the ladder's business
        climb_down(rungs, 0, lambda rung: (_ for _ in ()).throw(ValueError("bug")), lambda: None, "layer 1/2")


def test_a_failed_attempts_tensors_are_gone_before_the_restore_and_the_next_rung():
    """What a failed attempt held (its frames live on in the error's traceback) is freed before restore() and the
    cache is emptied: on a GPU those tensors would otherwise count against every rung below."""
    import gc
    import weakref

    rungs = ladder(GPU, GPU)
    held: list[weakref.ref] = []
    alive_at_restore: list[bool] = []

    def attempt(rung):
        scratch = torch.empty(1024)  # stands for a batch's activations on the GPU
        held.append(weakref.ref(scratch))
        if len(held) < 3:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return "done"

    def restore():
        gc.collect()  # only reference cycles wait for this; the traceback's frames must already be unreachable
        alive_at_restore.append(held[-1]() is not None)

    assert climb_down(rungs, 0, attempt, restore, "layer 1/1") == ("done", 2)
    assert alive_at_restore == [False, False]


class GpuStore:
    """Stands for a store on the GPU (only its `device` is read before a host rung replaces it)."""

    device = GPU
    tier = "device"


@pytest.mark.parametrize("batched", [True, False])
def test_a_pass_moves_its_activations_to_a_host_store_once_and_stays_on_its_rung(batched, caplog):
    # a GPU store with CPU compute: the host rung is the one that changes where activations live
    moved, tried = [], []
    run = LadderRun(GpuStore(), CPU, lambda store: moved.append(store))
    assert [r.name for r in run.rungs] == ["as planned", "with one sample per batch", "with the activations in host memory"]

    def work(rung):
        tried.append(rung.name)
        if rung.storage.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory (a test's)")
        return rung.max_batch_tokens

    with caplog.at_level(logging.WARNING, logger="qtool.quant.memory_ladder"):
        assert run.climb("the head", work, lambda: None, batched=batched) == 1
    # work without batches of samples skips the rung that only makes them smaller
    assert tried == (["as planned", "with one sample per batch"] if batched else ["as planned"]) + ["with the activations in host memory"]
    assert len(caplog.records) == len(tried) - 1 and caplog.records[-1].getMessage().endswith("redoing it with the activations in host memory")
    assert len(moved) == 1 and moved[0] is run.store and run.store.tier == "host" and run.store.device == CPU
    # the next piece of work starts where the pass stands: no second move
    tried.clear()
    assert run.climb("layer 2/2", work, lambda: None) == 1 and tried == ["with the activations in host memory"] and len(moved) == 1


def test_oom_inside_a_layer_redoes_it_to_the_same_bytes(tmp_path, make_tiny_model_dir, calibration_text, caplog):
    model_dir = make_tiny_model_dir(tmp_path / "model", num_hidden_layers=3, seed=2)
    # 8 samples of 32 tokens run as one batch as planned, as eight on the ladder's next rung
    config = replace(QuantConfig(calibration=CalibrationConfig(source=str(calibration_text), samples=8, seqlen=32)),
                     bits=3, group_size=32, desc_act=True)
    quantize_model(str(model_dir), config, tmp_path / "free", device="cpu")
    raised = []

    def out_of_memory_once(done: int, total: int, detail: str = "") -> None:
        # the second group of layer 2: the first group's weights are already changed when it strikes
        if detail == "layer 2/3 o_proj" and not raised:
            raised.append(detail)
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    with caplog.at_level(logging.WARNING, logger="qtool.quant.memory_ladder"):
        quantize_model(str(model_dir), config, tmp_path / "squeezed", device="cpu", progress=out_of_memory_once)
    assert raised and [r.getMessage() for r in caplog.records] == [
        "layer 2/3: out of GPU memory as planned; redoing it with one sample per batch"]
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "squeezed" / name).read_bytes() == (tmp_path / "free" / name).read_bytes(), name


def test_peak_estimate_is_reported_before_the_run_and_is_validates(tmp_path, tiny_model_dir, calibration_text):
    from qtool.checkpoints.sources import load_model
    from qtool.models.rules import ModelStats, estimate_peak_memory, validate_for_hardware

    config = replace(QuantConfig(calibration=CalibrationConfig(source=str(calibration_text), samples=5, seqlen=32)), bits=4, group_size=32)
    seen: list[str] = []
    result = quantize_model(str(tiny_model_dir), config, tmp_path / "out", device="cpu", progress=lambda d, t, detail="": seen.append(detail))
    stats = ModelStats.from_config(load_model(str(tiny_model_dir), with_tokenizer=False).model.config)
    estimate = estimate_peak_memory(config, stats, "cpu", streaming=True)  # the weights of a local directory are streamed
    assert result.estimated_peak_memory_bytes == estimate["cpu_bytes"] == result.memory["estimate"]["cpu_bytes"] > 0
    first_layer = next(i for i, detail in enumerate(seen) if detail.startswith("layer"))
    assert any(detail.startswith("estimated peak memory") for detail in seen[:first_layer])
    # validate's rule judges that same number; with less memory it takes a plan that holds less, and fails only
    # below the most frugal one (activations on disk)
    (fits,) = validate_for_hardware(config, stats, "cpu", cpu_free_bytes=estimate["cpu_bytes"], streaming=True)
    frugal = estimate_peak_memory(config, stats, "cpu", streaming=True, cpu_free_bytes=0)
    assert frugal["activation_tier"] == "disk" and frugal["cpu_bytes"] < estimate["cpu_bytes"]
    (short,) = validate_for_hardware(config, stats, "cpu", cpu_free_bytes=frugal["cpu_bytes"] - 1, streaming=True)
    assert fits.level.name == "INFO" and short.level.name == "ERROR"
    # two processes: each holds the float model and half the samples (rounded up)
    two = estimate_peak_memory(config, stats, "cuda", processes=2)
    one = estimate_peak_memory(replace(config, calibration=replace(config.calibration, samples=3)), stats, "cuda")
    assert two["cpu_bytes"] == 2 * one["cpu_bytes"] and two["device_bytes"] == one["device_bytes"]
