"""Conversions between GPTQ, EXL2 and float16 on tiny random Llamas, each checked here by logits: source and
output are loaded with qtool's loaders (float16 output with transformers alone) and compared on fixed ids;
lossless paths bit-equal, lossy ones within what the reported weight change allows."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qtool.core.errors import QtoolError
from qtool.checkpoints.gptq_checkpoint import load_quantized_model, save_quantized_model
from qtool.convert.convert import check_ids, convert_checkpoint
from qtool.checkpoints.exl2_checkpoint import exl2_weights_of, load_exl2_model, save_exl2_model
from qtool.formats.exl2 import Exl2Weight
from qtool.kernels.exl2_linear import Exl2Linear
from qtool.kernels.quant_linear import QuantLinear
from qtool.quant.gptq import gptq_quantize
from qtool.quant.rtn import rtn_quantize

IDS = torch.tensor([[3, 17, 250, 9, 41, 128, 77, 5, 199, 64, 12, 300, 1]])


def widened(make_tiny_llama, seed, **overrides):
    """Weights of std 0.1 so that every linear visibly moves the logits."""
    model = make_tiny_llama(seed=seed, **overrides)
    gen = torch.Generator().manual_seed(seed + 50)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def linears(model, head=False):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and (head or n != "lm_head")}


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.double()


def check_logits(model):
    """Logits on the ids the conversion's own check uses (no tokenizer in these checkpoints)."""
    return logits(model, check_ids(None, model.config.vocab_size))


def gptq_checkpoint(path, model, bits=4, group_size=32, sym=True, act_order=False):
    if act_order:
        gen = torch.Generator().manual_seed(bits)
        quantized = {}
        for name, module in linears(model).items():
            x = torch.randn(256, module.in_features, generator=gen) * torch.linspace(0.2, 2.0, module.in_features)
            quantized[name] = gptq_quantize(module.weight.detach(), 2 * x.T @ x / 256, bits, group_size, sym=sym, desc_act=True).quantized
    else:
        quantized = {n: rtn_quantize(m.weight.detach(), bits, group_size, sym=sym, min_zero=0 if sym else 1).quantized for n, m in linears(model).items()}
    save_quantized_model(path, model, quantized)
    for qw in quantized.values():
        qw.scales = qw.scales.half().float()  # what the checkpoint holds
    return quantized


def exl2_checkpoint(path, model, layouts, seed, head=False):
    """Random EXL2 linears; layouts maps in_features to [(bits, rows), ...]."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in linears(model, head).items():
        layout = layouts[module.in_features]
        weights[name] = Exl2Weight(
            codes=torch.cat([torch.randint(0, 1 << b, (r, module.out_features), generator=gen) for b, r in layout]).to(torch.int32),
            qscale=torch.randint(1, 17, (len(layout), module.out_features), generator=gen, dtype=torch.int32),
            scale_max=(torch.rand(len(layout), generator=gen) * 0.04 + 0.01).half(),
            group_bits=tuple(b for b, _ in layout),
            group_sizes=tuple(r for _, r in layout),
            perm=torch.randperm(module.in_features, generator=gen),
        )
    save_exl2_model(path, model, weights)
    return weights


UNIFORM_4 = {96: [(4, 64), (4, 32)], 160: [(4, 96), (4, 64)]}
MIXED = {96: [(6, 32), (4, 64)], 160: [(5, 64), (3, 96)]}


def test_gptq_to_exl2_rounds_scales_only_and_reports_it(tmp_path, make_tiny_llama):
    model = widened(make_tiny_llama, 1)
    quantized = gptq_checkpoint(tmp_path / "gptq", model)
    report = convert_checkpoint("gptq", "exl2", tmp_path / "gptq", tmp_path / "exl2")
    assert not report.lossless and report.bits_per_weight < 5
    source = load_quantized_model(tmp_path / "gptq", dtype=torch.float32)
    output = load_exl2_model(tmp_path / "exl2", dtype=torch.float32)
    assert report.logits_max_abs_diff == pytest.approx(float((check_logits(output) - check_logits(source)).abs().max()), rel=1e-12, abs=1e-12)
    for name, w in exl2_weights_of(output).items():
        ref = quantized[name].dequantize().double()
        rel = float((w.dequantize().double() - ref).norm() / ref.norm())
        # 4-bit scale levels are at most ~13% apart near the top, so a rounded scale is within ~6.5%
        assert rel < 0.07
        assert set(w.group_bits) <= {4, 3, 2}  # codes - zero of 4-bit symmetric GPTQ need no more bits
        reported = next(linear for linear in report.linears if linear.name == name)
        assert reported.rel_error == pytest.approx(rel, rel=1e-9)
    config = json.loads((tmp_path / "exl2" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "exl2" and config["head_bits"] == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_exl2_gptq_exl2_is_lossless_for_uniform_models(tmp_path, make_tiny_llama, bits):
    model = widened(make_tiny_llama, bits)
    layouts = {k: [(bits, r) for _, r in v] for k, v in UNIFORM_4.items()}
    exl2_checkpoint(tmp_path / "a", model, layouts, seed=bits)
    first = convert_checkpoint("exl2", "gptq", tmp_path / "a", tmp_path / "g")
    assert first.lossless and first.logits_max_abs_diff == 0.0 and not any("nearest" in note for note in first.notes)
    gptq = load_quantized_model(tmp_path / "g", dtype=torch.float32)
    assert all(m.bits == bits for m in gptq.modules() if isinstance(m, QuantLinear))
    second = convert_checkpoint("gptq", "exl2", tmp_path / "g", tmp_path / "b")
    assert second.lossless
    start = load_exl2_model(tmp_path / "a", dtype=torch.float32)
    end = load_exl2_model(tmp_path / "b", dtype=torch.float32)
    assert torch.equal(logits(gptq), logits(start))
    assert torch.equal(logits(end), logits(start))
    assert (logits(start) - logits(widened(make_tiny_llama, bits))).abs().max() > 1e-2  # quantization matters


def test_mixed_exl2_to_gptq_nearest_width_or_lossless_wide(tmp_path, make_tiny_llama):
    model = widened(make_tiny_llama, 7, tie_word_embeddings=True)
    exl2_checkpoint(tmp_path / "m", model, MIXED, seed=7)
    nearest = convert_checkpoint("exl2", "gptq", tmp_path / "m", tmp_path / "g4")
    assert not nearest.lossless and any("--bits 8" in note for note in nearest.notes)
    gptq = load_quantized_model(tmp_path / "g4", dtype=torch.float32)
    assert {m.bits for m in gptq.modules() if isinstance(m, QuantLinear)} == {4}
    source = load_exl2_model(tmp_path / "m", dtype=torch.float32)
    assert float((check_logits(gptq) - check_logits(source)).abs().max()) == pytest.approx(nearest.logits_max_abs_diff, abs=1e-12)
    wide = convert_checkpoint("exl2", "gptq", tmp_path / "m", tmp_path / "g8", bits=8)
    assert wide.lossless
    assert torch.equal(logits(load_quantized_model(tmp_path / "g8", dtype=torch.float32)), logits(source))
    # an explicit group size must cut the EXL2 groups
    with pytest.raises(QtoolError, match="--group-size 64"):
        convert_checkpoint("exl2", "gptq", tmp_path / "m", tmp_path / "bad", bits=8, group_size=64)


@pytest.mark.parametrize("source_format", ["gptq", "exl2"])
def test_to_float16_is_exact(tmp_path, make_tiny_llama, source_format):
    model = widened(make_tiny_llama, 11, tie_word_embeddings=True)
    if source_format == "gptq":
        given = {n: q.dequantize(torch.float16) for n, q in gptq_checkpoint(tmp_path / "src", model, bits=3, group_size=64, act_order=True).items()}
    else:
        given = {n: w.dequantize(torch.float16) for n, w in exl2_checkpoint(tmp_path / "src", model, MIXED, seed=11).items()}
    report = convert_checkpoint(source_format, "float", tmp_path / "src", tmp_path / "f")
    assert report.lossless and report.logits_max_abs_diff == 0.0 and report.logits_dtype == "float16"
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert "quantization_config" not in config
    converted = AutoModelForCausalLM.from_pretrained(str(tmp_path / "f"), dtype=torch.float16)
    for name, weight in given.items():
        assert torch.equal(converted.get_submodule(name).weight, weight), name
    # in float32 the float model differs from the quantized source only by the float16 rounding of its weights
    source = (load_quantized_model if source_format == "gptq" else load_exl2_model)(tmp_path / "src", dtype=torch.float32)
    as_float32 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "f"), dtype=torch.float32)
    expected, got = logits(source), logits(as_float32)
    assert 0 < float((got - expected).norm() / expected.norm()) < 2e-3


def test_asymmetric_and_act_order_gptq(tmp_path, make_tiny_llama):
    model = widened(make_tiny_llama, 13)
    gptq_checkpoint(tmp_path / "asym", model, bits=3, group_size=32, sym=False)
    report = convert_checkpoint("gptq", "exl2", tmp_path / "asym", tmp_path / "e1")
    widths = {b for w in exl2_weights_of(load_exl2_model(tmp_path / "e1")).values() for b in w.group_bits}
    assert max(widths) == 4  # codes - zero of 3-bit asym span -7..7
    assert report.logits_rel_diff < 0.5
    gptq_checkpoint(tmp_path / "act", model, bits=4, group_size=32, act_order=True)
    convert_checkpoint("gptq", "exl2", tmp_path / "act", tmp_path / "e2")
    exl2 = load_exl2_model(tmp_path / "e2", dtype=torch.float32)
    assert any(not torch.equal(w.perm, torch.arange(w.in_features)) for w in exl2_weights_of(exl2).values())
    back = convert_checkpoint("exl2", "gptq", tmp_path / "e2", tmp_path / "g2")
    assert back.lossless
    assert torch.equal(logits(load_quantized_model(tmp_path / "g2", dtype=torch.float32)), logits(exl2))


def test_quantized_head_and_odd_vocab(tmp_path, make_tiny_llama):
    model = widened(make_tiny_llama, 17, vocab_size=301)
    exl2_checkpoint(tmp_path / "h", model, UNIFORM_4, seed=17, head=True)
    loaded = load_exl2_model(tmp_path / "h", dtype=torch.float32)
    assert isinstance(loaded.lm_head, Exl2Linear)
    report = convert_checkpoint("exl2", "gptq", tmp_path / "h", tmp_path / "g")
    # a 301-wide head cannot be packed as GPTQ: kept as float16, the rest exact
    assert any("lm_head" in note and "float16" in note for note in report.notes)
    gptq = load_quantized_model(tmp_path / "g", dtype=torch.float32)
    assert not isinstance(gptq.lm_head, QuantLinear)
    assert float((check_logits(gptq) - check_logits(loaded)).abs().max()) == report.logits_max_abs_diff
    assert report.logits_rel_diff < 1e-3  # float16 of a 4-bit weight is close


@pytest.mark.parametrize(
    "args, message",
    [
        (("gptg", "exl2"), "did you mean 'gptq'"),
        (("gptq", "gptq"), "both gptq"),
        (("float", "exl2"), "cannot be converted to a quantized format"),
        (("exl2", "gptq"), "is a gptq checkpoint, not exl2"),
        (("gptq", "exl3"), "did you mean 'exl2'"),
    ],
)
def test_bad_requests(tmp_path, make_tiny_llama, args, message):
    gptq_checkpoint(tmp_path / "g", widened(make_tiny_llama, 2))
    with pytest.raises(QtoolError, match=message):
        convert_checkpoint(*args, tmp_path / "g", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_rules(tmp_path, make_tiny_llama):
    gptq_checkpoint(tmp_path / "g", widened(make_tiny_llama, 3))
    (tmp_path / "taken").mkdir()
    with pytest.raises(QtoolError, match="already exists"):
        convert_checkpoint("gptq", "float", tmp_path / "g", tmp_path / "taken")
    convert_checkpoint("gptq", "float", tmp_path / "g", tmp_path / "taken", force=True)
    assert (tmp_path / "taken" / "config.json").exists()
    with pytest.raises(QtoolError, match="apply to exl2 -> gptq only"):
        convert_checkpoint("gptq", "exl2", tmp_path / "g", tmp_path / "x", bits=4)
    with pytest.raises(QtoolError, match="not a checkpoint directory"):
        convert_checkpoint("gptq", "exl2", tmp_path / "missing", tmp_path / "y")
    source_files = sorted(p.name for p in (tmp_path / "g").iterdir())
    for output, says in [(tmp_path / "g", "is the input"), (tmp_path / "g" / "inner", "inside the input"), (tmp_path, "is inside the output")]:
        with pytest.raises(QtoolError, match=says):
            convert_checkpoint("gptq", "float", tmp_path / "g", output, force=True)
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == source_files
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(QtoolError, match="qtool did not write"):
        convert_checkpoint("gptq", "float", tmp_path / "g", tmp_path / "notes", force=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging or lock left behind


@pytest.mark.slow
def test_smollm2_round_trip(tmp_path, smollm2_path):
    """The real model (tied embeddings, 576-wide with groups of 128 leaving 64 rows): GPTQ -> EXL2 -> GPTQ, the
    second step lossless, and `load_model` on the EXL2 output (what `qtool eval` uses)."""
    from qtool.checkpoints.sources import load_model

    loaded = load_model(str(smollm2_path), device="cpu", dtype="float32")
    model = loaded.model
    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(("model.layers.0.", "model.layers.1."))}
    quantized = {n: rtn_quantize(m.weight.detach(), 4, 128).quantized for n, m in targets.items()}
    save_quantized_model(tmp_path / "gptq", model, quantized, tokenizer=loaded.tokenizer)
    first = convert_checkpoint("gptq", "exl2", tmp_path / "gptq", tmp_path / "exl2")
    assert not first.lossless and first.logits_rel_diff < 0.2
    back = convert_checkpoint("exl2", "gptq", tmp_path / "exl2", tmp_path / "back")
    assert back.lossless and back.logits_rel_diff < 1e-5
    exl2 = load_model(str(tmp_path / "exl2"), device="cpu", dtype="float32")
    assert exl2.tokenizer is not None and exl2.quantization_config["quant_method"] == "exl2"
    assert sum(isinstance(m, Exl2Linear) for m in exl2.model.modules()) == len(quantized)
    ids = exl2.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(exl2.model(ids).logits).all()
