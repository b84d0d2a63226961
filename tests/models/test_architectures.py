"""The architecture table against tiny random models built from transformers' own config classes: every
nn.Linear covered once, groups equal to a traced forward, embedding/head/tie facts, MoE facts, discovery."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

from qtool.core.errors import QtoolError
from qtool.models.architectures import (
    ARCHITECTURES,
    REGISTRY,
    WINDOW_SOURCES,
    ArchitectureSpec,
    build_registry,
    decoder_layers,
    discover_architecture,
    expert_checkpoint_groups,
    get_architecture,
    get_module,
    layer_groups,
    resolve_layer_groups,
    supported_model_types,
    uncovered_linears,
)

@pytest.fixture(scope="module")
def tiny(every_family, build_tiny):
    return every_family, build_tiny(every_family)


def _linear_names(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def test_every_family_in_the_table_is_tested(tiny_families):
    assert {name.split("-")[0] for name in tiny_families} == set(supported_model_types())
    required = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
                "granite", "stablelm"}
    assert required <= set(supported_model_types())
    assert {"qwen2_moe", "qwen3_moe"} & set(supported_model_types())


def test_every_linear_of_every_layer_covered_exactly_once(tiny):
    _, model = tiny
    spec = get_architecture(model)
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    excluded_seen: set[str] = set()
    for index, layer in enumerate(layers):
        prefix = f"{spec.layers_path}.{index}."
        resolved = [name for group in resolve_layer_groups(model, index) for name, _ in group]
        assert len(resolved) == len(set(resolved))
        listed = [name.removeprefix(prefix) for name in resolved]
        excluded = [name for name in spec.excluded_linears if name in _linear_names(layer)]
        excluded_seen.update(excluded)
        assert sorted(listed + excluded) == sorted(_linear_names(layer))
        assert uncovered_linears(model, index) == []
        for full_name, module in (pair for group in resolve_layer_groups(model, index) for pair in group):
            assert get_module(model, full_name) is module
    assert excluded_seen == set(spec.excluded_linears)  # an exclusion names a real linear, not a stale one


def test_groups_equal_the_inputs_a_traced_forward_shares(tiny):
    """The table's groups and order equal what tracing layer 0 finds: linears fed the identical tensor object,
    in call order (excluded router-like linears aside)."""
    _, model = tiny
    spec = get_architecture(model)
    traced = discover_architecture(model).sequential_groups
    traced = tuple(g for g in (tuple(n for n in grp if n not in spec.excluded_linears) for grp in traced) if g)
    assert layer_groups(model, 0) == traced


def test_embedding_head_norm_and_tie_facts(tiny):
    _, model = tiny
    spec = get_architecture(model)
    embed, head = get_module(model, spec.embed_path), get_module(model, spec.head_path)
    assert embed is model.get_input_embeddings()
    assert head is model.get_output_embeddings()
    assert isinstance(get_module(model, spec.norm_path), nn.Module)
    assert spec.ties_embeddings(model.config) == (head.weight is embed.weight)


@pytest.mark.parametrize("tie", [True, False])
def test_tie_fact_follows_the_config(tie, build_tiny):
    model = build_tiny("llama", tie_word_embeddings=tie)
    spec = get_architecture(model)
    assert spec.ties_embeddings(model.config) is tie
    assert (get_module(model, spec.head_path).weight is get_module(model, spec.embed_path).weight) is tie


def test_fusable_groups_share_an_input(tiny):
    _, model = tiny
    spec = get_architecture(model)
    found = set()
    for index, layer in enumerate(decoder_layers(model)):
        groups = layer_groups(model, index)
        for fused_name, members in spec.fusable_groups:
            group = next((g for g in groups if set(members) <= set(g)), None)
            if group is None:  # only a MoE family's dense/sparse layers may lack a fusion's members
                assert spec.moe is not None and not any(m in g for g in groups for m in members)
                continue
            found.add(fused_name)
            assert len({get_module(layer, m).in_features for m in members}) == 1
    assert found == {name for name, _ in spec.fusable_groups}


def _windows_transformers_applies(model: nn.Module, layers: nn.ModuleList, length: int) -> list[int | None]:
    """Each layer's window as transformers' eager attention sees it: how many keys the last query's mask row lets
    through (None where it lets all `length` through)."""
    masks = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda module, args, kwargs, index=index: masks.__setitem__(index, kwargs.get("attention_mask")),
        with_kwargs=True) for index, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(torch.arange(3, 3 + length)[None])
    finally:
        for hook in hooks:
            hook.remove()
    windows = []
    for index in range(len(layers)):
        row = masks[index][0, 0, -1]
        visible = int(row.sum()) if row.dtype == torch.bool else int((row == 0).sum())
        windows.append(visible if visible < length else None)
    return windows


def test_layer_windows_are_the_ones_transformers_applies(tiny):
    family, model = tiny
    spec = get_architecture(model)
    assert spec.sliding_window in (None, *WINDOW_SOURCES)
    layers = decoder_layers(model, spec)
    if not hasattr(layers[0], "self_attn"):
        pytest.skip(f"{family}'s attention is not self_attn")
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")  # masks as tensors, windows included
    try:
        ours = [spec.layer_window(model.config, layer.self_attn) for layer in layers]
        assert ours == _windows_transformers_applies(model, layers, length=12)
    finally:
        model.set_attn_implementation(before)


def test_multipliers_are_the_ones_transformers_applies(tiny):
    """The first layer's input is the embeddings' output times embedding_multiplier, and (where both branches add
    straight onto the residual) its output is input + residual_multiplier x (attention + MLP outputs)."""
    family, model = tiny
    spec = get_architecture(model)
    layer = decoder_layers(model, spec)[0]
    seen = {}

    def keep(name):
        return lambda module, args, kwargs, output: seen.__setitem__(name, (args, kwargs, output))

    modules = {"embed": get_module(model, spec.embed_path), "layer": layer}
    modules.update({name: getattr(layer, name) for name in ("self_attn", "mlp") if hasattr(layer, name)})
    hooks = [module.register_forward_hook(keep(name), with_kwargs=True) for name, module in modules.items()]
    try:
        with torch.no_grad():
            model(torch.arange(3, 12)[None])
    finally:
        for hook in hooks:
            hook.remove()
    first = lambda value: value[0] if isinstance(value, tuple) else value  # noqa: E731
    args, kwargs, _ = seen["layer"]
    layer_input = args[0] if args else kwargs["hidden_states"]
    embedded = first(seen["embed"][2])
    torch.testing.assert_close(layer_input, embedded * spec.embedding_multiplier(model.config))
    branches_add_straight = "self_attn" in seen and "mlp" in seen and not any(
        hasattr(layer, norm) for norm in ("post_feedforward_layernorm", "post_attention_layernorm_post"))
    if family in ("granite", "llama") and not branches_add_straight:
        pytest.fail(f"{family}'s layer was expected to add its branches straight onto the residual")
    if branches_add_straight:
        branches = first(seen["self_attn"][2]) + first(seen["mlp"][2])
        expected = layer_input + spec.residual_multiplier(model.config) * branches
        torch.testing.assert_close(first(seen["layer"][2]), expected, rtol=1e-4, atol=1e-5)


def test_moe_facts_describe_the_installed_classes(moe_family, build_tiny):
    model = build_tiny(moe_family)
    spec = get_architecture(model)
    moe = spec.moe
    experts = spec.num_experts(model.config)
    assert experts == 4
    sparse_layers = 0
    for index, layer in enumerate(decoder_layers(model)):
        groups = resolve_layer_groups(model, index)
        names = {name for group in groups for name, _ in group}
        try:
            expert_module = layer.get_submodule(moe.experts_path)
        except AttributeError:
            assert expert_checkpoint_groups(model, index) == []
            continue
        sparse_layers += 1
        # transformers 5: routed experts are fused 3-D parameters, no nn.Linear to quantize
        assert not moe.routed_experts_are_linear
        assert not any(isinstance(m, nn.Linear) for m in expert_module.modules())
        for fused_name, members in moe.fused_experts:
            param = getattr(expert_module, fused_name)
            assert isinstance(param, nn.Parameter) and param.dim() == 3 and param.shape[0] == experts
            assert param.shape[1] % len(members) == 0
        router = layer.get_submodule(moe.router_path)
        assert router.weight.shape == (experts, model.config.hidden_size)
        assert not any(name.startswith(f"{spec.layers_path}.{index}.{moe.router_path}") for name in names)
        if moe.shared_expert_path:
            shared = f"{spec.layers_path}.{index}.{moe.shared_expert_path}."
            assert any(name.startswith(shared) for name in names)
        expanded = expert_checkpoint_groups(model, index)
        assert [len(group) for group in expanded] == [experts * len(g) for g in moe.checkpoint_expert_groups()]
        assert f"{spec.layers_path}.{index}.{moe.checkpoint_expert_groups()[0][0].format(e=3)}" in expanded[0]
    assert sparse_layers >= 1


def test_expert_checkpoint_names_match_transformers_conversion(moe_family):
    """The per-expert checkpoint names and their concatenation order are the ones transformers fuses on load."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    moe = REGISTRY[moe_family].moe
    converters = get_checkpoint_conversion_mapping(moe_family)
    assert converters
    for fused_name, members in moe.fused_experts:
        ours = ["." + m.replace("{e}", "*") + ".weight" for m in members]
        match = [c for c in converters if any(str(t).endswith("experts." + fused_name) for t in c.target_patterns)]
        assert len(match) == 1
        sources = list(match[0].source_patterns)
        assert len(sources) == len(ours)
        assert all(mine.endswith(theirs) or mine.endswith("." + theirs) for mine, theirs in zip(ours, sources))


def test_dense_layer_of_a_moe_family_uses_the_dense_mlp_groups(build_tiny):
    model = build_tiny("qwen2_moe")  # mlp_only_layers=[1]
    assert layer_groups(model, 1)[2:] == REGISTRY["qwen2_moe"].moe.dense_mlp_groups
    assert layer_groups(model, 0)[2][0] == "mlp.shared_expert.gate_proj"


def test_parallel_residual_variant_follows_the_config(build_tiny):
    spec = REGISTRY["stablelm"]
    assert layer_groups(build_tiny("stablelm"), 0) == spec.sequential_groups
    assert layer_groups(build_tiny("stablelm-parallel"), 0) == spec.parallel_groups
    assert spec.parallel_groups != spec.sequential_groups


def test_unknown_type_is_discovered_by_tracing(caplog, build_tiny):
    model = build_tiny("llama")
    without_llama = build_registry(tuple(s for s in ARCHITECTURES if "llama" not in s.model_types))
    with caplog.at_level(logging.INFO, logger="qtool.models.architectures"):
        spec = get_architecture(model, registry=without_llama)
    table = REGISTRY["llama"]
    assert spec.discovered and not table.discovered
    assert spec.sequential_groups == table.sequential_groups
    assert (spec.layers_path, spec.embed_path, spec.norm_path, spec.head_path) == (
        table.layers_path, table.embed_path, table.norm_path, table.head_path)
    assert "not in the architecture table" in caplog.text
    assert [n for g in resolve_layer_groups(model, 1, spec) for n, _ in g] == [
        n for g in resolve_layer_groups(model, 1) for n, _ in g]


def test_unknown_type_with_only_a_config_lists_supported_types(tiny_common):
    config = transformers.LlamaConfig(**tiny_common)
    registry = build_registry(tuple(s for s in ARCHITECTURES if "llama" not in s.model_types))
    with pytest.raises(QtoolError) as info:
        get_architecture(config, registry=registry)
    assert "'llama'" in info.value.message and "mistral" in info.value.hint and "llama," not in info.value.hint


class _NoLayers(nn.Module):
    """A model with embeddings and a head but no list of decoder layers."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", num_hidden_layers=2)
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 16)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, **kwargs):
        return self.head(self.blocks(self.embed(input_ids)))


def test_no_layer_list_is_an_error_listing_supported_types():
    with pytest.raises(QtoolError) as info:
        get_architecture(_NoLayers())
    assert "'toy'" in info.value.message and "ModuleList" in info.value.message
    assert all(t in info.value.hint for t in ("llama", "gemma3_text", "mixtral"))
    with pytest.raises(QtoolError):
        decoder_layers(_NoLayers())


def test_table_errors(build_tiny):
    with pytest.raises(ValueError, match="listed twice"):
        build_registry((REGISTRY["llama"], REGISTRY["llama"]))
    with pytest.raises(TypeError):
        REGISTRY["new"] = REGISTRY["llama"]  # read-only
    model = build_tiny("llama")
    with pytest.raises(QtoolError, match="layer index 2"):
        resolve_layer_groups(model, 2)
    broken = ArchitectureSpec(model_types=("llama",), sequential_groups=(("self_attn.q_proj", "self_attn.nope"),))
    with pytest.raises(QtoolError, match="self_attn.nope"):
        resolve_layer_groups(model, 0, broken)
    not_linear = ArchitectureSpec(model_types=("llama",), sequential_groups=(("self_attn",),))
    with pytest.raises(QtoolError, match="is a LlamaAttention"):
        resolve_layer_groups(model, 0, not_linear)
