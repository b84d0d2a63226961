"""Whole checkpoints: save a tiny Llama with quantized linears, load it back, and compare its logits with the
same model whose weights are replaced by the dequantized ones (rest rounded to float16, as stored)."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qtool.core.errors import QtoolError
from qtool.checkpoints.gptq_checkpoint import is_quantized_checkpoint, load_quantized_model, save_quantized_model
from qtool.kernels.quant_linear import QuantLinear
from qtool.formats.quantized_weight import QuantizedWeight

TOL = dict(rtol=1e-5, atol=1e-5)


def widened_llama(make_tiny_llama, seed=0, **overrides):
    """Weights of std 0.1 (random init is 0.02): logits then depend visibly on every quantized linear."""
    model = make_tiny_llama(seed=seed, **overrides)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def rtn_quantize(weight, bits, group_size, sym, act_order, min_zero, gen):
    """Round-to-nearest per group (the checkpoint format does not care how the codes were found)."""
    out_features, in_features = weight.shape
    g_idx = torch.zeros(in_features, dtype=torch.int32) if group_size == -1 else torch.arange(in_features, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    groups = int(g_idx.max()) + 1
    scales = torch.empty(groups, out_features)
    zeros = torch.empty(groups, out_features, dtype=torch.int32)
    maxq = (1 << bits) - 1
    for g in range(groups):
        block = weight[:, g_idx == g].float()
        low, high = block.min(1).values.clamp(max=0), block.max(1).values.clamp(min=0)
        if sym:
            scale = torch.maximum(-low, high) * 2 / maxq
            zero = torch.full_like(scale, 1 << (bits - 1))
        else:
            scale = (high - low) / maxq
            zero = torch.round(-low / scale.clamp(min=1e-8)).clamp(min_zero, maxq)
        scales[g] = scale.clamp(min=1e-6).half().float()
        zeros[g] = zero.int()
    rows = g_idx.long()
    codes = torch.round(weight.float() / scales[rows].T + zeros[rows].T).clamp(0, maxq).int()
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size)


def quantize_linears(model, bits, group_size, sym=False, act_order=False, min_zero=1, include_lm_head=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: rtn_quantize(module.weight.detach(), bits, group_size, sym, act_order, min_zero, gen)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (include_lm_head or name != "lm_head")
    }


def fake_quantized(model, quantized):
    """The model as the checkpoint describes it: dequantized linears, every other float tensor through float16."""
    reference = copy.deepcopy(model)  # float32 already; .float() is refused on a GGUF-loaded model
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.half().float())
        for name, qw in quantized.items():
            module = reference.get_submodule(name)
            if module.weight is reference.get_input_embeddings().weight:
                module.weight = torch.nn.Parameter(qw.dequantize())  # untie: the quantized lm_head has its own weight
            else:
                module.weight.copy_(qw.dequantize())
    return reference.eval()


def logits(model, seed=1):
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def assert_round_trip(saved_model, quantized, path):
    loaded = load_quantized_model(path, dtype=torch.float32)
    expected = logits(fake_quantized(saved_model, quantized))
    # the quantization must matter, or matching logits would prove nothing
    assert (expected - logits(saved_model)).abs().max() > 1e-2
    torch.testing.assert_close(logits(loaded), expected, **TOL)
    quant_names = {name for name, module in loaded.named_modules() if isinstance(module, QuantLinear)}
    assert quant_names == set(quantized)
    return loaded


@pytest.mark.parametrize(
    "bits,group_size,sym,act_order,checkpoint_format",
    [
        (2, 32, False, False, "gptq_v2"),
        (3, 64, False, True, "gptq"),
        (4, -1, True, False, "gptq"),
        (4, 64, False, True, "gptq_v2"),
        (8, 32, True, True, "gptq"),
    ],
)
def test_round_trip_logits(tmp_path, make_tiny_llama, bits, group_size, sym, act_order, checkpoint_format):
    model = widened_llama(make_tiny_llama, seed=bits)
    min_zero = 1 if checkpoint_format == "gptq" else 0
    quantized = quantize_linears(model, bits, group_size, sym, act_order, min_zero, seed=bits)
    out = save_quantized_model(tmp_path / "ckpt", model, quantized, {"damp_percent": 0.05}, checkpoint_format=checkpoint_format)
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    loaded = assert_round_trip(model, quantized, out)
    layer = loaded.model.layers[1].mlp.down_proj
    assert (layer.bits, layer.group_size, layer.checkpoint_format) == (bits, group_size, checkpoint_format)
    assert not loaded.training


def test_sharded_round_trip(tmp_path, make_tiny_llama):
    model = widened_llama(make_tiny_llama, seed=3)
    quantized = quantize_linears(model, 4, 32)
    out = save_quantized_model(tmp_path / "ckpt", model, quantized, {}, max_shard_size_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    stored = {}
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as handle:
            assert handle.metadata().get("format") == "pt"
            stored.update({key: shard for key in handle.keys()})
    assert stored == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for s in shards for t in load_file(out / s).values())
    assert_round_trip(model, quantized, out)


def test_tied_embeddings(tmp_path, make_tiny_llama):
    model = widened_llama(make_tiny_llama, seed=4, tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantized = quantize_linears(model, 4, 64)
    out = save_quantized_model(tmp_path / "ckpt", model, quantized, {})
    keys = set(load_file(out / "model.safetensors"))
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = assert_round_trip(model, quantized, out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_quantized_lm_head_of_tied_model_is_untied(tmp_path, make_tiny_llama):
    model = widened_llama(make_tiny_llama, seed=5, tie_word_embeddings=True)
    model.tie_weights()
    quantized = quantize_linears(model, 8, 32, include_lm_head=True)
    out = save_quantized_model(tmp_path / "ckpt", model, quantized, {"lm_head": True})
    keys = set(load_file(out / "model.safetensors"))
    assert {"lm_head.qweight", "model.embed_tokens.weight"} <= keys and "lm_head.weight" not in keys
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = assert_round_trip(model, quantized, out)
    assert isinstance(loaded.lm_head, QuantLinear)


def test_written_config_and_tensors(tmp_path, make_tiny_llama):
    from transformers import AutoConfig

    model = widened_llama(make_tiny_llama, seed=6)
    quantized = quantize_linears(model, 3, 32, sym=True)
    out = save_quantized_model(tmp_path / "ckpt", model, quantized, {"damp_percent": 0.1, "true_sequential": False, "note": "x"})
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert json.loads((out / "quantize_config.json").read_text()) == quant
    for key, value in {"quant_method": "gptq", "bits": 3, "group_size": 32, "desc_act": False, "sym": True, "static_groups": False,
                       "true_sequential": False, "damp_percent": 0.1, "checkpoint_format": "gptq", "note": "x"}.items():
        assert quant[key] == value, key
    assert any(tag.startswith("qtool:") for tag in quant["meta"]["quantizer"])
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float16"
    assert (out / "generation_config.json").exists()
    tensors = load_file(out / "model.safetensors")
    for key, tensor in tensors.items():
        if key.endswith((".qweight", ".qzeros", ".g_idx")):
            assert tensor.dtype == torch.int32, key
        else:
            assert tensor.dtype == torch.float16, key
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    reread = AutoConfig.from_pretrained(out)
    assert reread.hidden_size == 96 and reread.quantization_config["bits"] == 3


def test_act_order_and_asymmetry_are_recorded_truthfully(tmp_path, make_tiny_llama):
    model = widened_llama(make_tiny_llama, seed=7)
    quantized = quantize_linears(model, 4, 32, act_order=True)
    out = save_quantized_model(tmp_path / "ckpt", model, quantized, {})
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["desc_act"] is True and quant["sym"] is False
    with pytest.raises(QtoolError, match="desc_act"):
        save_quantized_model(tmp_path / "other", model, quantized, {"desc_act": False})
    with pytest.raises(QtoolError, match="sym"):
        save_quantized_model(tmp_path / "other", model, quantized, {"sym": True})
    with pytest.raises(QtoolError, match="bits"):
        save_quantized_model(tmp_path / "other", model, quantized, {"bits": 8})


def test_v1_refuses_zero_point_zero(tmp_path, make_tiny_llama):
    model = widened_llama(make_tiny_llama, seed=8)
    quantized = quantize_linears(model, 4, 32, min_zero=1)
    quantized["model.layers.1.mlp.up_proj"].zeros[0, 0] = 0
    with pytest.raises(QtoolError, match=r"model\.layers\.1\.mlp\.up_proj\.qzeros") as excinfo:
        save_quantized_model(tmp_path / "ckpt", model, quantized, {})
    assert "gptq_v2" in excinfo.value.hint and not (tmp_path / "ckpt").exists()
    out = save_quantized_model(tmp_path / "ckpt", model, quantized, {}, checkpoint_format="gptq_v2")
    assert_round_trip(model, quantized, out)


def test_model_read_from_gguf_saves_without_its_marker(tmp_path, make_tiny_llama):
    """A GGUF-loaded model carries quant_method gguf and an hf_quantizer; neither may reach the checkpoint."""
    model = widened_llama(make_tiny_llama, seed=9)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    model.config.architectures = None
    model.hf_quantizer = object()
    quantized = quantize_linears(model, 4, 64)
    out = save_quantized_model(tmp_path / "ckpt", model, quantized, {})
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and "gguf_file" not in json.dumps(config)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert_round_trip(model, quantized, out)


def tiny_tokenizer(vocab_size=320):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_tokenizer_is_saved(tmp_path, make_tiny_llama):
    from transformers import AutoTokenizer

    model = widened_llama(make_tiny_llama, seed=10)
    out = save_quantized_model(tmp_path / "ckpt", model, quantize_linears(model, 4, 32), {}, tokenizer=tiny_tokenizer())
    assert AutoTokenizer.from_pretrained(out)("w5 w7")["input_ids"] == [5, 7]


class ExplodingTokenizer:
    def save_pretrained(self, directory):
        (Path(directory) / "tokenizer.json").write_text("{}")
        raise RuntimeError("disk full")


def test_atomic_output(tmp_path, make_tiny_llama):
    model = widened_llama(make_tiny_llama, seed=11)
    quantized = quantize_linears(model, 4, 32)
    out = save_quantized_model(tmp_path / "ckpt", model, quantized, {})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(QtoolError, match="already exists") as excinfo:
        save_quantized_model(out, model, quantized, {})
    assert str(out) in str(excinfo.value) and "--force" in excinfo.value.hint
    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized_model(out, model, quantized, {"damp_percent": 0.2}, tokenizer=ExplodingTokenizer(), force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directory left behind
    save_quantized_model(out, model, quantized, {"damp_percent": 0.2}, force=True)
    assert json.loads((out / "quantize_config.json").read_text())["damp_percent"] == 0.2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=1,
                                         num_attention_heads=6, num_key_value_heads=2, head_dim=16)).eval()
    quantized = quantize_linears(model, 4, 32)
    out = save_quantized_model(tmp_path_factory.mktemp("saved") / "ckpt", model, quantized, {})
    return out, model, quantized


def copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_quantize_config_json_only_with_gptqmodel_spelling(tmp_path, saved_checkpoint):
    source, model, quantized = saved_checkpoint
    out = copy_checkpoint(source, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    quant = config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    quant.pop("checkpoint_format")
    quant.pop("quant_method")
    (out / "quantize_config.json").write_text(json.dumps(quant | {"format": "gptq", "is_marlin_format": False}))
    assert is_quantized_checkpoint(out)
    torch.testing.assert_close(logits(load_quantized_model(out, dtype=torch.float32)), logits(fake_quantized(model, quantized)), **TOL)


def test_v2_declared_by_format_key(tmp_path, saved_checkpoint):
    """The same tensors read as v2 have zero points one lower: the format key must be honoured."""
    source, model, quantized = saved_checkpoint
    out = copy_checkpoint(source, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"].pop("checkpoint_format")
    config["quantization_config"]["format"] = "gptq_v2"
    (out / "config.json").write_text(json.dumps(config))
    (out / "quantize_config.json").unlink()
    loaded = load_quantized_model(out, dtype=torch.float32)
    assert loaded.model.layers[0].mlp.up_proj.checkpoint_format == "gptq_v2"
    shifted = {name: QuantizedWeight(qw.codes, qw.scales, qw.zeros - 1, qw.g_idx, qw.bits, qw.group_size) for name, qw in quantized.items()}
    torch.testing.assert_close(logits(loaded), logits(fake_quantized(model, shifted)), **TOL)


def test_loader_errors_name_the_problem(tmp_path, saved_checkpoint):
    source, _, _ = saved_checkpoint
    with pytest.raises(QtoolError, match="not a directory"):
        load_quantized_model(tmp_path / "nowhere")

    broken = copy_checkpoint(source, tmp_path / "bad_json")
    (broken / "quantize_config.json").write_text("{oops")
    with pytest.raises(QtoolError, match="quantize_config.json is not valid JSON"):
        load_quantized_model(broken)

    disagree = copy_checkpoint(source, tmp_path / "disagree")
    quant = json.loads((disagree / "quantize_config.json").read_text())
    (disagree / "quantize_config.json").write_text(json.dumps(quant | {"bits": 8}))
    with pytest.raises(QtoolError, match="quantize_config.json says bits 8"):
        load_quantized_model(disagree)

    marlin = copy_checkpoint(source, tmp_path / "marlin")
    (marlin / "quantize_config.json").unlink()
    config = json.loads((marlin / "config.json").read_text())
    config["quantization_config"]["is_marlin_format"] = True
    (marlin / "config.json").write_text(json.dumps(config))
    with pytest.raises(QtoolError, match="Marlin"):
        load_quantized_model(marlin)

    reshaped = copy_checkpoint(source, tmp_path / "reshaped")
    tensors = load_file(reshaped / "model.safetensors")
    tensors["model.layers.0.mlp.gate_proj.scales"] = tensors["model.layers.0.mlp.gate_proj.scales"][:2].clone()
    save_file(tensors, str(reshaped / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QtoolError, match=r"model\.safetensors: model\.layers\.0\.mlp\.gate_proj\.scales has shape \(2, 160\)"):
        load_quantized_model(reshaped)

    missing = copy_checkpoint(source, tmp_path / "missing")
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.0.post_attention_layernorm.weight"], tensors["model.layers.0.self_attn.k_proj.g_idx"]
    save_file(tensors, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QtoolError, match=r"k_proj\.g_idx missing"):
        load_quantized_model(missing)
    tensors["model.layers.0.self_attn.k_proj.g_idx"] = torch.arange(96, dtype=torch.int32) // 32
    save_file(tensors, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QtoolError, match=r"^model\.layers\.0\.post_attention_layernorm\.weight: LlamaForCausalLM expects this tensor but the weight files lack it \(1 missing in all\)"):
        load_quantized_model(missing)

    truncated = copy_checkpoint(source, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(QtoolError, match="cannot read .*model.safetensors"):
        load_quantized_model(truncated)


def test_is_quantized_checkpoint(tmp_path, saved_checkpoint, make_tiny_llama):
    source, _, _ = saved_checkpoint
    assert is_quantized_checkpoint(source)
    float_dir = tmp_path / "float"
    make_tiny_llama().save_pretrained(float_dir)
    assert not is_quantized_checkpoint(float_dir)
    assert not is_quantized_checkpoint(tmp_path / "nowhere")


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gptqmodel"


@pytest.mark.parametrize(
    "name",
    ["llama_w4_g32_sym", "llama_w4_g64_asym_descact", "llama_w3_g32_sym", "llama_w2_g32_asym", "llama_w8_perchannel_sym", "llama_w4_g32_asym_v2"],
)
def test_loads_gptqmodel_output(name):
    """Checkpoints written by the real GPTQModel (tests/fixtures/gptqmodel/make_fixtures.py) give the logits of
    its float16 torch backend; the float model's logits show the tolerance is far below the quantization effect."""
    directory = FIXTURES / name
    if not (directory / "reference_logits.pt").exists():
        pytest.skip(f"fixture {name} not generated (run tests/fixtures/gptqmodel/make_fixtures.py in the peer venv)")
    input_ids = torch.load(directory / "input_ids.pt")
    expected = torch.load(directory / "reference_logits.pt").float()
    with torch.no_grad():
        got = load_quantized_model(directory, dtype=torch.float16)(input_ids=input_ids).logits.float()
    atol = 4e-3  # two float16 steps at the logits' magnitude (~4)
    assert (torch.load(FIXTURES / "float_logits.pt").float() - expected).abs().max() > 10 * atol
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


@pytest.mark.slow
def test_smollm2_from_gguf_round_trip(tmp_path, smollm2_path):
    """The real model read from GGUF (tied embeddings, GGUF marker, rope_parameters) saved 4-bit and reloaded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32).eval()
    quantized = quantize_linears(model, 4, 128)
    out = save_quantized_model(tmp_path / "smol", model, quantized, {}, max_shard_size_bytes=100 * 2**20)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True and config["quantization_config"]["bits"] == 4
    loaded = load_quantized_model(out, dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    expected = logits(fake_quantized(model, quantized))
    assert math.isfinite(expected.abs().max().item())
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float16_overflow_is_an_infinity_made_from_a_finite_value(dtype):
    from qtool.checkpoints.gptq_checkpoint import overflows_float16

    def check(values: torch.Tensor) -> bool:
        return overflows_float16(values, values.to(torch.float16))

    values = (torch.randn(37, 53) * 1000).to(dtype)
    assert not check(values)
    big = values.clone()
    big[torch.randint(0, 37, ()), torch.randint(0, 53, ())] = -70000.0
    assert check(big)
    # infinities and NaNs that were there already are no overflow; one beside them still is
    special = values.clone()
    special[0, 0], special[1, 1], special[2, 2] = float("inf"), float("-inf"), float("nan")
    assert not check(special)
    special[3, 3] = 1e6
    assert check(special)
    assert not check(torch.empty(0, 4, dtype=dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="packing on the compute device needs CUDA")
@pytest.mark.parametrize("bits,checkpoint_format", [(2, "gptq_v2"), (3, "gptq"), (4, "gptq"), (8, "gptq_v2")])
def test_packing_on_the_gpu_writes_the_same_bytes(tmp_path, make_tiny_llama, bits, checkpoint_format):
    model = widened_llama(make_tiny_llama, seed=bits)
    quantized = quantize_linears(model, bits, 32, False, bits == 3, 1 if checkpoint_format == "gptq" else 0, seed=bits)
    on_host = save_quantized_model(tmp_path / "host", model, quantized, {}, checkpoint_format=checkpoint_format)
    on_gpu = save_quantized_model(tmp_path / "gpu", model, quantized, {}, checkpoint_format=checkpoint_format, pack_device=torch.device("cuda"))
    host_tensors, gpu_tensors = load_file(on_host / "model.safetensors"), load_file(on_gpu / "model.safetensors")
    assert list(host_tensors) == list(gpu_tensors)
    for name, tensor in host_tensors.items():
        assert gpu_tensors[name].dtype == tensor.dtype and torch.equal(gpu_tensors[name], tensor), name
    assert (on_host / "config.json").read_text() == (on_gpu / "config.json").read_text()
