"""configs/model_rules.py: group size against SmolLM2's real linear shapes (shapes only, no model), the counts of
ModelStats against a built model, and the memory rule with the free memory passed in."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig

from qtool.core.findings import Level
from qtool.models.rules import ModelStats, estimate_peak_memory, validate_for_hardware, validate_for_model
from qtool.config.schema import CalibrationConfig, QuantConfig

# SmolLM2-135M: hidden 576, intermediate 1536, 9 query heads and 3 key/value heads of 64, 30 layers.
SMOLLM2_LINEARS = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (576, 192),
    "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (576, 1536),
    "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}
SMOLLM2_SHAPES = {f"model.layers.{i}.{name}": shape for i in range(30) for name, shape in SMOLLM2_LINEARS.items()}
WIDE_576 = "model.layers.*.mlp.gate_proj, model.layers.*.mlp.up_proj, model.layers.*.self_attn.k_proj, model.layers.*.self_attn.o_proj and 2 more (180 linears)"


def smollm2_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def lines(findings, level):
    return [f"{f.where}: {f.message}" for f in findings if f.level is level]


def config_with(samples=128, seqlen=512, **changes) -> QuantConfig:
    return dataclasses.replace(QuantConfig(**changes), calibration=CalibrationConfig(samples=samples, seqlen=seqlen))


# ---------------------------------------------------------------- group size vs widths


def test_smollm2_g128_passes_with_one_info_for_the_partial_group():
    findings = validate_for_model(QuantConfig(group_size=128), SMOLLM2_SHAPES)
    assert lines(findings, Level.ERROR) == [] and lines(findings, Level.WARNING) == []
    assert lines(findings, Level.INFO) == [f"{WIDE_576}: 576 = 4×128 + 64: last group has 64 columns"]


@pytest.mark.parametrize("group_size", [-1, 32, 64, 96, 192])
def test_smollm2_group_sizes_that_divide_every_width_are_silent(group_size):
    assert validate_for_model(QuantConfig(group_size=group_size), SMOLLM2_SHAPES) == []


def test_group_larger_than_width_warns_and_partial_wider_layer_informs():
    findings = validate_for_model(QuantConfig(group_size=1024), SMOLLM2_SHAPES)
    assert lines(findings, Level.WARNING) == [f"{WIDE_576}: group size 1024 is larger than the 576 input columns: one group per row"]
    assert lines(findings, Level.INFO) == ["model.layers.*.mlp.down_proj (30 linears): 1536 = 1×1024 + 512: last group has 512 columns"]


@pytest.mark.parametrize("width", [100, 576 + 16, 33])
def test_width_not_multiple_of_32_warns_and_is_left_out(width):
    shapes = {"model.layers.0.mlp.odd": (width, 64), "model.layers.0.mlp.even": (64, 64)}
    findings = validate_for_model(QuantConfig(group_size=128), shapes)
    assert lines(findings, Level.WARNING) == [
        f"model.layers.*.mlp.odd (1 linear): shape {width} in x 64 out is not a multiple of 32: the layer stays float16",
        "model.layers.*.mlp.even (1 linear): group size 128 is larger than the 64 input columns: one group per row",
    ]
    assert lines(findings, Level.ERROR) == []


def test_output_width_not_multiple_of_32_also_stays_float():
    findings = validate_for_model(QuantConfig(group_size=-1), {"model.layers.0.x": (64, 48), "model.layers.0.y": (64, 64)})
    assert lines(findings, Level.WARNING) == ["model.layers.*.x (1 linear): shape 64 in x 48 out is not a multiple of 32: the layer stays float16"]


def test_no_quantizable_linear_is_an_error():
    assert lines(validate_for_model(QuantConfig(), {}), Level.ERROR) == ["model: has no quantizable linear layers"]
    findings = validate_for_model(QuantConfig(), {"model.layers.0.x": (30, 30)})
    assert lines(findings, Level.ERROR) == ["model: has no quantizable linear layers (none has widths that are multiples of 32)"]


# ---------------------------------------------------------------- model stats


def test_stats_from_config_count_the_built_models_parameters(tiny_llama):
    stats = ModelStats.from_config(tiny_llama.config)
    assert stats.params == sum(p.numel() for p in tiny_llama.parameters())
    assert stats.layer_params == sum(p.numel() for p in tiny_llama.model.layers[0].parameters())
    assert stats.layers == len(tiny_llama.model.layers)
    widest = max(m.in_features for m in tiny_llama.modules() if isinstance(m, torch.nn.Linear) and m is not tiny_llama.lm_head)
    assert stats.max_in_features == widest


def test_stats_from_tensor_shapes_are_exact(make_tiny_llama):
    model = make_tiny_llama(tie_word_embeddings=True, intermediate_size=192)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items() if name != "lm_head.weight"}  # tied: stored once
    stats = ModelStats.from_config(model.config, shapes)
    assert stats.params == sum(p.numel() for p in model.parameters())
    assert stats.layer_params == sum(p.numel() for p in model.model.layers[1].parameters())
    assert stats.max_in_features == 192
    assert stats == dataclasses.replace(ModelStats.from_config(model.config), params=stats.params)


def test_stats_of_smollm2_config():
    stats = ModelStats.from_config(smollm2_config())
    per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536 + 2 * 576
    assert stats.layer_params == per_layer
    assert stats.params == 30 * per_layer + 49152 * 576 + 576
    assert stats.max_in_features == 1536
    assert stats.layer_outputs == 576 + 2 * 192 + 576 + 2 * 1536 + 576
    assert stats.largest_group_params == 2 * 576 * 1536  # gate+up, above q+k+v's 576 x (576 + 2 x 192)


# ---------------------------------------------------------------- memory


def test_estimate_grows_by_the_activation_bytes_per_sample():
    stats = ModelStats.from_config(smollm2_config())
    one = estimate_peak_memory(config_with(samples=10, seqlen=256), stats, "cpu")
    more = estimate_peak_memory(config_with(samples=11, seqlen=256), stats, "cpu")
    # inputs and outputs of a layer for one more sample, and what the replay records of it: each linear's output
    # (q 576, k and v 192 each, o 576, gate and up 1536 each, down 576) and four hidden-size vectors, float32
    assert more["cpu_bytes"] - one["cpu_bytes"] == 256 * 4 * (2 * 576 + (576 + 2 * 192 + 576 + 2 * 1536 + 576) + 4 * 576)
    assert one["components"]["weights"] == stats.params * 4
    assert one["components"]["hessians"] >= 1536 * 1536 * 4


def test_estimate_on_cuda_splits_weights_from_the_work():
    stats = ModelStats.from_config(smollm2_config())
    estimate = estimate_peak_memory(config_with(), stats, torch.device("cuda"))
    assert estimate["cpu_bytes"] == stats.params * 4
    components = estimate["components"]
    # the Hessians' solve and the largest group's are phases one after the other: the larger counts
    assert estimate["device_bytes"] == sum(v for k, v in components.items() if k not in ("weights", "block_recordings")) - min(components["hessians"], components["solve"])
    assert components["layer"] == stats.layer_params * 4 and components["codes"] == stats.layer_params
    hidden, intermediate = smollm2_config().hidden_size, smollm2_config().intermediate_size
    assert components["solve"] == 2 * hidden * intermediate * 4 * 3  # gate+up, stacked, transposed, dequantized


def test_fits_gives_one_info_per_memory_pool():
    stats = ModelStats.from_config(smollm2_config())
    findings = validate_for_hardware(config_with(), stats, "cpu", cpu_free_bytes=64 * 2**30)
    assert [f.level for f in findings] == [Level.INFO]
    assert findings[0].message.startswith("estimated peak ") and findings[0].message.endswith(" of 64.0 GiB free (activations in host memory)")
    findings = validate_for_hardware(config_with(), stats, torch.device("cuda:0"), cpu_free_bytes=64 * 2**30, device_free_bytes=80 * 2**30)
    assert [f.where for f in findings] == ["memory (cpu)", "memory (cuda:0)"] and all(f.level is Level.INFO for f in findings)


def test_does_not_fit_suggests_samples_and_seqlen_that_do():
    stats = ModelStats.from_config(smollm2_config())
    config = config_with(samples=512, seqlen=2048)
    need = estimate_peak_memory(config, stats, "cpu", cpu_free_bytes=0)["cpu_bytes"]  # the most frugal plan
    free = need // 3
    (finding,) = validate_for_hardware(config, stats, "cpu", cpu_free_bytes=free)
    assert finding.level is Level.ERROR and finding.where == "memory (cpu)"
    assert "exceeds the" in finding.message
    options = dict(part.split(" ") for part in finding.fix.removeprefix("use ").split(" or ") if part.startswith("--"))
    samples, seqlen = int(options["--samples"]), int(options["--seqlen"])

    def need_of(samples: int, seqlen: int) -> int:
        return estimate_peak_memory(config_with(samples=samples, seqlen=seqlen), stats, "cpu", cpu_free_bytes=free)["cpu_bytes"]

    assert need_of(samples, 2048) <= free < need_of(samples + 1, 2048)
    assert need_of(512, seqlen) <= free


def test_model_too_large_for_the_cpu_says_so():
    stats = ModelStats.from_config(smollm2_config())
    (finding,) = validate_for_hardware(config_with(), stats, "cpu", cpu_free_bytes=stats.params * 4 - 1)
    assert finding.level is Level.ERROR
    assert finding.fix == "the float32 model alone does not fit: use a machine with more memory"


def test_device_too_small_suggests_the_cpu():
    stats = ModelStats.from_config(smollm2_config())
    config = config_with(samples=256, seqlen=2048)
    # the activations would go to the host: 128 MiB is less than the layer, its Hessians and its forward need alone
    findings = validate_for_hardware(config, stats, torch.device("cuda"), cpu_free_bytes=64 * 2**30, device_free_bytes=2**27)
    assert [f.level for f in findings] == [Level.INFO, Level.ERROR]
    assert findings[1].where == "memory (cuda)" and findings[1].fix.endswith("--device cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA, where its free memory is unknown")
def test_unknown_free_memory_is_reported_as_info():
    stats = ModelStats.from_config(smollm2_config())
    findings = validate_for_hardware(config_with(), stats, torch.device("cuda"), cpu_free_bytes=64 * 2**30)
    assert lines(findings, Level.INFO)[1].endswith("free memory unknown")


def test_free_device_memory_of_a_device_named_without_an_index(monkeypatch):
    """`--device cuda` reaches device_free_memory as torch.device("cuda"); torch's per-process fraction query takes
    only an indexed device (it raises ValueError otherwise, as torch 2.11 does), so the current device's index is
    filled in. CUDA's queries are stood in for: this machine has no GPU."""
    from qtool.models import rules

    def fraction(device):
        if isinstance(device, torch.device) and device.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        return 0.5

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", fraction, raising=False)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 << 30)
    # capped at half of 80 GiB, less the 2 GiB the allocator already holds
    assert rules.device_free_memory(torch.device("cuda")) == 38 << 30
    assert rules.device_free_memory(torch.device("cpu")) is None
