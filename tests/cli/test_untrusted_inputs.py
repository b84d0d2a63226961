"""Every command checks what it reads before computing with it: broken scales, missing tensors, quantized tensors
without a quantization config, a config.json that contradicts the tensors, and NaN outputs are one-line errors
(exit 2, nothing written), and the words are those of `qtool validate`'s finding for the same directory."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qtool.checkpoints.exl2_checkpoint import save_exl2_model
from qtool.cli.main import app

from cli_checks import chat_tokenizer_fixture, one_line_error, save_model_dir, save_rtn_gptq_dir

runner = CliRunner()
Q0 = "model.layers.0.self_attn.q_proj"
UP0 = "model.layers.0.mlp.up_proj.weight"


def edit_tensors(file: Path, change) -> None:
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def edit_config(directory: Path, change) -> None:
    data = json.loads((directory / "config.json").read_text())
    change(data)
    (directory / "config.json").write_text(json.dumps(data))


def validate_errors(directory: Path) -> list[str]:
    """The error findings of `qtool validate --json DIRECTORY`, each as its one line (where: message (fix))."""
    result = runner.invoke(app, ["validate", str(directory), "--json"])
    assert result.exit_code == 1, result.output
    found = json.loads(result.stdout)["findings"]
    return [f"{f['where']}: {f['message']}" + (f" ({f['fix']})" if f["fix"] else "") for f in found if f["level"] == "error"]


def refused(args: list[str]) -> str:
    """Run a command that must refuse: its one error line without the `error: ` prefix."""
    return one_line_error(runner.invoke(app, args)).removeprefix("error: ")


tokenizer = chat_tokenizer_fixture()


@pytest.fixture
def text_file(tmp_path, tiny_words):
    rng = random.Random(5)
    path = tmp_path / "text.txt"
    path.write_text(" ".join(rng.choice(tiny_words) for _ in range(400)))
    return path


@pytest.fixture
def float_dir(tmp_path, make_tiny_llama, tokenizer):
    return save_model_dir(tmp_path / "float", make_tiny_llama(seed=2, vocab_size=len(tokenizer)), tokenizer)


@pytest.fixture
def gptq_dir(tmp_path, make_tiny_llama, tokenizer):
    return save_rtn_gptq_dir(tmp_path / "gptq", make_tiny_llama(seed=4, vocab_size=len(tokenizer)), tokenizer)


@pytest.fixture
def exl2_dir(tmp_path, make_tiny_llama, make_random_exl2_weights, tokenizer):
    model = make_tiny_llama(seed=6, vocab_size=len(tokenizer))
    save_exl2_model(tmp_path / "exl2", model, make_random_exl2_weights(model, seed=7), tokenizer=tokenizer)
    tokenizer.save_pretrained(tmp_path / "exl2")
    return tmp_path / "exl2"


def eval_args(model: Path, text_file: Path) -> list[str]:
    return ["eval", str(model), "--perplexity", str(text_file), "--seqlen", "32", "--windows", "2", "--device", "cpu"]


def run_args(model: Path, *extra: str) -> list[str]:
    return ["run", str(model), "--prompt", "the fox", "--max-new-tokens", "4", "--device", "cpu", *extra]


# ---------------------------------------------------------------- scales


@pytest.mark.parametrize(
    ("value", "words"),
    [(float("nan"), "1 of 288 scales in model.safetensors are NaN or infinite (first at [1, 5])"),
     (-0.5, "1 of 288 scales in model.safetensors are zero or negative (first at [1, 5], value -0.5)")],
    ids=["nan", "negative"],
)
def test_gptq_scales_refused_by_every_command_in_validates_words(tmp_path, gptq_dir, text_file, value, words):
    edit_tensors(gptq_dir / "model.safetensors", lambda t: t[f"{Q0}.scales"].__setitem__((1, 5), value))
    [finding] = validate_errors(gptq_dir)
    assert finding.startswith(f"{Q0}.scales: {words}")
    assert refused(eval_args(gptq_dir, text_file)) == finding
    assert refused(run_args(gptq_dir, "--temperature", "0")) == finding
    assert refused(["convert", "gptq", "float", str(gptq_dir), str(tmp_path / "out")]) == finding
    assert refused(["convert", "gptq", "exl2", str(gptq_dir), str(tmp_path / "out")]) == finding
    assert refused(["quantize", str(gptq_dir), "--output", str(tmp_path / "out")]) == finding
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.05, 0.0], ids=["nan", "inf", "negative", "zero"])
def test_exl2_q_scale_max_refused_in_validates_words(tmp_path, exl2_dir, text_file, value):
    edit_tensors(exl2_dir / "model.safetensors", lambda t: t[f"{Q0}.q_scale_max"].__setitem__(0, value))
    [finding] = validate_errors(exl2_dir)
    assert finding.startswith(f"{Q0}.q_scale_max: 1 of ")
    assert "in model.safetensors are zero, negative or not finite (first: group 0" in finding
    assert refused(eval_args(exl2_dir, text_file)) == finding
    assert refused(["convert", "exl2", "float", str(exl2_dir), str(tmp_path / "out")]) == finding
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- tensors missing, or quantized without a config


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_float_model_missing_a_weight_is_refused(tmp_path, make_tiny_llama, tokenizer, text_file, sharded):
    directory = tmp_path / "float"
    make_tiny_llama(seed=2, vocab_size=len(tokenizer)).save_pretrained(directory, max_shard_size="100KB" if sharded else "5GB")
    tokenizer.save_pretrained(directory)
    file = next(f for f in directory.glob("*.safetensors") if UP0 in load_file(str(f)))
    edit_tensors(file, lambda t: t.pop(UP0))
    if sharded:
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        del index["weight_map"][UP0]
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    [finding] = validate_errors(directory)
    assert finding.startswith(f"{UP0}: LlamaForCausalLM expects this tensor but the weight files lack it (1 missing in all)")
    assert refused(["quantize", str(directory), "--output", str(tmp_path / "out"), "--calibration", str(text_file),
                    "--samples", "2", "--seqlen", "16", "--device", "cpu"]) == finding
    assert not (tmp_path / "out").exists()
    assert refused(eval_args(directory, text_file)) == finding


def test_tied_head_is_not_missing(tmp_path, make_tiny_llama, tokenizer, text_file):
    directory = tmp_path / "tied"
    make_tiny_llama(seed=2, vocab_size=len(tokenizer), tie_word_embeddings=True).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    assert "lm_head.weight" not in load_file(str(directory / "model.safetensors"))
    result = runner.invoke(app, eval_args(directory, text_file) + ["--json"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["validate", str(directory)]).exit_code == 0


def test_gptq_checkpoint_missing_a_tensor_is_refused(tmp_path, gptq_dir, text_file):
    name = "model.layers.1.post_attention_layernorm.weight"
    edit_tensors(gptq_dir / "model.safetensors", lambda t: t.pop(name))
    line = refused(eval_args(gptq_dir, text_file))
    assert line.startswith(f"{name}: LlamaForCausalLM expects this tensor but the weight files lack it (1 missing in all)")
    assert refused(["convert", "gptq", "float", str(gptq_dir), str(tmp_path / "out")]) == line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("checkpoint", ["gptq_dir", "exl2_dir"])
def test_quantized_tensors_without_quantization_config(request, tmp_path, text_file, checkpoint):
    directory = request.getfixturevalue(checkpoint)
    edit_config(directory, lambda c: c.pop("quantization_config"))
    (directory / "quantize_config.json").unlink(missing_ok=True)
    [finding] = validate_errors(directory)
    assert finding.startswith("config.json: has no quantization_config but ")
    assert refused(eval_args(directory, text_file)) == finding
    assert refused(run_args(directory, "--temperature", "0")) == finding
    assert refused(["quantize", str(directory), "--output", str(tmp_path / "out")]) == finding
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- config.json against the tensors


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("hidden_size", 192, "hidden_size is 192 but model.embed_tokens.weight in model.safetensors has shape [300, 96]"),
     ("vocab_size", 400, "vocab_size is 400 but model.embed_tokens.weight in model.safetensors has shape [300, 96]"),
     ("intermediate_size", 128, "intermediate_size is 128 but model.layers.0.mlp.gate_proj.weight in model.safetensors has shape [160, 96]")],
)
def test_config_contradicting_the_tensors(tmp_path, float_dir, text_file, field, value, words):
    edit_config(float_dir, lambda c: c.update({field: value}))
    [finding] = validate_errors(float_dir)
    assert finding.startswith(f"config.json: {words}")
    assert refused(eval_args(float_dir, text_file)) == finding
    assert refused(["quantize", str(float_dir), "--output", str(tmp_path / "out")]) == finding
    assert not (tmp_path / "out").exists()


def test_gptq_config_contradicting_the_tensors(tmp_path, gptq_dir, text_file):
    edit_config(gptq_dir, lambda c: c.update(hidden_size=192))
    [finding] = validate_errors(gptq_dir)
    assert finding.startswith("config.json: hidden_size is 192 but model.embed_tokens.weight in model.safetensors has shape [300, 96]")
    assert refused(eval_args(gptq_dir, text_file)) == finding


# ---------------------------------------------------------------- NaN outputs


def poison_norm(directory: Path) -> None:
    file = directory / "model.safetensors"
    edit_tensors(file, lambda t: t["model.norm.weight"].__setitem__(3, float("nan")))


def test_nan_perplexity_is_an_error(tmp_path, float_dir, text_file):
    poison_norm(float_dir)
    line = refused(eval_args(float_dir, text_file))
    assert line.startswith(f"the logits of {float_dir} hold NaN or infinite values")
    assert f"qtool validate {float_dir}" in line


def test_nan_in_a_compare_row_is_an_error(tmp_path, float_dir, text_file):
    good = tmp_path / "good"
    float_dir.rename(good)
    float_dir.mkdir()
    for file in good.iterdir():
        (float_dir / file.name).write_bytes(file.read_bytes())
    poison_norm(float_dir)
    line = refused(["eval", "--compare", str(good), str(float_dir), "--perplexity", str(text_file), "--seqlen", "32", "--windows", "2", "--device", "cpu"])
    assert line.startswith(f"the logits of {float_dir} hold NaN or infinite values")


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "0.7", "--seed", "1"]], ids=["greedy", "sampled"])
def test_nan_logits_stop_generation(float_dir, sampling):
    poison_norm(float_dir)
    line = refused(run_args(float_dir, *sampling))
    assert line.startswith(f"the logits of {float_dir} hold NaN or infinite values")


def test_nan_logits_fail_the_conversion_check(tmp_path, gptq_dir):
    poison_norm(gptq_dir)
    line = refused(["convert", "gptq", "float", str(gptq_dir), str(tmp_path / "out")])
    assert line.startswith(f"the logits of {gptq_dir} hold NaN or infinite values")
    assert not (tmp_path / "out").exists()
