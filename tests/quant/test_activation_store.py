"""The activation store: each tier gives back the values it was given (any dtype, odd shapes), the disk tier from
memory-mapped files in a folder beside the output that is gone after the run, also after an interruption; and a
quantization forced onto each tier writes the same checkpoint."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qtool.config.schema import CalibrationConfig, QuantConfig
from qtool.core.errors import QtoolError
from qtool.quant.activation_store import ActivationStore, check_free_disk
from qtool.quant.pipeline import quantize_model


def random_activations(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 13, 97), (2, 5, 97), (1, 1, 97)]
    tensors = [torch.randn(shape, generator=g) for shape in shapes]
    return [tensors[0], tensors[1].to(torch.bfloat16), tensors[2].to(torch.float16)]


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_every_tier_returns_what_it_was_given(tmp_path, tier):
    with ActivationStore(tier, torch.device("cpu"), tmp_path / "out") as store:
        for generation in range(3):
            given = random_activations(generation)
            stored = store.store(given)
            assert len(stored) == len(given)
            for a, b in zip(stored, given):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                assert a.data_ptr() != b.data_ptr() or tier != "disk"
            if tier == "disk":
                # one file per generation: the previous one is gone, this one holds the tensors (64-byte aligned)
                files = list(store.folder.iterdir())
                assert [f.name for f in files] == [f"activations-{generation + 1:05d}.bin"]
                assert files[0].stat().st_size >= sum(t.numel() * t.element_size() for t in given)
                assert store.folder.parent == tmp_path and store.folder.name.startswith(".out.activations-")
        folder = store.folder
    if tier == "disk":
        assert not folder.exists()
    assert not any(tmp_path.iterdir())


def test_disk_tensors_read_from_the_file(tmp_path):
    store = ActivationStore("disk", torch.device("cpu"), tmp_path / "out")
    (stored,) = store.store([torch.arange(11, dtype=torch.float32)])
    file = next(store.folder.iterdir())
    raw = torch.frombuffer(bytearray(file.read_bytes()[:44]), dtype=torch.float32)
    assert torch.equal(raw, torch.arange(11, dtype=torch.float32))  # the values are in the file, not only in memory
    store.close()
    assert not store.folder.exists()
    assert torch.equal(stored, torch.arange(11, dtype=torch.float32))  # the mapping outlives the removed file


def test_unknown_tier_is_one_line():
    with pytest.raises(QtoolError, match="activation tier 'gpu' is not known") as raised:
        ActivationStore("gpu", torch.device("cpu"))
    assert "device, host, disk" in raised.value.hint


def test_a_disk_tier_larger_than_the_free_space_is_refused_before_any_work(tmp_path):
    exabyte = 1 << 60
    with pytest.raises(QtoolError, match="GiB free") as raised:
        ActivationStore("disk", torch.device("cpu"), tmp_path / "out", disk_bytes=exabyte)
    assert str(tmp_path) in str(raised.value) and "--samples" in raised.value.hint
    assert not list(tmp_path.iterdir()), "a refused store leaves no folder"
    # the plan's figure is checked against the nearest existing folder when the output's does not exist yet
    with pytest.raises(QtoolError, match="GiB free"):
        check_free_disk(tmp_path / "not" / "yet", exabyte)
    with ActivationStore("disk", torch.device("cpu"), tmp_path / "out", disk_bytes=1 << 20) as store:
        assert store.folder.is_dir()
    # the other tiers hold nothing on disk: no check
    ActivationStore("host", torch.device("cpu"), tmp_path / "out", disk_bytes=exabyte).close()


@pytest.fixture
def config(make_calibration_text, tmp_path) -> QuantConfig:
    calibration = make_calibration_text(tmp_path / "calibration.txt")
    return replace(QuantConfig(calibration=CalibrationConfig(source=str(calibration), samples=6, seqlen=23, seed=3)), bits=3, group_size=32)


def checkpoint_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_each_tier_writes_the_same_checkpoint(tmp_path, tiny_model_dir, config):
    results = {tier: quantize_model(str(tiny_model_dir), config, tmp_path / tier, device="cpu", activation_tier=tier) for tier in ("host", "disk", "device")}
    reference = checkpoint_files(tmp_path / "host")
    for tier, result in results.items():
        assert result.memory["estimate"]["activation_tier"] == ("host" if tier == "device" else tier)  # on the CPU the device is the host
        assert checkpoint_files(tmp_path / tier) == reference, tier
    assert not list(tmp_path.glob(".*activations-*"))


def test_an_interrupted_disk_run_leaves_no_activation_folder(tmp_path, tiny_model_dir, config):
    seen_folders: list[Path] = []

    def interrupt(done: int, total: int, detail: str = "") -> None:
        seen_folders.extend(tmp_path.glob(".out.activations-*"))
        if detail.startswith("layer 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(str(tiny_model_dir), config, tmp_path / "out", device="cpu", activation_tier="disk", progress=interrupt)
    assert seen_folders  # the folder existed while the run went on
    assert not list(tmp_path.glob(".out.activations-*"))


def test_a_bad_tier_fails_before_any_work(tmp_path, tiny_model_dir, config):
    with pytest.raises(QtoolError, match="activation tier 'ram' is not known"):
        quantize_model(str(tiny_model_dir), config, tmp_path / "out", device="cpu", activation_tier="ram")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_each_tier_writes_the_same_checkpoint_on_the_gpu(tmp_path, tiny_model_dir, config):
    for tier in ("device", "host", "disk"):
        result = quantize_model(str(tiny_model_dir), config, tmp_path / tier, device="cuda", activation_tier=tier)
        assert result.memory["estimate"]["activation_tier"] == tier and result.memory["peak_device_bytes"] > 0
    reference = checkpoint_files(tmp_path / "device")
    assert checkpoint_files(tmp_path / "host") == reference and checkpoint_files(tmp_path / "disk") == reference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_tier_pins_its_tensors_for_a_gpu(tmp_path):
    with ActivationStore("host", torch.device("cuda")) as store:
        (stored,) = store.store([torch.randn(3, 7, 5, device="cuda")])
        assert stored.device.type == "cpu" and stored.is_pinned() and store.describe() == "in pinned host memory"
