"""`qtool tune` through the Typer app on a machine without CUDA: refused in one line (exit 2) before any model is
loaded, and a bad --batch-sizes is refused naming the flag."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from qtool.cli.main import app
from qtool.cli.tune import parse_batch_sizes

from cli_checks import one_line_error

runner = CliRunner()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
@pytest.mark.parametrize("device", [[], ["--device", "auto"], ["--device", "cpu"], ["--device", "cuda"]])
def test_without_cuda_tune_refuses_in_one_line(tmp_path, device):
    result = runner.invoke(app, ["tune", str(tmp_path / "no-such-model"), *device])
    line = one_line_error(result)
    assert "CUDA" in line and "no-such-model" not in line  # refused before the model is looked for
    assert result.stderr.strip().splitlines() == [line], "nothing else drawn (no progress bar) before the refusal"


@pytest.mark.parametrize("value", ["", "0", "1,x", "8,-2", ","])
def test_bad_batch_sizes_are_refused_naming_the_flag(tmp_path, value):
    result = runner.invoke(app, ["tune", str(tmp_path), "--batch-sizes", value])
    assert "--batch-sizes" in one_line_error(result)


def test_batch_sizes_parse():
    assert parse_batch_sizes("1,8, 64") == [1, 8, 64]
    assert parse_batch_sizes("3") == [3]
