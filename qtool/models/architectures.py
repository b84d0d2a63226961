"""Model architectures as data: where a causal LM keeps its decoder layers, embeddings, final norm and head, and
which linear modules of one decoder layer a sequential (GPTQ) quantizer visits, grouped by the input they share.

The table describes the module trees of the installed transformers (5.x). Unknown model types fall back to
discovering a layer's linears by tracing one tiny forward through decoder layer 0."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from qtool.core.errors import QtoolError

log = logging.getLogger(__name__)

Groups = tuple[tuple[str, ...], ...]

# Logit transforms the CausalLM forward applies after the head, each reading one config field (None = skipped).
LOGIT_TRANSFORMS = ("softcap", "divide", "multiply")
WINDOW_SOURCES = ("attention", "config")
# Names a final norm has next to the decoder-layer list; only used by the discovery fallback.
FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")


@dataclass(frozen=True)
class MoeSpec:
    """Facts about a sparse mixture-of-experts block. transformers 5 stores the routed experts of every family in
    this table as fused 3-D Parameters ([num_experts, out, in]) on `experts_path`, not as nn.Linear modules, so
    they are not quantizable linears in this version; checkpoints still name them per expert."""

    num_experts_field: str  # config field holding the number of routed experts
    block_path: str  # the sparse block inside a layer
    router_path: str  # picks experts per token: never quantized
    experts_path: str  # module holding the routed experts
    # fused 3-D parameter of `experts_path` -> the per-expert checkpoint linears it concatenates along `out`, in order;
    # "{e}" is the expert index and names are relative to the decoder layer as they appear in HF checkpoints
    fused_experts: tuple[tuple[str, tuple[str, ...]], ...]
    shared_expert_path: str | None = None  # an always-on expert made of ordinary nn.Linear modules
    # groups replacing those under `block_path` in layers built dense (e.g. Qwen's mlp_only_layers)
    dense_mlp_groups: Groups = ()
    routed_experts_are_linear: bool = False

    def checkpoint_expert_groups(self) -> Groups:
        """Per-expert checkpoint linear patterns grouped by shared input (gate/up, then down)."""
        return tuple(members for _, members in self.fused_experts)


@dataclass(frozen=True)
class ArchitectureSpec:
    """One family of decoder-only causal LMs. Module names in groups are relative to one decoder layer."""

    model_types: tuple[str, ...]
    sequential_groups: Groups
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    norm_path: str | None = "model.norm"
    head_path: str = "lm_head"
    # groups a kernel may fuse into one matmul: (fused name, members); members share their input
    fusable_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    excluded_linears: tuple[str, ...] = ()  # nn.Linear modules of a layer that must stay in float (router gates)
    moe: MoeSpec | None = None
    # config flag that makes attention and MLP read the same normed input, and the groups in that case
    parallel_residual_field: str | None = None
    parallel_groups: Groups = ()
    logit_transforms: tuple[tuple[str, str], ...] = ()  # (one of LOGIT_TRANSFORMS, config field)
    # (child of a layer, its last linear): the child's first output is that linear's output with nothing after it,
    # so a sequential quantizer may stand in the linear on recorded inputs for the child (checked on the first
    # batch at run time, so a family where it does not hold only loses the shortcut)
    output_projections: tuple[tuple[str, str], ...] = (("self_attn", "self_attn.o_proj"),)
    discovered: bool = False  # built by tracing a forward, not taken from the table
    # where a layer's sliding window is read (WINDOW_SOURCES): "attention" (the attention module's own per-layer
    # attribute), "config" (config.sliding_window for every layer), or None (no window)
    sliding_window: str | None = None
    # config fields scaling the embeddings' output and each residual branch before its add (Granite); None: 1.0
    embedding_multiplier_field: str | None = None
    residual_multiplier_field: str | None = None

    def groups_for(self, config: Any) -> Groups:
        """The sequential groups of a standard layer under this config (parallel-residual variant included)."""
        if self.parallel_residual_field and getattr(config, self.parallel_residual_field, False):
            return self.parallel_groups
        return self.sequential_groups

    def layer_window(self, config: Any, attention: nn.Module) -> int | None:
        """The sliding window (in tokens) of the layer whose attention module this is, or None for full attention."""
        if self.sliding_window == "attention":
            window = getattr(attention, "sliding_window", None)
        elif self.sliding_window == "config":
            window = getattr(config, "sliding_window", None)
        else:
            window = None
        return int(window) if window else None

    def embedding_multiplier(self, config: Any) -> float:
        """The factor the embeddings' output is scaled by before the first layer (1.0 for most families)."""
        return _config_factor(config, self.embedding_multiplier_field)

    def residual_multiplier(self, config: Any) -> float:
        """The factor each attention and MLP output is scaled by before its residual add (1.0 for most families)."""
        return _config_factor(config, self.residual_multiplier_field)

    def ties_embeddings(self, config: Any) -> bool:
        """Whether the head shares its weight with the input embeddings (config `tie_word_embeddings`)."""
        return bool(getattr(config, "tie_word_embeddings", False))

    def num_experts(self, config: Any) -> int:
        if self.moe is None:
            return 0
        value = getattr(config, self.moe.num_experts_field, None)
        if not isinstance(value, int) or value < 1:
            raise QtoolError(
                f"config field '{self.moe.num_experts_field}' of model type '{config.model_type}' is {value!r}",
                hint="a mixture-of-experts config needs a positive number of experts",
            )
        return value


def _config_factor(config: Any, field: str | None) -> float:
    value = None if field is None else getattr(config, field, None)
    return 1.0 if value is None else float(value)


QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
O_PROJ = ("self_attn.o_proj",)
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
DOWN = ("mlp.down_proj",)
LLAMA_GROUPS: Groups = (QKV, O_PROJ, GATE_UP, DOWN)
FUSE_QKV = ("self_attn.qkv_proj", QKV)
FUSE_GATE_UP = ("mlp.gate_up_proj", GATE_UP)
LLAMA_FUSABLE = (FUSE_QKV, FUSE_GATE_UP)
# attention and MLP read the same normed input (Cohere, StableLM with use_parallel_residual)
PARALLEL_GROUPS: Groups = (QKV + GATE_UP, O_PROJ, DOWN)

QWEN_EXPERTS = (
    ("gate_up_proj", ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj")),
    ("down_proj", ("mlp.experts.{e}.down_proj",)),
)


def _moe_in_mlp(num_experts_field: str = "num_experts", fused_experts=QWEN_EXPERTS, **fields: Any) -> MoeSpec:
    """The sparse block as transformers 5 lays it out in every MoE family of the table: `mlp` holding a `gate`
    router and fused `experts`."""
    return MoeSpec(num_experts_field=num_experts_field, block_path="mlp", router_path="mlp.gate",
                   experts_path="mlp.experts", fused_experts=fused_experts, **fields)


def _llama_like(model_type: str, **fields: Any) -> ArchitectureSpec:
    fields.setdefault("sequential_groups", LLAMA_GROUPS)
    fields.setdefault("fusable_groups", LLAMA_FUSABLE)
    return ArchitectureSpec(model_types=(model_type,), **fields)


ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    _llama_like("llama"),
    _llama_like("mistral", sliding_window="config"),
    _llama_like("qwen2", sliding_window="attention"),
    _llama_like("qwen3", sliding_window="attention"),
    _llama_like("gemma"),
    _llama_like("gemma2", sliding_window="attention", logit_transforms=(("softcap", "final_logit_softcapping"),)),
    _llama_like("gemma3_text", sliding_window="attention",
                logit_transforms=(("softcap", "final_logit_softcapping"),)),
    _llama_like("olmo"),
    _llama_like("olmo2"),
    _llama_like("olmo3", sliding_window="attention"),
    _llama_like("helium"),
    _llama_like("granite", logit_transforms=(("divide", "logits_scaling"),),
                embedding_multiplier_field="embedding_multiplier", residual_multiplier_field="residual_multiplier"),
    _llama_like(
        "stablelm", parallel_residual_field="use_parallel_residual", parallel_groups=PARALLEL_GROUPS
    ),
    _llama_like("cohere", sequential_groups=PARALLEL_GROUPS, logit_transforms=(("multiply", "logit_scale"),)),
    _llama_like("cohere2", sequential_groups=PARALLEL_GROUPS, logit_transforms=(("multiply", "logit_scale"),),
                sliding_window="attention"),
    ArchitectureSpec(
        model_types=("phi3",),
        sliding_window="config",
        sequential_groups=(("self_attn.qkv_proj",), O_PROJ, ("mlp.gate_up_proj",), DOWN),
    ),
    ArchitectureSpec(
        # attention and MLP both read input_layernorm's output
        model_types=("phi",),
        sequential_groups=(QKV + ("mlp.fc1",), ("self_attn.dense",), ("mlp.fc2",)),
        norm_path="model.final_layernorm",
        fusable_groups=(FUSE_QKV,),
    ),
    ArchitectureSpec(
        model_types=("starcoder2",),
        sliding_window="config",
        sequential_groups=(QKV, O_PROJ, ("mlp.c_fc",), ("mlp.c_proj",)),
        fusable_groups=(FUSE_QKV,),
    ),
    ArchitectureSpec(
        model_types=("gpt_neox",),
        sequential_groups=(
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
        layers_path="gpt_neox.layers",
        embed_path="gpt_neox.embed_in",
        norm_path="gpt_neox.final_layer_norm",
    ),
    ArchitectureSpec(
        model_types=("mixtral",),
        sliding_window="config",
        sequential_groups=(QKV, O_PROJ),
        fusable_groups=(FUSE_QKV,),
        moe=_moe_in_mlp(
            "num_local_experts",
            fused_experts=(
                ("gate_up_proj", ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3")),
                ("down_proj", ("block_sparse_moe.experts.{e}.w2",)),
            ),
        ),
    ),
    ArchitectureSpec(
        model_types=("qwen2_moe",),
        sliding_window="attention",
        sequential_groups=(
            QKV,
            O_PROJ,
            ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
            ("mlp.shared_expert.down_proj",),
        ),
        fusable_groups=(
            FUSE_QKV,
            ("mlp.shared_expert.gate_up_proj", ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")),
        ),
        # a [hidden -> 1] sigmoid gate scaling the shared expert: router-like, kept in float
        excluded_linears=("mlp.shared_expert_gate",),
        moe=_moe_in_mlp(shared_expert_path="mlp.shared_expert", dense_mlp_groups=(GATE_UP, DOWN)),
    ),
    ArchitectureSpec(
        model_types=("qwen3_moe",),
        sliding_window="attention",
        sequential_groups=(QKV, O_PROJ),
        fusable_groups=(FUSE_QKV,),
        moe=_moe_in_mlp(dense_mlp_groups=(GATE_UP, DOWN)),
    ),
    ArchitectureSpec(
        model_types=("olmoe",),
        sequential_groups=(QKV, O_PROJ),
        fusable_groups=(FUSE_QKV,),
        moe=_moe_in_mlp(),
    ),
)


def build_registry(specs: tuple[ArchitectureSpec, ...]) -> Mapping[str, ArchitectureSpec]:
    """A read-only model_type -> spec mapping; a model type listed twice is a table error."""
    table: dict[str, ArchitectureSpec] = {}
    for spec in specs:
        for model_type in spec.model_types:
            if model_type in table:
                raise ValueError(f"model type '{model_type}' is listed twice in the architecture table")
            table[model_type] = spec
    return MappingProxyType(table)


REGISTRY: Mapping[str, ArchitectureSpec] = build_registry(ARCHITECTURES)


def supported_model_types(registry: Mapping[str, ArchitectureSpec] | None = None) -> list[str]:
    return sorted(REGISTRY if registry is None else registry)


def _supported_hint(registry: Mapping[str, ArchitectureSpec] | None) -> str:
    return "supported model types: " + ", ".join(supported_model_types(registry))


def _config_of(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(getattr(config, "model_type", None), str):
        raise QtoolError(
            f"{type(model_or_config).__name__} has no config.model_type",
            hint="pass a transformers PreTrainedModel or PretrainedConfig",
        )
    return config


def get_architecture(
    model_or_config: Any, registry: Mapping[str, ArchitectureSpec] | None = None
) -> ArchitectureSpec:
    """The spec for a model or config by `config.model_type`. An unknown type is discovered from the model by
    tracing decoder layer 0 (needs a model, not just a config)."""
    registry = REGISTRY if registry is None else registry
    config = _config_of(model_or_config)
    spec = registry.get(config.model_type)
    if spec is not None:
        return spec
    if not isinstance(model_or_config, nn.Module):
        raise QtoolError(
            f"model type '{config.model_type}' is not in the architecture table",
            hint=_supported_hint(registry) + " (others need the model itself, to discover its layers)",
        )
    return discover_architecture(model_or_config, registry)


def get_module(model: nn.Module, dotted_path: str) -> nn.Module:
    """The submodule at `dotted_path` ("" is the model itself); a QtoolError naming the path if it is missing."""
    try:
        return model.get_submodule(dotted_path)
    except AttributeError as exc:
        raise QtoolError(
            f"{type(model).__name__} has no module '{dotted_path}'",
            hint=f"the installed transformers lays this model out differently ({exc})",
        ) from None


def _has_module(root: nn.Module, dotted_path: str) -> bool:
    try:
        root.get_submodule(dotted_path)
    except AttributeError:
        return False
    return True


def decoder_layers(model: nn.Module, spec: ArchitectureSpec | None = None) -> nn.ModuleList:
    if spec is None:
        config = _config_of(model)
        spec = REGISTRY.get(config.model_type)
        if spec is None:  # unknown type: finding the list needs no forward
            path = _find_layer_list_path(model)
            if path is None:
                raise _no_layers_error(model, None)
            return get_module(model, path)
    layers = get_module(model, spec.layers_path)
    if not isinstance(layers, nn.ModuleList):
        raise QtoolError(
            f"'{spec.layers_path}' of {type(model).__name__} is a {type(layers).__name__}, not a ModuleList",
            hint="the architecture table's layers_path must name the list of decoder layers",
        )
    return layers


def layer_groups(model: nn.Module, layer_index: int, spec: ArchitectureSpec | None = None) -> Groups:
    """The sequential groups (names relative to the layer) that apply to this layer: dense layers of a MoE family
    swap the sparse block's groups for the dense MLP's."""
    spec = spec or get_architecture(model)
    layer = _layer_at(model, layer_index, spec)
    groups = spec.groups_for(model.config)
    if spec.moe is None or _has_module(layer, spec.moe.experts_path):
        return groups
    block = spec.moe.block_path + "."
    kept = [group for group in groups if not any(name.startswith(block) for name in group)]
    first_block = next((i for i, g in enumerate(groups) if any(n.startswith(block) for n in g)), len(kept))
    return tuple(kept[:first_block]) + spec.moe.dense_mlp_groups + tuple(kept[first_block:])


def _layer_at(model: nn.Module, layer_index: int, spec: ArchitectureSpec) -> nn.Module:
    layers = decoder_layers(model, spec)
    if not 0 <= layer_index < len(layers):
        raise QtoolError(
            f"layer index {layer_index} is out of range for {type(model).__name__}",
            hint=f"valid layer indices are 0..{len(layers) - 1}",
        )
    return layers[layer_index]


def resolve_layer_groups(
    model: nn.Module, layer_index: int, spec: ArchitectureSpec | None = None
) -> list[list[tuple[str, nn.Linear]]]:
    """The concrete nn.Linear modules of decoder layer `layer_index`, in sequential order and grouped by shared
    input, each with its full dotted name from the model root."""
    spec = spec or get_architecture(model)
    layer = _layer_at(model, layer_index, spec)
    prefix = f"{spec.layers_path}.{layer_index}."
    resolved: list[list[tuple[str, nn.Linear]]] = []
    for group in layer_groups(model, layer_index, spec):
        modules = []
        for name in group:
            module = get_module(layer, name)
            if not isinstance(module, nn.Linear):
                raise QtoolError(
                    f"'{prefix}{name}' of model type '{model.config.model_type}' is a {type(module).__name__}",
                    hint="the architecture table must list nn.Linear modules only",
                )
            modules.append((prefix + name, module))
        resolved.append(modules)
    uncovered = uncovered_linears(model, layer_index, spec)
    if uncovered:
        log.warning("layer %d: nn.Linear modules not in any sequential group (left in float): %s", layer_index, uncovered)
    return resolved


def uncovered_linears(model: nn.Module, layer_index: int, spec: ArchitectureSpec | None = None) -> list[str]:
    """nn.Linear modules of the layer (relative names) that neither a group nor the exclusions mention."""
    spec = spec or get_architecture(model)
    layer = _layer_at(model, layer_index, spec)
    listed = {name for group in layer_groups(model, layer_index, spec) for name in group}
    listed.update(spec.excluded_linears)
    return [name for name, module in layer.named_modules() if isinstance(module, nn.Linear) and name not in listed]


def expert_checkpoint_groups(
    model: nn.Module, layer_index: int, spec: ArchitectureSpec | None = None
) -> list[list[str]]:
    """Full checkpoint names of the routed experts' linears in one layer ("{e}" expanded from the config),
    grouped like the sequential groups; empty for dense layers and dense families."""
    spec = spec or get_architecture(model)
    layer = _layer_at(model, layer_index, spec)
    if spec.moe is None or not _has_module(layer, spec.moe.experts_path):
        return []
    prefix = f"{spec.layers_path}.{layer_index}."
    count = spec.num_experts(model.config)
    return [
        [prefix + pattern.format(e=e) for e in range(count) for pattern in group]
        for group in spec.moe.checkpoint_expert_groups()
    ]


# ---- discovery fallback for model types outside the table ----


class _StopAfterLayer(Exception):
    """Raised from a hook to end a tracing forward once decoder layer 0 has run."""


def _num_hidden_layers(config: Any) -> int | None:
    value = getattr(config, "num_hidden_layers", None)
    return value if isinstance(value, int) else None


def _find_layer_list_path(model: nn.Module) -> str | None:
    """The shallowest ModuleList of same-class blocks that contain nn.Linear modules (preferring one whose length
    is config.num_hidden_layers)."""
    expected = _num_hidden_layers(getattr(model, "config", None))
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        candidates.append((len(module) != expected, name.count("."), name))
    return min(candidates)[2] if candidates else None


def _no_layers_error(model: nn.Module, registry: Mapping[str, ArchitectureSpec] | None) -> QtoolError:
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    return QtoolError(
        f"model type '{model_type}' ({type(model).__name__}) is not in the architecture table and has no "
        "ModuleList of decoder layers with linear modules",
        hint=_supported_hint(registry),
    )


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, module in model.named_modules() if module is target), None)


def _trace_linear_groups(model: nn.Module, layer: nn.Module, registry) -> Groups:
    """Group layer's linears by the identical input tensor object, in the order a tiny forward calls them."""
    linears = {module: name for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
    calls: list[tuple[str, torch.Tensor]] = []  # holding the tensors keeps their identity unambiguous

    def record(module, args, kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        calls.append((linears[module], first))

    def stop(module, args, output):
        raise _StopAfterLayer

    embeddings = model.get_input_embeddings()
    vocab = embeddings.weight.shape[0] if embeddings is not None else 8
    device = embeddings.weight.device if embeddings is not None else torch.device("cpu")
    probe = (torch.arange(8, device=device) % vocab).unsqueeze(0)
    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in linears]
    handles.append(layer.register_forward_hook(stop))
    try:
        with torch.no_grad():
            model(input_ids=probe, use_cache=False)
    except _StopAfterLayer:
        pass
    except Exception as exc:  # a model whose forward needs more than input_ids cannot be traced
        raise QtoolError(
            f"could not trace decoder layer 0 of model type '{model.config.model_type}': {exc}",
            hint=_supported_hint(registry),
        ) from exc
    finally:
        for handle in handles:
            handle.remove()

    groups: list[list[str]] = []
    group_inputs: list[torch.Tensor] = []
    seen: set[str] = set()
    for name, tensor in calls:
        if name in seen:
            continue
        seen.add(name)
        match = next((i for i, x in enumerate(group_inputs) if x is tensor), None)
        if match is None:
            groups.append([name])
            group_inputs.append(tensor)
        else:
            groups[match].append(name)
    never_called = [name for name in linears.values() if name not in seen]
    if never_called:
        log.info("layer-0 linears the tracing forward never called, appended as own groups: %s", never_called)
        groups.extend([name] for name in never_called)
    return tuple(tuple(group) for group in groups)


def discover_architecture(
    model: nn.Module, registry: Mapping[str, ArchitectureSpec] | None = None
) -> ArchitectureSpec:
    """Build a spec for a model outside the table by tracing one tiny forward through decoder layer 0."""
    layers_path = _find_layer_list_path(model)
    if layers_path is None:
        raise _no_layers_error(model, registry)
    layers = get_module(model, layers_path)
    groups = _trace_linear_groups(model, layers[0], registry)
    parent = layers_path.rpartition(".")[0]
    parent_module = get_module(model, parent)
    norm_name = next((n for n in FINAL_NORM_NAMES if isinstance(getattr(parent_module, n, None), nn.Module)), None)
    norm_path = None if norm_name is None else (f"{parent}.{norm_name}" if parent else norm_name)
    spec = ArchitectureSpec(
        model_types=(model.config.model_type,),
        sequential_groups=groups,
        layers_path=layers_path,
        embed_path=_path_of(model, model.get_input_embeddings()) or "",
        norm_path=norm_path,
        head_path=_path_of(model, model.get_output_embeddings()) or "",
        discovered=True,
    )
    log.info(
        "model type '%s' is not in the architecture table; discovered layers at '%s' with groups %s",
        model.config.model_type,
        layers_path,
        groups,
    )
    return spec
