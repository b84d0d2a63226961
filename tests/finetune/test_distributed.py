"""--nproc on the CPU: two gloo processes, each on half of every batch, give the losses and the adapter of one
process on the whole batch (within float tolerance: the gradient sums are reordered)."""

from __future__ import annotations

import random

import pytest
from safetensors.torch import load_file

from qtool.config.finetune_schema import FinetuneConfig
from qtool.core.errors import QtoolError
from qtool.finetune.distributed import check_nproc, run_distributed
from qtool.finetune.job import FinetuneJob, run_finetune


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path, make_tiny_model_dir, tiny_words):
    model_dir = make_tiny_model_dir(tmp_path / "tiny", seed=9, num_hidden_layers=1, initializer_range=0.2)
    rng = random.Random(3)
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(" ".join(rng.choice(tiny_words) for _ in range(rng.randint(3, 12))) for _ in range(24)))
    # odd row counts per batch: one process takes one row more than the other
    settings = FinetuneConfig(rank=4, alpha=8, lr=2e-2, seqlen=24, batch_tokens=72, max_steps=3, packing=False)
    one = run_finetune(FinetuneJob(str(model_dir), str(data), tmp_path / "one", settings, device="cpu"))
    reports = []
    two = run_distributed(FinetuneJob(str(model_dir), str(data), tmp_path / "two", settings, device="cpu"), nproc=2, progress=reports.append)
    assert two.train.losses == pytest.approx(one.train.losses, rel=1e-5)
    assert [r.step for r in reports] == [1, 2, 3]
    expected = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for name in expected:
        assert (expected[name] - got[name]).abs().max() <= 1e-5 * max(1.0, expected[name].abs().max()), name


def test_nproc_is_checked():
    with pytest.raises(QtoolError, match="--nproc 0 is out of range"):
        check_nproc(0, "cpu")
