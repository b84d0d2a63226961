"""`qtool finetune merge` as a command function, registered here on a Typer app of its own (the lead wires it into
`qtool finetune`): JSON and table output of a float merge and a GPTQ re-quantization, and mismatched adapters or bad
requests as one red line with exit code 2 and nothing written."""

import json
import shutil

import pytest
import torch
import typer
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from qtool.cli.finetune_merge import merge
from qtool.config.schema import CalibrationConfig, QuantConfig
from qtool.quant.pipeline import quantize_model

from cli_checks import one_line_error, refused_choice

runner = CliRunner()
SEED = 9


def merge_app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("merge")(merge)

    @app.callback()
    def group() -> None:  # a group, so that `merge` is a subcommand as it will be under `qtool finetune`
        pass

    return app


def make_adapter(directory, model_dir, intermediate_size=None):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if intermediate_size is not None:  # an adapter trained on a model of another shape
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(model.config.__class__(**{**model.config.to_dict(), "intermediate_size": intermediate_size}))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "up_proj"]))
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_tiny_model_dir, make_calibration_text):
    root = tmp_path_factory.mktemp("merge-cli")
    make_tiny_model_dir(root / "float", seed=SEED)
    make_adapter(root / "adapter", root / "float")
    calibration = make_calibration_text(root / "calibration.txt")
    config = QuantConfig(method="rtn", bits=4, group_size=32, calibration=CalibrationConfig(source=str(calibration), samples=4, seqlen=32))
    quantize_model(str(root / "float"), config, root / "gptq", device="cpu")
    return root


def invoke(*args):
    return runner.invoke(merge_app(), ["merge", *map(str, args)])


def test_float_merge_json(setup):
    out = setup / "merged"
    result = invoke(setup / "float", setup / "adapter", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["output_format"] == "float" and report["base_format"] == "float"
    assert report["adapter_summary"]["rank"] == 2 and len(report["adapter_summary"]["targets"]) == 4
    assert report["logits"]["max_abs_diff"] == 0.0 and report["adapter_logits_rel_change"] > 0.01
    # what it wrote is the base with the adapter folded in: the output's o_proj is not the base's
    base = AutoModelForCausalLM.from_pretrained(str(setup / "float"), dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    name = "model.layers.1.self_attn.o_proj"
    assert not torch.equal(base.get_submodule(name).weight, merged.get_submodule(name).weight)
    assert torch.equal(base.get_submodule("model.layers.1.self_attn.q_proj").weight, merged.get_submodule("model.layers.1.self_attn.q_proj").weight)


def test_gptq_requantize_table(setup):
    out = setup / "requantized"
    result = invoke(setup / "gptq", setup / "adapter", out, "--requantize", "gptq", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "gptq 4-bit, group 32" in result.stdout and "output vs merged float" in result.stdout and "top-1 agreement" in result.stdout
    assert "base's quantization_config" in result.stdout
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == json.loads((setup / "gptq" / "config.json").read_text())["quantization_config"]


def test_existing_output_and_force(setup):
    out = setup / "again"
    assert invoke(setup / "float", setup / "adapter", out).exit_code == 0
    line = one_line_error(invoke(setup / "float", setup / "adapter", out))
    assert "already exists" in line and "--force" in line
    assert invoke(setup / "float", setup / "adapter", out, "--force").exit_code == 0


def broken_adapter(setup, name, change):
    adapter = setup / name
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.copytree(setup / "adapter", adapter)
    change(adapter)
    return adapter


def unknown_target(adapter):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": ["attn_out"]}))


@pytest.mark.parametrize(
    "adapter, options, message",
    [
        ("wrong-shape", [], "up_proj.lora_B.weight is [192, 2] but model.layers.0.mlp.up_proj with rank 2 needs [160, 2]"),
        ("unknown-target", [], "target_modules attn_out match no module of the base"),
        ("no-weights", [], "has no adapter_model.safetensors"),
        ("no-config", [], "has no adapter_config.json"),
        ("adapter", ["--bits", "8"], "--bits applies with --requantize only"),
        ("adapter", ["--requantize", "exl2", "--group-size", "64"], "--group-size does not apply to --requantize exl2"),
        ("adapter", ["--perplexity", "missing.txt"], "--perplexity missing.txt: no such file"),
    ],
)
def test_refusals_are_one_line(setup, adapter, options, message):
    if adapter == "wrong-shape":
        path = make_adapter(setup / "wrong-shape", setup / "float", intermediate_size=192)
    elif adapter == "unknown-target":
        path = broken_adapter(setup, adapter, unknown_target)
    elif adapter == "no-weights":
        path = broken_adapter(setup, adapter, lambda a: (a / "adapter_model.safetensors").unlink())
    elif adapter == "no-config":
        path = broken_adapter(setup, adapter, lambda a: (a / "adapter_config.json").unlink())
    else:
        path = setup / adapter
    out = setup / "refused"
    line = one_line_error(invoke(setup / "float", path, out, *options))
    assert message in line, line
    assert not out.exists()


def test_requantize_choice_refused_by_typer(setup):
    refused_choice(invoke(setup / "float", setup / "adapter", setup / "x", "--requantize", "awq"), "--requantize", "awq", ("gptq", "exl2"))
