"""Merging a LoRA adapter (made with peft on a tiny random Llama, B non-zero so that it moves the logits) into a
float base, a GPTQ base and an EXL2 base: the merged weights against a float64 reference, the logits against peft's
own merged model, re-quantized outputs loaded with qtool's loader, valid for `qtool validate`, with the base's
config, and the reported round-trip cost equal to what is measured here; mismatched adapters refused in one line."""

import json
import random
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qtool.checkpoints.sources import load_model
from qtool.config.schema import CalibrationConfig, QuantConfig
from qtool.convert.adapter_merge import CHECK_WINDOWS, MergeRequest, merge_adapter
from qtool.core.errors import QtoolError
from qtool.core.findings import Level
from qtool.kernels.exl2_linear import Exl2Linear
from qtool.kernels.quant_linear import QuantLinear
from qtool.quant.pipeline import quantize_model
from qtool.validate.dispatch import validate_path

from perplexity_reference import reference_perplexity

SEED = 5
TARGETS = ["q_proj", "v_proj", "down_proj"]
RANK, ALPHA = 4, 8


def make_adapter(directory, model, seed=11, targets=TARGETS, rank=RANK):
    """A PEFT adapter of `model` whose B factors are random (peft initialises them to zero: a no-op adapter)."""
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=list(targets), lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(str(directory))
    peft_model.unload()  # give the base model back without the LoRA layers
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_tiny_model_dir, make_calibration_text, tiny_words):
    root = tmp_path_factory.mktemp("merge")
    make_tiny_model_dir(root / "float", seed=SEED)
    calibration = make_calibration_text(root / "calibration.txt")
    rng = random.Random(7)
    (root / "eval.txt").write_text(" ".join(rng.choice(tiny_words) for _ in range(700)))
    make_adapter(root / "adapter", float_model(root / "float"))
    # a GPTQ base with settings other than the defaults, so that "the base's config" is visible in the output
    config = QuantConfig(bits=4, group_size=32, sym=False, desc_act=True, static_groups=True, checkpoint_format="gptq_v2",
                         calibration=CalibrationConfig(source=str(calibration), samples=4, seqlen=32, seed=1))
    quantize_model(str(root / "float"), config, root / "gptq", device="cpu")
    return root


def float_model(directory):
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def fresh_ids(seed, length=19, vocab=300):
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def dequantized_base(directory):
    """The base with its quantized linears as float linears, read with qtool's loader here (the reference)."""
    model = load_model(directory, device="cpu", dtype="float32").model
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, Exl2Linear)):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight.data.copy_(module.dequantized_weight(torch.float32))
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, linear)
    return model


def peft_merged(model, adapter):
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def calibration_check_windows(directory, calibration, seqlen):
    """What the report says it compares on: the first CHECK_WINDOWS windows of the calibration text."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(directory))(calibration.read_text(), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: CHECK_WINDOWS * seqlen]).view(CHECK_WINDOWS, seqlen)


def window_logits(model, windows):
    with torch.no_grad():
        return torch.stack([model(w[None]).logits[0].double() for w in windows])


def test_float_base_merge_is_peft_merge_and_float64_reference(setup):
    out = setup / "float-merged"
    report = merge_adapter(MergeRequest(setup / "float", setup / "adapter", out))
    merged = float_model(out)
    base = float_model(setup / "float")
    adapter = load_file(str(setup / "adapter" / "adapter_model.safetensors"))
    # each targeted weight is W + alpha/r * B @ A, here in float64 from the adapter's file
    for name in report.adapter_summary.targets:
        a = adapter[f"base_model.model.{name}.lora_A.weight"].double()
        b = adapter[f"base_model.model.{name}.lora_B.weight"].double()
        expected = base.get_submodule(name).weight.double() + ALPHA / RANK * b @ a
        assert torch.allclose(merged.get_submodule(name).weight.double(), expected, rtol=0, atol=1e-6), name
    assert len(report.adapter_summary.targets) == 2 * len(TARGETS)
    ids = fresh_ids(1)
    reference = logits(peft_merged(float_model(setup / "float"), setup / "adapter"), ids)
    assert torch.allclose(logits(merged, ids), reference, rtol=0, atol=1e-5)
    assert rel(logits(base, ids), reference) > 0.05  # the adapter matters
    assert report.output_format == "float" and report.output_dtype == "float32"
    assert report.logits.max_abs_diff == 0.0 and report.logits.top1_agreement == 1.0
    assert report.adapter_logits_rel_change > 0.05
    assert (out / "tokenizer.json").exists()


def test_dora_rslora_rank_pattern_and_modules_to_save_merge_as_peft_does(setup, tmp_path):
    model = float_model(setup / "float")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True, use_rslora=True, rank_pattern={"up_proj": 2},
                        modules_to_save=["lm_head"])
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    report = merge_adapter(MergeRequest(setup / "float", tmp_path / "adapter", tmp_path / "out"))
    assert report.adapter_summary.dora and report.adapter_summary.rslora and report.adapter_summary.modules_to_save == ["lm_head"]
    ids = fresh_ids(5)
    reference = logits(peft_merged(float_model(setup / "float"), tmp_path / "adapter"), ids)
    assert torch.allclose(logits(float_model(tmp_path / "out"), ids), reference, rtol=0, atol=1e-5)
    assert rel(logits(float_model(setup / "float"), ids), reference) > 0.05


def test_gptq_base_requantized_with_its_own_config(setup, make_tiny_tokenizer):
    out = setup / "gptq-merged"
    report = merge_adapter(MergeRequest(setup / "gptq", setup / "adapter", out, requantize="gptq", perplexity_text=setup / "eval.txt"), device="cpu")
    base_config = json.loads((setup / "gptq" / "config.json").read_text())["quantization_config"]
    out_config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert out_config == base_config
    assert report.config.to_dict() == base_config["meta"]["qtool_config"]
    assert report.bits == 4 and report.group_size == 32 and "base's quantization_config" in report.config_origin
    # qtool's loader: quantized linears, and `qtool validate` finds nothing wrong
    written = load_model(out, device="cpu", dtype="float32").model
    assert sum(isinstance(m, QuantLinear) for m in written.modules()) == 14
    assert not [f for f in validate_path(out, device="cpu").findings if f.level is Level.ERROR]
    # the merged float reference: the GPTQ base dequantized here, merged by peft
    merged = peft_merged(dequantized_base(setup / "gptq"), setup / "adapter")
    base = dequantized_base(setup / "gptq")
    ids = fresh_ids(2)
    adapter_effect = rel(logits(base, ids), logits(merged, ids))
    round_trip = rel(logits(written, ids), logits(merged, ids))
    base_cost = rel(logits(base, ids), logits(float_model(setup / "float"), ids))  # what 4 bits cost the base itself
    # the adapter survives re-quantization, at about the price the base paid for its own quantization
    assert adapter_effect > 0.05 and round_trip < 0.5 * adapter_effect and round_trip < 2 * base_cost
    # the reported check is the one measured here on the windows it names
    windows = calibration_check_windows(setup / "gptq", setup / "calibration.txt", 32)
    assert report.check_tokens == windows.numel()
    measured = window_logits(written, windows) - window_logits(merged, windows)
    assert report.logits.max_abs_diff == pytest.approx(float(measured.abs().max()), rel=1e-4)
    assert report.logits.rel_diff == pytest.approx(float(measured.norm() / window_logits(merged, windows).norm()), rel=1e-4)
    # perplexities against an independent loop on the same text and windows (the model's 256-token context)
    ids_text = make_tiny_tokenizer()((setup / "eval.txt").read_text(), add_special_tokens=False)["input_ids"]
    assert report.ppl_output == pytest.approx(reference_perplexity(written, ids_text, 256)[0], rel=1e-4)
    assert report.ppl_merged_float == pytest.approx(reference_perplexity(merged, ids_text, 256)[0], rel=1e-4)


def test_gptq_base_without_requantize_writes_merged_float16(setup):
    out = setup / "gptq-float"
    report = merge_adapter(MergeRequest(setup / "gptq", setup / "adapter", out))
    assert report.output_format == "float" and report.output_dtype == "float16"
    assert any("--requantize gptq" in note for note in report.notes)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    written = float_model(out)
    merged = peft_merged(dequantized_base(setup / "gptq"), setup / "adapter")
    ids = fresh_ids(3)
    assert 0 < rel(logits(written, ids), logits(merged, ids)) < 2e-3  # float16 storage only
    for name in report.adapter_summary.targets:
        assert torch.equal(written.get_submodule(name).weight, merged.get_submodule(name).weight.half().float())


def test_flags_override_the_base_config(setup):
    out = setup / "gptq-8bit"
    report = merge_adapter(MergeRequest(setup / "gptq", setup / "adapter", out, requantize="gptq", bits=8, group_size=-1), device="cpu")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["sym"], config["desc_act"], config["checkpoint_format"]) == (8, -1, False, True, "gptq_v2")
    assert report.bits == 8 and any("--bits" in note and "--group-size" in note for note in report.notes)
    # 8 bits per channel keep the merged model closer than the base's 4 bits did (measured by the same check)
    four = merge_adapter(MergeRequest(setup / "gptq", setup / "adapter", setup / "gptq-4bit-again", requantize="gptq"), device="cpu")
    assert report.logits.rel_diff < four.logits.rel_diff


@pytest.mark.slow
def test_exl2_base_requantized_with_its_own_config(tmp_path, make_tiny_model_dir, make_tiny_llama, make_calibration_text):
    """EXL2 measures every candidate per linear (tens of seconds on 2 cores even for one layer): slow."""
    from qtool.quant.exl2_pipeline import quantize_model_exl2

    shape = dict(num_hidden_layers=1)
    make_tiny_model_dir(tmp_path / "float", seed=SEED, **shape)
    calibration = make_calibration_text(tmp_path / "calibration.txt")
    make_adapter(tmp_path / "adapter", make_tiny_llama(seed=SEED, **shape))
    config = QuantConfig(output_format="exl2", desc_act=True, bpw=4.5, calibration=CalibrationConfig(source=str(calibration), samples=4, seqlen=32))
    quantize_model_exl2(str(tmp_path / "float"), config, tmp_path / "exl2", device="cpu")
    out = tmp_path / "merged"
    report = merge_adapter(MergeRequest(tmp_path / "exl2", tmp_path / "adapter", out, requantize="exl2"), device="cpu")
    base_config = json.loads((tmp_path / "exl2" / "config.json").read_text())["quantization_config"]
    out_config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert out_config["meta"]["qtool_config"] == base_config["meta"]["qtool_config"]
    assert (out_config["bits"], out_config["head_bits"], out_config["calibration"]) == (base_config["bits"], base_config["head_bits"], base_config["calibration"])
    assert abs(report.bits_per_weight - 4.5) < 0.05
    written = load_model(out, device="cpu", dtype="float32").model
    assert sum(isinstance(m, Exl2Linear) for m in written.modules()) == 7
    assert not [f for f in validate_path(out, device="cpu").findings if f.level is Level.ERROR]
    merged = peft_merged(dequantized_base(tmp_path / "exl2"), tmp_path / "adapter")
    base = dequantized_base(tmp_path / "exl2")
    ids = fresh_ids(4)
    round_trip = rel(logits(written, ids), logits(merged, ids))
    base_cost = rel(logits(base, ids), logits(float_model(tmp_path / "float"), ids))  # what EXL2 cost the base itself
    # the output is nearer the merged model than the unmerged base, at about the price the base paid for EXL2
    assert round_trip < rel(logits(written, ids), logits(base, ids)) and round_trip < 2 * base_cost


# ---- refusals: one line naming the tensor, file or option; nothing written ----


def refused(setup, adapter, match, **options):
    out = setup / "refused"
    with pytest.raises(QtoolError, match=match) as caught:
        merge_adapter(MergeRequest(setup / "float", adapter, out, **options))
    assert "\n" not in caught.value.one_line()
    assert not out.exists()
    return caught.value


def copy_adapter(setup, name):
    target = setup / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(setup / "adapter", target)
    return target


def edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_adapter_of_another_shape_names_the_tensor(setup, make_tiny_llama):
    other = make_adapter(setup / "other-shape", make_tiny_llama(seed=SEED, intermediate_size=192))
    error = refused(setup, other, r"down_proj\.lora_A\.weight is \[4, 192\] but model\.layers\.0\.mlp\.down_proj with rank 4 needs \[4, 160\]")
    assert "adapter_model.safetensors" in error.message


def test_rank_that_disagrees_with_the_config(setup):
    adapter = copy_adapter(setup, "wrong-rank")
    edit_config(adapter, r=8)
    refused(setup, adapter, r"down_proj\.lora_A\.weight is \[4, 160\] but model\.layers\.0\.mlp\.down_proj with rank 8 needs \[8, 160\]")


def test_unknown_target_module(setup):
    adapter = copy_adapter(setup, "unknown-target")
    edit_config(adapter, target_modules=["qkv_proj"])
    refused(setup, adapter, r"adapter_config\.json: target_modules qkv_proj match no module of the base \(.*linear layers end in .*q_proj")


def test_tensor_of_a_module_the_config_does_not_target(setup):
    adapter = copy_adapter(setup, "untargeted")
    edit_config(adapter, target_modules=["q_proj", "down_proj"])
    refused(setup, adapter, r"self_attn\.v_proj\.lora_A\.weight belongs to model\.layers\.0\.self_attn\.v_proj, which adapter_config\.json's target_modules do not name")


def test_tensor_of_a_module_the_base_lacks(setup):
    adapter = copy_adapter(setup, "extra-layer")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    weights["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 96)
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    refused(setup, adapter, r"layers\.7\.self_attn\.q_proj\.lora_A\.weight names no module of the base")


def test_missing_factor(setup):
    adapter = copy_adapter(setup, "missing-b")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    del weights["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    refused(setup, adapter, r"has no lora_B for model\.layers\.1\.self_attn\.v_proj")


@pytest.mark.parametrize(
    "remove, pickled, match",
    [
        ("adapter_model.safetensors", False, "has no adapter_model.safetensors"),
        ("adapter_model.safetensors", True, "holds only pickled weights"),
        ("adapter_config.json", False, "has no adapter_config.json"),
        (None, False, "is missing, not a folder"),
    ],
)
def test_missing_files(setup, remove, pickled, match):
    adapter = copy_adapter(setup, "missing-file")
    if remove is None:
        shutil.rmtree(adapter)
    else:
        (adapter / remove).unlink()
    if pickled:
        (adapter / "adapter_model.bin").write_bytes(b"not unpickled")
    refused(setup, adapter, match)


def test_not_a_lora_adapter(setup):
    adapter = copy_adapter(setup, "ia3")
    edit_config(adapter, peft_type="IA3")
    refused(setup, adapter, "peft_type 'IA3' is not LORA")


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(bits=8), "--bits applies with --requantize only"),
        (dict(requantize="gptq", bpw=4.0), "--bpw applies to --requantize exl2 only"),
        (dict(requantize="exl2", group_size=64), "--group-size does not apply to --requantize exl2"),
        (dict(requantize="gptq", bits=5), r"bits: 5 is not valid"),
        (dict(requantize="gptq", calibration="missing.txt"), r"calibration.source: file missing.txt does not exist"),
    ],
)
def test_bad_requests(setup, options, match):
    refused(setup, setup / "adapter", match, **options)


def test_base_calibration_gone_names_the_base_and_the_flag(setup, tmp_path):
    base = tmp_path / "gptq"
    shutil.copytree(setup / "gptq", base)
    path = base / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["meta"]["qtool_config"]["calibration"]["source"] = str(tmp_path / "gone.txt")
    path.write_text(json.dumps(config))
    with pytest.raises(QtoolError, match=r"the base's quantization_config .*calibration\.source: file .*gone\.txt does not exist.*--calibration"):
        merge_adapter(MergeRequest(base, setup / "adapter", tmp_path / "out", requantize="gptq"))


def test_existing_output_needs_force(setup):
    out = setup / "forced"
    merge_adapter(MergeRequest(setup / "float", setup / "adapter", out))
    with pytest.raises(QtoolError, match="already exists"):
        merge_adapter(MergeRequest(setup / "float", setup / "adapter", out))
    merge_adapter(MergeRequest(setup / "float", setup / "adapter", out, force=True))
    with pytest.raises(QtoolError, match="is the input"):
        merge_adapter(MergeRequest(setup / "float", setup / "adapter", setup / "adapter", force=True))


def test_mismatch_found_before_the_weights_are_read(setup, make_tiny_llama, tmp_path):
    """The adapter is checked against the base's config alone first: a folder without weights still gets the
    adapter's error, not the loader's."""
    base = tmp_path / "config-only"
    base.mkdir()
    shutil.copyfile(setup / "float" / "config.json", base / "config.json")
    other = make_adapter(tmp_path / "other-shape", make_tiny_llama(seed=SEED, intermediate_size=192))
    with pytest.raises(QtoolError, match=r"down_proj\.lora_A\.weight is \[4, 192\]"):
        merge_adapter(MergeRequest(base, other, tmp_path / "out"))
    with pytest.raises(QtoolError, match="has no weight files"):  # the right adapter reaches the loader
        merge_adapter(MergeRequest(base, setup / "adapter", tmp_path / "out"))
