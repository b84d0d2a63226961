"""`--nproc N`: calibration batches split across processes, Hessians summed over them, each GPTQ solve run once
and broadcast. The Hessian sum must not depend on the split, and two gloo processes must write the bytes one
process writes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qtool.config.schema import CalibrationConfig, QuantConfig
from qtool.core.errors import QtoolError
from qtool.quant.distributed import contiguous_shares
from qtool.quant.hessian import HessianAccumulator
from qtool.quant.pipeline import quantize_model
from qtool.quant.work_state import WorkState


def recorded(store: list[torch.Tensor]):
    """An all_reduce stand-in that only records what it is given (a process's contribution)."""
    return lambda tensor: store.append(tensor.clone())


def adding(others: list[torch.Tensor]):
    """An all_reduce stand-in for two processes: adds the other process's contribution, in call order."""
    pending = iter(others)
    return lambda tensor: tensor.add_(next(pending))


def accumulate(batches: list[torch.Tensor], k: int) -> HessianAccumulator:
    acc = HessianAccumulator(k, float64_sum=True)
    for batch in batches:
        acc.add_batch(batch)
    return acc


@pytest.mark.parametrize("k", [37, 769])  # 769: the blocked upper-triangle path
def test_hessian_sum_does_not_depend_on_the_split(k):
    gen = torch.Generator().manual_seed(k)
    mix = torch.randn(k, k, generator=gen) / k**0.5
    # uneven batches with an offset and an outlier feature, as LLM activations have
    batches = [(torch.randn(n, k, generator=gen) @ mix + 0.3) for n in (5, 130, 64, 1, 77, 200)]
    for batch in batches:
        batch[:, 3] *= 40.0
    whole = accumulate(batches, k)
    tokens = torch.cat(batches).double()
    reference = 2.0 * tokens.T @ tokens / tokens.shape[0]
    assert whole.hessian.dtype == torch.float32
    assert torch.allclose(whole.hessian.double(), reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())
    for cut in range(1, len(batches)):
        first, second = accumulate(batches[:cut], k), accumulate(batches[cut:], k)
        contribution: list[torch.Tensor] = []
        second.all_reduce(recorded(contribution))
        first.all_reduce(adding(contribution))
        assert first.num_tokens == whole.num_tokens
        assert torch.equal(first.hessian, whole.hessian), f"split after batch {cut}"


def test_all_reduce_needs_float64_sums():
    with pytest.raises(ValueError, match="float64_sum"):
        HessianAccumulator(8).all_reduce(lambda t: None)


@pytest.mark.parametrize("weights,parts", [([5, 1, 1, 1, 5], 2), ([1] * 7, 3), ([4, 4], 3), ([3], 1), ([2, 9, 2, 2, 2, 2], 4)])
def test_contiguous_shares_cover_every_item_once(weights, parts):
    shares = contiguous_shares(weights, parts)
    assert len(shares) == parts
    assert [i for share in shares for i in share] == list(range(len(weights)))
    # no share is larger than an even split plus one item
    for share in shares:
        assert sum(weights[i] for i in share) <= sum(weights) / parts + max(weights)


def job(calibration_text: Path, **fields) -> QuantConfig:
    # 24 windows of 256 tokens: two batches of the layer runner (4096 tokens each at most), split unevenly
    calibration = CalibrationConfig(source=str(calibration_text), samples=24, seqlen=256, seed=0)
    return replace(QuantConfig(calibration=calibration), **fields)


def written_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix in (".safetensors", ".json") and p.name != "tokenizer.json"}


def test_two_gloo_processes_write_the_one_process_checkpoint(tmp_path, calibration_text, make_tiny_model_dir):
    model_dir = make_tiny_model_dir(tmp_path / "model", num_hidden_layers=3)
    config = job(calibration_text, bits=3, group_size=32, desc_act=True, sym=False)
    assert contiguous_shares([16 * 256, 8 * 256], 2) == [range(0, 1), range(1, 2)]  # each process gets a batch
    single = quantize_model(str(model_dir), config, tmp_path / "one", device="cpu")
    seen: list[tuple[int, int, str]] = []
    double = quantize_model(str(model_dir), config, tmp_path / "two", device="cpu", nproc=2,
                            progress=lambda done, total, detail="": seen.append((done, total, detail)))
    one, two = written_files(tmp_path / "one"), written_files(tmp_path / "two")
    assert "model.safetensors" in one and sorted(one) == sorted(two)
    for name in one:
        assert one[name] == two[name], name
    assert (double.quantized_linears, double.layers, double.calibration_tokens) == (single.quantized_linears, 3, 24 * 256)
    assert [m.name for m in double.modules] == [m.name for m in single.modules]  # rank 0 reports every module
    assert [m.error for m in double.modules] == [m.error for m in single.modules]
    assert (3, 3, "layer 3/3") in seen  # rank 0's progress reached the caller
    assert not WorkState.folder_for(tmp_path / "two").exists()


class Interrupt(Exception):
    pass


@pytest.mark.slow  # two more process launches (each imports torch and transformers)
def test_interrupted_two_process_run_resumes_in_one_process(tmp_path, calibration_text, make_tiny_model_dir):
    """Two processes leave the state one process leaves (every sample's hidden states): either resumes it."""
    model_dir = make_tiny_model_dir(tmp_path / "model", num_hidden_layers=2, seed=4)
    config = job(calibration_text, bits=4, group_size=32)

    def stop_after_first_layer(done: int, total: int, detail: str = "") -> None:
        if done == 1 and detail.startswith("layer"):
            raise Interrupt

    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        quantize_model(str(model_dir), config, out, device="cpu", nproc=2, progress=stop_after_first_layer)
    assert not out.exists()
    assert json.loads((WorkState.folder_for(out) / "job.json").read_text())["completed_layers"] == 1
    resumed = quantize_model(str(model_dir), config, out, device="cpu")
    assert resumed.resumed_from_layer == 1
    quantize_model(str(model_dir), config, tmp_path / "straight", device="cpu")
    assert written_files(out) == written_files(tmp_path / "straight")


@pytest.mark.slow  # a process launch
def test_a_process_error_is_one_line(tmp_path, calibration_text, make_tiny_model_dir):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / name).unlink(missing_ok=True)
    with pytest.raises(QtoolError, match=r"has no tokenizer .*process \d of 2"):
        quantize_model(str(model_dir), job(calibration_text), tmp_path / "out", device="cpu", nproc=2)
    assert not (tmp_path / "out").exists()


def test_nproc_refusals(tmp_path, calibration_text, tiny_model_dir):
    with pytest.raises(QtoolError, match="--nproc 2 with method rtn"):
        quantize_model(str(tiny_model_dir), job(calibration_text, method="rtn"), tmp_path / "out", device="cpu", nproc=2)
    with pytest.raises(QtoolError, match="--nproc 0"):
        quantize_model(str(tiny_model_dir), job(calibration_text), tmp_path / "out", device="cpu", nproc=0)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_nccl_processes_write_the_one_gpu_checkpoint(tmp_path, calibration_text, make_tiny_model_dir):
    model_dir = make_tiny_model_dir(tmp_path / "model", num_hidden_layers=2)
    config = job(calibration_text, bits=4, group_size=32, desc_act=True)
    quantize_model(str(model_dir), config, tmp_path / "one", device="cuda")
    quantize_model(str(model_dir), config, tmp_path / "two", device="cuda", nproc=2)
    assert written_files(tmp_path / "one") == written_files(tmp_path / "two")
