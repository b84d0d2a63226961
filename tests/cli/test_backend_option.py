"""`--backend auto|torch|triton` on `qtool eval` and `qtool run` through the Typer app: a tiny GPTQ checkpoint gives
the same perplexity and the same greedy reply through the Triton kernels (the interpreter on a machine without
CUDA) as through the torch reference; a bad name is refused before anything loads."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from typer.testing import CliRunner

from qtool.cli.main import app
from qtool.checkpoints.gptq_checkpoint import save_quantized_model
from qtool.quant.rtn import rtn_quantize

from cli_checks import refused_choice

runner = CliRunner()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def checkpoint(tmp_path, make_tiny_llama, make_tiny_tokenizer):
    """A 4-bit g32 RTN checkpoint of a random tiny Llama whose weights are wide enough (std 0.1) to matter."""
    directory = tmp_path / "tiny-gptq"
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(seed=5, vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    quantized = {
        name: rtn_quantize(module.weight, bits=4, group_size=32, sym=False).quantized
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }
    save_quantized_model(directory, model, quantized, tokenizer=tokenizer)
    return directory


@pytest.fixture
def text_file(tmp_path, tiny_words):
    rng = random.Random(3)
    path = tmp_path / "text.txt"
    path.write_text(" ".join(rng.choice(tiny_words) for _ in range(400)))
    return path


def invoke_json(args, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qtool.kernels"):
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    if "triton" in args:  # the kernels really served: the load logged the choice and no fallback
        assert "triton: requested" in caplog.text and "fallback" not in caplog.text, caplog.text
    return json.loads(result.stdout)


def test_eval_perplexity_is_the_same_through_triton_and_torch(checkpoint, text_file, caplog):
    common = ["eval", str(checkpoint), "--perplexity", str(text_file), "--windows", "1", "--seqlen", "40", "--device", DEVICE, "--dtype", "bfloat16", "--json"]
    torch_ppl = invoke_json(common + ["--backend", "torch"], caplog)["ppl"]
    triton_ppl = invoke_json(common + ["--backend", "triton"], caplog)["ppl"]
    assert 1.0 < torch_ppl < 1e4
    assert abs(triton_ppl - torch_ppl) / torch_ppl < 5e-3, (triton_ppl, torch_ppl)


def test_run_greedy_reply_is_the_same_through_triton_and_torch(checkpoint, caplog):
    # float32: the Triton backend dequantizes exactly what the reference does, so greedy decoding cannot diverge
    common = ["run", str(checkpoint), "--prompt", "the quick fox", "--raw", "--temperature", "0", "--max-new-tokens", "5", "--device", DEVICE, "--dtype", "float32", "--json"]
    by_torch = invoke_json(common + ["--backend", "torch"], caplog)
    by_triton = invoke_json(common + ["--backend", "triton"], caplog)
    assert by_triton["tokens"] == by_torch["tokens"] == 5
    assert by_triton["text"] == by_torch["text"]


@pytest.mark.parametrize("command", [["eval", "--perplexity", "x.txt"], ["run", "--prompt", "hi"]])
def test_unknown_backend_is_refused_before_anything_loads(command, tmp_path):
    # the model path does not exist: the backend name must be refused before anything is loaded (by Typer now: a
    # choice of --backend; every command's choices are tried in test_choices.py)
    args = [command[0], str(tmp_path / "missing"), *command[1:], "--backend", "marlin"]
    refused_choice(runner.invoke(app, args), "--backend", "marlin", ("auto", "triton", "torch"))


def test_backend_with_compare_is_refused(tmp_path, text_file):
    result = runner.invoke(app, ["eval", "a", "b", "--compare", "--perplexity", str(text_file), "--backend", "triton"])
    assert result.exit_code == 2 and "--backend cannot be combined with --compare" in result.stderr


def test_backend_is_listed_in_help():
    for command in ("eval", "run"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--backend" in result.stdout
