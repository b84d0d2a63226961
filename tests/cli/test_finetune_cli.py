"""`qtool finetune` through Typer's CliRunner: the default command behind the group, the JSON summary, refusals
as one line, a subcommand beside the default one, and the adapter read back by `qtool eval --adapter`."""

from __future__ import annotations

import json
import random

import pytest
import torch
import typer
from typer.testing import CliRunner

from qtool.cli.finetune import DefaultCommandGroup
from qtool.cli.main import app

from cli_checks import one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_tiny_model_dir):
    return make_tiny_model_dir(tmp_path_factory.mktemp("base") / "tiny", seed=7, num_hidden_layers=1, initializer_range=0.2)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, tiny_words):
    rng = random.Random(5)
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(tiny_words) for _ in range(8)) for _ in range(12)))
    return path


def finetune_args(model_dir, text_file, output, *extra):
    return ["finetune", str(model_dir), "--data", str(text_file), "--output", str(output), "--max-steps", "3",
            "--seqlen", "32", "--batch-tokens", "64", "--rank", "4", "--lr", "0.02", "--device", "cpu", *extra]


def test_json_summary_and_the_adapter_in_eval(tmp_path, model_dir, text_file):
    output = tmp_path / "adapter"
    result = runner.invoke(app, finetune_args(model_dir, text_file, output, "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["steps"], summary["method"], summary["data_kind"], summary["output"]) == (3, "lora", "text", str(output))
    assert len(summary["losses"]) == 3 and summary["final_loss"] == summary["losses"][-1]
    assert summary["tokens_per_second"] > 0 and summary["peak_memory_bytes"] > 0
    assert (output / "adapter_config.json").is_file()
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)

    plain = runner.invoke(app, ["eval", str(model_dir), "--perplexity", str(text_file), "--seqlen", "32", "--device", "cpu", "--json"])
    adapted = runner.invoke(app, ["eval", str(model_dir), "--adapter", str(output), "--perplexity", str(text_file), "--seqlen", "32", "--device", "cpu", "--json"])
    assert plain.exit_code == 0 and adapted.exit_code == 0, adapted.output
    # trained on this very text: the adapter must lower its perplexity
    assert json.loads(adapted.stdout)["ppl"] < json.loads(plain.stdout)["ppl"]


def test_progress_display_and_summary_lines(tmp_path, model_dir, text_file):
    result = runner.invoke(app, finetune_args(model_dir, text_file, tmp_path / "out", "--eval-data", str(text_file), "--eval-every", "2"))
    assert result.exit_code == 0, result.output
    assert "3/3" in result.stderr and "loss" in result.stderr and "tok/s" in result.stderr
    assert "step 2: eval loss" in result.stderr
    assert f"lora fine-tune written to {tmp_path / 'out'}: 3 steps" in result.stdout and "eval loss" in result.stdout


def test_the_train_subcommand_is_the_default_one(tmp_path, model_dir, text_file):
    args = finetune_args(model_dir, text_file, tmp_path / "out", "--json")
    result = runner.invoke(app, ["finetune", "train", *args[1:]])
    assert result.exit_code == 0, result.output


def test_refusals_are_one_line(tmp_path, model_dir, text_file):
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    assert "already exists" in one_line_error(runner.invoke(app, finetune_args(model_dir, text_file, existing)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    assert f"{bad}: row 2: no 'text'" in one_line_error(runner.invoke(app, finetune_args(model_dir, bad, tmp_path / "o")))
    config = tmp_path / "ft.yaml"
    config.write_text("finetune:\n  rnak: 3\n")
    line = one_line_error(runner.invoke(app, finetune_args(model_dir, text_file, tmp_path / "o", "--config", str(config))))
    assert "unknown key 'rnak'" in line and "did you mean 'rank'" in line
    line = one_line_error(runner.invoke(app, finetune_args(model_dir, text_file, tmp_path / "o", "--method", "qlora")))
    assert "qlora needs a quantized base" in line
    assert not (tmp_path / "o").exists()


def test_a_group_with_a_default_command_routes_names_and_lists_subcommands():
    group = typer.Typer(cls=DefaultCommandGroup)
    calls = []

    @group.command("train")
    def train_command(model: str, rank: int = 1) -> None:
        calls.append(("train", model, rank))

    @group.command("merge")
    def merge_command(base: str, adapter: str, out: str) -> None:
        calls.append(("merge", base, adapter, out))

    outer = typer.Typer()
    outer.add_typer(group, name="finetune")
    outer.command("other")(lambda: None)
    assert runner.invoke(outer, ["finetune", "some/model", "--rank", "3"]).exit_code == 0
    assert runner.invoke(outer, ["finetune", "--rank", "2", "m"]).exit_code == 0
    assert runner.invoke(outer, ["finetune", "merge", "b", "a", "o"]).exit_code == 0
    assert calls == [("train", "some/model", 3), ("train", "m", 2), ("merge", "b", "a", "o")]
    listing = runner.invoke(outer, ["finetune", "--help"])
    assert listing.exit_code == 0 and "merge" in listing.output and "train" in listing.output


def test_adapter_refusals_in_eval_and_run(tmp_path, model_dir, text_file):
    line = one_line_error(runner.invoke(app, ["eval", str(model_dir), "--adapter", str(tmp_path), "--perplexity", str(text_file), "--device", "cpu"]))
    assert "no adapter_config.json" in line
    line = one_line_error(runner.invoke(app, ["run", str(model_dir), "--adapter", str(tmp_path), "--prompt", "hi", "--device", "cpu"]))
    assert "no adapter_config.json" in line


def test_the_finetune_group_routes_its_subcommands_through_the_main_app():
    """merge, embeddings and asr are subcommands of `qtool finetune`; anything else is the training command."""
    from typer.testing import CliRunner

    from qtool.cli.main import app

    runner = CliRunner()
    listing = runner.invoke(app, ["finetune", "--help"])
    assert listing.exit_code == 0
    for name in ("train", "merge", "embeddings", "asr"):
        assert name in listing.output
    for name, flag in (("merge", "--requantize"), ("embeddings", "--temperature"), ("asr", "--freeze-encoder")):
        result = runner.invoke(app, ["finetune", name, "--help"])
        assert result.exit_code == 0 and flag in result.output, (name, result.output)


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory, model_dir, text_file):
    from qtool.config.schema import CalibrationConfig, QuantConfig
    from qtool.quant.pipeline import quantize_model

    gptq = tmp_path_factory.mktemp("gptq") / "gptq"
    config = QuantConfig(bits=4, group_size=32, calibration=CalibrationConfig(source=str(text_file), samples=4, seqlen=16))
    quantize_model(str(model_dir), config, gptq, device="cpu")
    return gptq


def test_qlora_on_a_gptq_base_end_to_end(tmp_path, gptq_dir, text_file):
    """quantize -> finetune --method qlora (packed weights frozen) -> eval --adapter on the same GPTQ base."""
    gptq = gptq_dir
    output = tmp_path / "qlora"
    result = runner.invoke(app, finetune_args(gptq, text_file, output, "--method", "qlora", "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == "qlora" and (output / "adapter_model.safetensors").is_file()
    eval_args = ["--perplexity", str(text_file), "--seqlen", "32", "--device", "cpu", "--json"]
    plain = runner.invoke(app, ["eval", str(gptq), *eval_args])
    adapted = runner.invoke(app, ["eval", str(gptq), "--adapter", str(output), *eval_args])
    assert plain.exit_code == 0 and adapted.exit_code == 0, adapted.output
    assert json.loads(adapted.stdout)["ppl"] < json.loads(plain.stdout)["ppl"]


def test_loftq_init_starts_the_adapter_at_the_quantization_error(tmp_path, model_dir, gptq_dir, text_file):
    """--lora-init loftq: with a learning rate too small to move it, the saved adapter is the init, and its
    scaling * B @ A takes a share of W_float - W_gptq off every layer's error."""
    from safetensors.torch import load_file

    from qtool.checkpoints.sources import load_model

    output = tmp_path / "loftq"
    result = runner.invoke(app, finetune_args(gptq_dir, text_file, output, "--method", "qlora", "--lora-init", "loftq",
                                              "--loftq-float", str(model_dir), "--lr", "1e-12", "--json"))
    assert result.exit_code == 0, result.output
    adapter = json.loads((output / "adapter_config.json").read_text())
    scaling = adapter["lora_alpha"] / adapter["r"]
    tensors = load_file(str(output / "adapter_model.safetensors"))
    float_model = load_model(str(model_dir)).model
    gptq_model = load_model(str(gptq_dir)).model
    layers = [key[:-len(".lora_A.weight")] for key in tensors if key.endswith(".lora_A.weight")]
    assert len(layers) == 7  # one decoder layer's q, k, v, o, gate, up, down
    for key in layers:
        name = key.removeprefix("base_model.model.")
        error = float_model.get_submodule(name).weight.double() - gptq_model.get_submodule(name).dequantized_weight(torch.float64)
        delta = scaling * tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
        assert (error - delta).norm() < 0.97 * error.norm(), name

    line = one_line_error(runner.invoke(app, finetune_args(gptq_dir, text_file, tmp_path / "o", "--method", "qlora", "--lora-init", "loftq")))
    assert "loftq_float" in line and "--loftq-float" in line
    assert "--lora-init" in runner.invoke(app, ["finetune", "train", "--help"]).output


def test_resume_with_loftq_takes_the_adapters_from_the_checkpoint_not_the_float_model(tmp_path, model_dir, gptq_dir, text_file):
    """A resumed LoftQ run reads no float model (its --loftq-float may be gone): the adapters come from the
    checkpoint, and the run ends where the uninterrupted one did."""
    from safetensors.torch import load_file

    output = tmp_path / "loftq"
    args = ("--method", "qlora", "--lora-init", "loftq", "--save-every", "2", "--json")
    whole = runner.invoke(app, finetune_args(gptq_dir, text_file, output, *args, "--loftq-float", str(model_dir)))
    assert whole.exit_code == 0, whole.output
    expected = load_file(str(output / "adapter_model.safetensors"))
    assert (tmp_path / "loftq-checkpoints" / "step-000002").is_dir()
    resumed = runner.invoke(app, finetune_args(gptq_dir, text_file, output, *args, "--loftq-float", str(tmp_path / "gone"),
                                               "--resume", "--force"))
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from_step"] == 2
    got = load_file(str(output / "adapter_model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_fused_ops_on_trains_through_the_fused_forward_with_the_same_losses(tmp_path, model_dir, text_file):
    runs = {}
    for setting in ("on", "off"):
        result = runner.invoke(app, finetune_args(model_dir, text_file, tmp_path / setting, "--fused-ops", setting, "--json"))
        assert result.exit_code == 0, result.output
        runs[setting] = json.loads(result.stdout)
    assert any(note.startswith("fused training forward") for note in runs["on"]["notes"])
    assert any(note.startswith("training forward: transformers'") for note in runs["off"]["notes"])
    assert runs["on"]["losses"] == pytest.approx(runs["off"]["losses"], rel=1e-5)
    bad = runner.invoke(app, finetune_args(model_dir, text_file, tmp_path / "bad", "--fused-ops", "maybe"))
    assert bad.exit_code != 0 and "maybe" in bad.output
