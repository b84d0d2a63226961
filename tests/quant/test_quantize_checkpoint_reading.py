"""Checkpoints written by `qtool quantize`, read back by a dequantizer written from the GPTQ format description
alone (conftest.dequantize_gptq_file_tensors), not by qtool's reader: the weights qtool's loader computes with are
the weights the file holds, for every bit width, act order, asym (v1 and v2) and a partial last group. On
SmolLM2, `qtool eval` of the checkpoint gives the independent reader's perplexity."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from qtool.cli.main import app
from qtool.config.schema import CalibrationConfig, QuantConfig
from qtool.data.text import load_eval_text
from qtool.eval.perplexity import perplexity
from qtool.kernels.quant_linear import QuantLinear
from qtool.quant.pipeline import quantize_model
from qtool.checkpoints.sources import load_model


def read_tensors(out: Path) -> dict:
    tensors = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize(
    "fields",
    [
        dict(bits=2, group_size=64, sym=False),
        dict(bits=3, group_size=64, sym=False, desc_act=True, checkpoint_format="gptq_v2"),
        dict(bits=4, group_size=64, desc_act=True, refine_scales=True),
        dict(bits=8, group_size=-1, sym=False),
    ],
    ids=["2bit-asym-v1", "3bit-asym-actorder-v2", "4bit-actorder-refined", "8bit-perchannel-asym"],
)
def test_loaded_weights_are_the_file_weights(tmp_path, tiny_model_dir, calibration_text, gptq_file_dequantizer, independent_float_model, fields):
    calibration = CalibrationConfig(source=str(calibration_text), samples=8, seqlen=32, seed=0)
    out = tmp_path / "out"
    quantize_model(str(tiny_model_dir), replace(QuantConfig(calibration=calibration), **fields), out, device="cpu")
    tensors = read_tensors(out)
    loaded = load_model(str(out), device="cpu", dtype="float32").model
    checked = 0
    for name, module in loaded.named_modules():
        if isinstance(module, QuantLinear):
            expected = gptq_file_dequantizer(tensors, name, fields["bits"], fields.get("checkpoint_format", "gptq"))
            torch.testing.assert_close(module.dequantized_weight(torch.float32), expected, rtol=0, atol=1e-6)
            checked += 1
    assert checked == 14
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(5))
    reference = independent_float_model(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.slow
def test_smollm2_qtool_eval_matches_independent_reader(tmp_path, smollm2_path, independent_float_model):
    """A short calibration (the protocol's file, fewer windows) and two eval windows keep this to minutes."""
    out = tmp_path / "smollm2-w4"
    runner = CliRunner()
    result = runner.invoke(app, [
        "quantize", "smollm2-135m", "--bits", "4", "--group-size", "128", "--no-sym", "--output", str(out),
        "--calibration", str(SHARED_DATA / "wikitext-2" / "wiki.valid.tokens"), "--samples", "16", "--seqlen", "256",
        "--seed", "0", "--json",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quantized_linears"] == 30 * 7 and report["layers"] == 30
    text_file = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
    result = runner.invoke(app, ["eval", str(out), "--perplexity", str(text_file), "--windows", "2", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    qtool_ppl = json.loads(result.stdout)["ppl"]
    reference = independent_float_model(out)
    tokenizer = load_model(str(out), device="cpu", dtype="float32").tokenizer
    independent_ppl = perplexity(reference, tokenizer, load_eval_text(str(text_file)), seqlen=2048, windows=2).ppl
    assert abs(qtool_ppl - independent_ppl) < 0.01
    # 4-bit with a short calibration: worse than float (about 20 on these windows), far from broken
    assert 15 < independent_ppl < 40
