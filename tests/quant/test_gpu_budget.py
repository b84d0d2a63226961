"""`qtool quantize --gpu-memory`: the allocator fraction set for the run and put back however it ends, the memory
plan made for the budget, refusals off CUDA; on a GPU, a budgeted run writes the unbudgeted run's checkpoint."""

from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import transformers
from typer.testing import CliRunner

from qtool.cli.main import app
from qtool.config.schema import CalibrationConfig, QuantConfig
from qtool.core.errors import QtoolError
from qtool.models import rules
from qtool.quant.gpu_budget import gpu_memory_budget
from qtool.quant.pipeline import quantize_model

GIB = 1 << 30


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA's allocator queries stood in for (this machine has no GPU): a card of a random size, whose per-process
    fraction the test reads back."""
    card = SimpleNamespace(total=random.randint(16, 141) * GIB, fraction=1.0, sets=[])

    def set_fraction(fraction, index):
        card.fraction = fraction
        card.sets.append((round(fraction, 6), index))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=card.total))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: card.fraction, raising=False)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (card.total - GIB, card.total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    return card


def test_the_budget_holds_inside_the_run_and_the_previous_fraction_comes_back(fake_cuda):
    budget = random.randint(2, fake_cuda.total // GIB - 2) * GIB
    fake_cuda.fraction = 0.9  # someone's earlier cap, to be restored
    with gpu_memory_budget(torch.device("cuda"), budget) as fraction:
        assert fraction == pytest.approx(budget / fake_cuda.total)
        # the memory plan reads the budget as the free memory
        assert rules.device_free_memory(torch.device("cuda")) == pytest.approx(budget, abs=1)
    assert fake_cuda.fraction == 0.9
    assert fake_cuda.sets == [(round(budget / fake_cuda.total, 6), 0), (0.9, 0)]


def test_the_previous_fraction_comes_back_when_the_run_fails(fake_cuda):
    with pytest.raises(RuntimeError, match="in the run"):
        with gpu_memory_budget(torch.device("cuda", 0), 4 * GIB):
            assert fake_cuda.fraction < 1.0
            raise RuntimeError("in the run")
    assert fake_cuda.fraction == 1.0


def test_a_budget_not_below_the_card_sets_nothing(fake_cuda):
    with gpu_memory_budget(torch.device("cuda"), fake_cuda.total) as fraction:
        assert fraction is None
    with gpu_memory_budget(torch.device("cuda"), None) as fraction:
        assert fraction is None
    assert fake_cuda.sets == []


def test_the_plan_follows_the_budget(fake_cuda):
    """A 7B-shaped job: with the card free the activations and the replay's recordings stay on it; under the bench's
    budget for the 12 GB goal (10.5 GiB for the allocator) the plan keeps the activations there, in the forwards'
    bfloat16 (compute_dtype auto on a GPU at this width), drops the replay, and its estimate fits the budget."""
    config = QuantConfig(compute_dtype="auto", calibration=CalibrationConfig(samples=128, seqlen=2048))
    stats = rules.ModelStats.from_config(transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                                                  num_attention_heads=32, vocab_size=32000))
    fake_cuda.total = 80 * GIB
    free = rules.estimate_peak_memory(config, stats, "cuda", device_free_bytes=rules.device_free_memory(torch.device("cuda")))
    assert (free["activation_tier"], free["replay"]) == ("device", True)
    assert free["components"]["activations"] == 128 * 2048 * 4096 * 2 * 2  # inputs and outputs, bfloat16
    budget = int(10.5 * GIB)
    with gpu_memory_budget(torch.device("cuda"), budget):
        held = rules.estimate_peak_memory(config, stats, "cuda", device_free_bytes=rules.device_free_memory(torch.device("cuda")))
    assert (held["activation_tier"], held["replay"]) == ("device", False)
    assert held["device_bytes"] <= budget < free["device_bytes"]


def test_activations_are_kept_in_the_forwards_16_bit_dtype():
    """GPTQ keeps the activations between layers in a 16-bit compute dtype (so the estimate counts 2 bytes), EXL2 and
    float32 forwards in float32."""
    stats = rules.ModelStats.from_config(transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                                  num_attention_heads=4, vocab_size=100))
    sizes = {}
    for dtype, fmt in (("float32", "gptq"), ("bfloat16", "gptq"), ("float16", "gptq"), ("bfloat16", "exl2")):
        config = QuantConfig(compute_dtype=dtype, output_format=fmt)
        sizes[dtype, fmt] = rules.estimate_peak_memory(config, stats, "cpu")["components"]["activations"]
        assert rules.activation_dtype(config, torch.device("cpu"), 64).itemsize * 2 * stats.hidden * 128 * 512 == sizes[dtype, fmt]
    assert sizes["bfloat16", "gptq"] == sizes["float16", "gptq"] == sizes["float32", "gptq"] // 2 == sizes["bfloat16", "exl2"] // 2


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_the_stored_activations_have_the_planned_dtype(tmp_path, tiny_model_dir, calibration_text, compute_dtype, monkeypatch):
    """What the run hands its activation store between layers is in the dtype the estimate counted."""
    from qtool.quant import activation_store

    seen = []
    original = activation_store.ActivationStore.store

    def store(self, tensors):
        tensors = list(tensors)
        seen.extend(t.dtype for t in tensors)
        return original(self, tensors)

    monkeypatch.setattr(activation_store.ActivationStore, "store", store)
    config = QuantConfig(compute_dtype=compute_dtype, calibration=CalibrationConfig(source=str(calibration_text), samples=3, seqlen=16))
    quantize_model(str(tiny_model_dir), config, tmp_path / "out", device="cpu")
    assert seen and set(seen) == {getattr(torch, compute_dtype)}


def test_a_budget_off_cuda_is_refused_with_one_line(tmp_path, tiny_model_dir, calibration_text):
    config = QuantConfig(calibration=CalibrationConfig(source=str(calibration_text), samples=2, seqlen=16))
    with pytest.raises(QtoolError, match="--gpu-memory applies to a CUDA compute device"):
        quantize_model(str(tiny_model_dir), config, tmp_path / "out", device="cpu", gpu_memory_bytes=12 * 10**9)
    assert not (tmp_path / "out").exists()
    runner = CliRunner()
    for flags, message in ((["--device", "cpu", "--gpu-memory", "12GB"], "--gpu-memory applies to a CUDA"),
                           (["--gpu-memory", "lots"], "--gpu-memory 'lots' is not a size")):
        result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--output", str(tmp_path / "out"), *flags])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_budgeted_gpu_run_writes_the_unbudgeted_checkpoint(tmp_path, make_tiny_model_dir, calibration_text):
    model_dir = make_tiny_model_dir(tmp_path / "model", num_hidden_layers=2, seed=random.randint(0, 999))
    config = replace(QuantConfig(calibration=CalibrationConfig(source=str(calibration_text), samples=8, seqlen=32)),
                     bits=3, group_size=32)
    free = quantize_model(str(model_dir), config, tmp_path / "free", device="cuda")
    budget = 256 << 20
    torch.cuda.reset_peak_memory_stats()
    held = quantize_model(str(model_dir), config, tmp_path / "held", device="cuda", gpu_memory_bytes=budget)
    assert torch.cuda.max_memory_reserved() <= budget
    assert torch.cuda.get_per_process_memory_fraction(torch.cuda.current_device()) == 1.0
    assert held.memory["estimate"]["device_bytes"] <= budget
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "held" / name).read_bytes() == (tmp_path / "free" / name).read_bytes(), name
    assert free.quantized_linears == held.quantized_linears
