"""Whole GPTQ checkpoints: save a model plus its quantized linears as a Hugging Face directory that AutoGPTQ,
GPTQModel and transformers read, and load such a directory back with QuantLinear modules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from qtool.core.errors import QtoolError
from qtool.core.json_file import read_json_file
from qtool.formats.gptq_config import (CONFIG_FILE, QUANTIZE_CONFIG_FILE, RESTORE_FILE, GPTQCheckpointConfig, WeightFacts, quantization_config_from_facts,
                                       read_gptq_config, resolve_checkpoint_format)
from qtool.formats.gptq import GPTQ_TENSOR_SUFFIXES, check_gptq_layout, check_gptq_scales, check_gptq_shapes, gptq_tensors_from_quantized, num_groups
from qtool.core.output_dir import atomic_output_dir
from qtool.kernels.quant_linear import QuantLinear, set_model_backend
from qtool.kernels.registry import check_backend_name
from qtool.formats.quantized_weight import QuantizedWeight
from qtool.checkpoints.config_shapes import config_shape_error
from qtool.checkpoints.expected_tensors import IGNORED_UNEXPECTED_SUFFIXES, expected_tensor_shapes, missing_tensors_error, tied_weight_pairs
from qtool.checkpoints.weight_init import skipped_weight_init

MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE_BYTES = 5 * 10**9  # transformers' default "5GB"


# ---- saving ----


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors that share memory: give views (of a fused or tied tensor) their own storage."""
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def quantized_linear_check(model: nn.Module, names: Iterable[str]) -> Callable[[str, int, int], None]:
    """Check now that every name is a 2-D weight of the model; returns the check of one weight's (out, in) shape
    against its linear, made when the weight is read (a weight read from disk is read once, when it is written)."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise QtoolError(f"quantized weight {name!r} names no linear of the model", "use the module names of model.named_modules()")
        shapes[name] = tuple(weight.shape)

    def check(name: str, out_features: int, in_features: int) -> None:
        if shapes[name] != (out_features, in_features):
            raise QtoolError(
                f"{name}: quantized weight is {out_features}x{in_features} but the linear's weight is {shapes[name]}",
                "quantize the linear of this model",
            )

    return check


def checkpoint_tensors(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight], checkpoint_format: str
) -> tuple[dict[str, torch.Tensor], bool]:
    """Every tensor of a GPTQ checkpoint (see checkpoint_state) and whether the written config must untie the
    embeddings."""
    items, untie = checkpoint_items(model, quantized, checkpoint_format)
    return dict(items), untie


def checkpoint_items(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight], checkpoint_format: str,
    float_tensor: Callable[[str], torch.Tensor] | None = None, seen: Callable[[QuantizedWeight], None] | None = None,
    pack_device: torch.device | None = None,
) -> tuple[Iterator[tuple[str, torch.Tensor]], bool]:
    """checkpoint_tensors one tensor at a time: each quantized linear read from `quantized` once, when its turn
    comes, checked against its linear, shown to `seen` and packed; each float tensor taken from
    `float_tensor(name)` (default: the model's own; a streamed model reads those it released from its files), so
    that only the tensors of the shard being written need be in memory.

    `pack_device` (a GPU) packs each linear there and brings the packed tensors back: on a 7B the host's packing
    of 6.5 billion codes takes seconds, the GPU's milliseconds a linear; the bytes are the same."""
    check = quantized_linear_check(model, quantized.keys())
    on_gpu = pack_device is not None and torch.device(pack_device).type == "cuda"

    def packed(name: str) -> dict[str, torch.Tensor]:
        qw = quantized[name]
        check(name, qw.out_features, qw.in_features)
        if seen is not None:
            seen(qw)
        if not on_gpu:
            return gptq_tensors_from_quantized(qw, checkpoint_format, name)
        tensors = gptq_tensors_from_quantized(qw.to(pack_device), checkpoint_format, name)
        return {suffix: tensor.to("cpu") for suffix, tensor in tensors.items()}

    return state_items(model, set(quantized), packed, float_tensor)


def checkpoint_state(model: nn.Module, packed: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], bool]:
    """Every tensor to write, in the model's order: float ones as float16 (a tied copy once, as transformers writes
    it), and each quantized linear's weight replaced by its packed tensors (`packed[name][suffix]` written as
    name.suffix); and whether the written config must untie the embeddings."""
    items, untie = state_items(model, set(packed), packed.__getitem__, None)
    return dict(items), untie


def overflows_float16(tensor: torch.Tensor, half: torch.Tensor) -> bool:
    """Whether `half` (tensor in float16) has an infinity where `tensor` is finite. Its smallest and largest
    values settle it in one pass (a tenth of the time of isfinite on a 7B's embedding); only a half tensor with
    an infinity or a NaN among them is looked at element by element."""
    if half.numel() == 0:
        return False
    low, high = torch.aminmax(half)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return False
    return bool((torch.isinf(half) & torch.isfinite(tensor)).any())


def state_items(model: nn.Module, packed_names: set[str], packed_of: Callable[[str], dict[str, torch.Tensor]],
                float_tensor: Callable[[str], torch.Tensor] | None) -> tuple[Iterator[tuple[str, torch.Tensor]], bool]:
    """The (name, tensor) pairs of a quantized checkpoint in the model's order, made as they are asked for: the
    linears of `packed_names` as `packed_of(name)` gives them (asked once each), float tensors as float16, a tied
    copy once; and whether the written config must untie the embeddings."""
    state = model.state_dict()
    value = float_tensor or state.__getitem__
    replaced = {f"{name}.weight": name for name in packed_names}
    dropped: set[str] = set()
    untie = False
    for target, source in tied_weight_pairs(model).items():
        if target not in state or source not in state:
            continue
        if target in replaced or source in replaced:
            untie = True  # the quantized side keeps its own tensors, so the two are no longer one weight
        elif state[target].data_ptr() == state[source].data_ptr() and state[target].device.type != "meta":
            dropped.add(target)
        elif torch.equal(value(target), value(source)):
            dropped.add(target)
        else:
            untie = True

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in state.items():
            if key in dropped:
                continue
            if key in replaced:
                name = replaced[key]
                for suffix, part in packed_of(name).items():
                    yield f"{name}.{suffix}", part.detach().cpu().contiguous()
                continue
            if tensor.device.type == "meta":
                if float_tensor is None:
                    raise QtoolError(f"tensor {key} has no data (it is on the meta device)", "materialise the model's weights before saving")
                tensor = float_tensor(key)
            tensor = tensor.detach().cpu()
            if tensor.is_floating_point():
                half = tensor.to(torch.float16)
                if overflows_float16(tensor, half):
                    raise QtoolError(f"tensor {key} overflows float16", "its values exceed 65504; this model cannot be stored in float16")
                tensor = half
            yield key, _own_storage(tensor)

    return items(), untie


def model_config_dict(model: nn.Module, quantization_config: dict[str, Any], untie: bool) -> dict[str, Any]:
    """config.json's content: the model's config with our quantization_config, never a loader's own quantization
    marker (a model read from GGUF carries quant_method gguf), plus the keys older readers look for."""
    data = model.config.to_dict()
    data.pop("quantization_config", None)
    data = {key: value for key, value in data.items() if not key.startswith("_")}  # local paths, runtime flags
    if not data.get("architectures"):
        data["architectures"] = [type(model).__name__]
    rope = data.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in data:
        data["rope_theta"] = rope["rope_theta"]  # transformers 5 nests it; ExLlamaV2 and older readers want it on top
    data["dtype"] = "float16"
    data["torch_dtype"] = "float16"  # the key transformers 4 and other readers know
    if untie:
        data["tie_word_embeddings"] = False
    data["quantization_config"] = quantization_config
    return data


def write_safetensors(directory: Path, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                      max_shard_size_bytes: int) -> list[str]:
    """Write tensors (a mapping, or (name, tensor) pairs produced one at a time) as model.safetensors, or as
    numbered shards plus model.safetensors.index.json when they exceed max_shard_size_bytes; return the file
    names. Each shard is written as soon as it is full, so only one shard's tensors are held at a time."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    written: list[tuple[str, list[str]]] = []  # (temporary name, tensor names) per shard
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        temporary = f"shard-{len(written) + 1:05d}.partial"
        save_file(shard, str(directory / temporary), metadata=metadata)
        written.append((temporary, list(shard)))
        shard.clear()

    for key, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_size_bytes:
            flush()
            size = 0
        shard[key] = tensor
        size += nbytes
        total += nbytes
    if shard or not written:
        flush()
    if len(written) == 1:
        (directory / written[0][0]).rename(directory / MODEL_FILE)
        return [MODEL_FILE]
    names, weight_map = [], {}
    for number, (temporary, keys) in enumerate(written, start=1):
        name = f"model-{number:05d}-of-{len(written):05d}.safetensors"
        (directory / temporary).rename(directory / name)
        names.append(name)
        weight_map.update({key: name for key in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def save_quantized_model(
    output: Path,
    model: nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    quantization_config: dict[str, Any] | None = None,
    tokenizer: Any = None,
    checkpoint_format: str | None = None,
    max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE_BYTES,
    force: bool = False,
    float_tensor: Callable[[str], torch.Tensor] | None = None,
    pack_device: torch.device | None = None,
) -> Path:
    """Write a GPTQ checkpoint directory at `output` (atomically; an existing one only with force). `quantized`
    maps module names to their quantized weights; checkpoint_format ("gptq" or "gptq_v2") defaults to the one in
    quantization_config, else "gptq".

    The tensors are produced and written shard by shard (checkpoint_items): `quantized` may be a mapping that
    reads each weight when asked (each is asked for once), and `float_tensor` gives the float tensors the model
    holds on the meta device (a streamed model's released layers). The quantization_config is built from the
    facts of each weight taken as it is packed, and config.json written after the tensors. `pack_device`: see
    checkpoint_items."""
    output = Path(output)
    if not quantized:
        raise QtoolError("no quantized linears to save", "quantize at least one linear before saving a GPTQ checkpoint")
    fmt = resolve_checkpoint_format(quantization_config, checkpoint_format)
    facts: list[WeightFacts] = []
    tensors, untie = checkpoint_items(model, quantized, fmt, float_tensor, seen=lambda qw: facts.append(WeightFacts.of(qw)),
                                     pack_device=pack_device)
    written: dict[str, Any] = {}

    def model_config() -> dict[str, Any]:
        written.update(quantization_config_from_facts(facts, quantization_config, fmt))
        return model_config_dict(model, written, untie)

    with atomic_output_dir(output, force, what=f"gptq checkpoint ({fmt})") as staging:
        write_model_files(staging, model, tensors, model_config, tokenizer, max_shard_size_bytes)
        (staging / QUANTIZE_CONFIG_FILE).write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    return output


def write_model_files(directory: Path, model: nn.Module, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                      model_config: dict[str, Any] | Callable[[], dict[str, Any]], tokenizer: Any, max_shard_size_bytes: int) -> None:
    """The files every checkpoint directory has: the safetensors, config.json, the tokenizer's files and the
    generation config. config.json is written last: `model_config` may be a function, asked once the tensors are
    written (a quantization_config counted from the weights as they went past)."""
    write_safetensors(directory, tensors, max_shard_size_bytes)
    config = model_config() if callable(model_config) else model_config
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(str(directory))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---- loading ----


def is_quantized_checkpoint(path: Path) -> bool:
    """Whether `path` is a directory whose config declares GPTQ quantization."""
    path = Path(path)
    return path.is_dir() and read_gptq_config(path) is not None


def checkpoint_weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, else model.safetensors, else every
    *.safetensors file (AutoGPTQ named them after the quantization, e.g. gptq_model-4bit-128g.safetensors)."""
    index_path = directory / INDEX_FILE
    if index_path.exists():
        weight_map = read_json_file(index_path, RESTORE_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
            raise QtoolError(f"{index_path} has no weight_map of tensor names to shard files", RESTORE_FILE)
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.exists():
                raise QtoolError(f"{file} is listed in {index_path.name} but missing", "copy the complete checkpoint")
        return files
    if (directory / MODEL_FILE).exists():
        return [directory / MODEL_FILE]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise QtoolError(f"{directory} has no *.safetensors file", "point at a complete GPTQ checkpoint directory")
    return files


def read_checkpoint_tensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of the files (on CPU) and the file each came from."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    if key in tensors:
                        raise QtoolError(f"tensor {key} is in both {origin[key].name} and {file.name}", "the checkpoint is corrupt: re-export it")
                    tensors[key] = handle.get_tensor(key)
                    origin[key] = file
        except (SafetensorError, OSError) as exc:
            raise QtoolError(f"cannot read {file}: {exc}", "the file is damaged or not a safetensors file: re-export or re-download it") from exc
    return tensors, origin


def empty_model(directory: Path, dtype: torch.dtype, format_name: str) -> nn.Module:
    """The causal LM of config.json with uninitialised weights (they are all about to be loaded) and without its
    quantization_config (qtool installs the quantized linears; transformers must not build its own quantizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise QtoolError(f"{directory} has no {CONFIG_FILE}", f"a {format_name} checkpoint needs the model's config.json next to its weights")
    from huggingface_hub.errors import StrictDataclassError

    try:
        config = AutoConfig.from_pretrained(str(directory))
    # transformers' config classes check field types (StrictDataclassError: e.g. "hidden_size": null)
    # AttributeError: a quantization_config that is not an object (transformers calls .to_dict() on it)
    except (ValueError, KeyError, OSError, TypeError, AttributeError, StrictDataclassError) as exc:
        raise QtoolError(f"cannot read {config_path}: {str(exc).splitlines()[0]}", "check model_type and the fields of config.json") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        with skipped_weight_init():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    # RuntimeError: widths torch cannot allocate (a negative intermediate_size, a vocab_size of 2**31)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise QtoolError(f"{config_path}: cannot build a causal LM from it: {str(exc).splitlines()[0]}", "qtool loads causal language models") from exc


def _install_quant_linears(
    model: nn.Module, tensors: dict[str, torch.Tensor], origin: dict[str, Path], quant: GPTQCheckpointConfig
) -> list[str]:
    """Replace each nn.Linear that has a .qweight in the checkpoint by an empty QuantLinear; return their names."""
    names = sorted(key.removesuffix(".qweight") for key in tensors if key.endswith(".qweight"))
    for name in names:
        file = origin[f"{name}.qweight"].name
        settings = quant.settings_for(name)
        if settings is None:
            raise QtoolError(f"{file}: {name}.qweight exists but {quant.source} excludes {name} from quantization (dynamic)", "the config does not match the weights")
        bits, group_size = settings
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise QtoolError(f"{file}: tensor {name}.qweight names no module of {type(model).__name__}", "the config.json does not match the weights") from None
        if not isinstance(module, nn.Linear):
            raise QtoolError(f"{file}: {name} is a {type(module).__name__}, not a Linear", "qtool loads GPTQ-quantized nn.Linear layers only")
        missing = [f"{name}.{suffix}" for suffix in GPTQ_TENSOR_SUFFIXES if f"{name}.{suffix}" not in tensors]
        if missing:
            raise QtoolError(f"{file}: {', '.join(missing)} missing", "the checkpoint is incomplete: re-export it")
        parts = {suffix: tensors[f"{name}.{suffix}"] for suffix in GPTQ_TENSOR_SUFFIXES}
        try:
            check_gptq_layout(module.in_features, module.out_features, bits, group_size, name)
            check_gptq_shapes(parts, module.in_features, module.out_features, bits, group_size, name)
        except QtoolError as exc:
            raise QtoolError(f"{file}: {exc.message}", exc.hint) from None
        check_gptq_scales(parts["scales"], f"{name}.scales", origin[f"{name}.scales"].name)
        g_idx = parts["g_idx"]
        groups = num_groups(module.in_features, group_size)
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise QtoolError(f"{file}: {name}.g_idx holds a group outside 0..{groups - 1}", "the checkpoint is corrupt: re-export it")
        replacement = QuantLinear(
            module.in_features, module.out_features, bits, group_size, bias=module.bias is not None, checkpoint_format=quant.checkpoint_format
        )
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attribute, replacement)
    return names


def tie_missing(model: nn.Module, present: set[str], quantized_types: tuple[type, ...]) -> set[str]:
    """Tie each tied pair where the checkpoint holds only one side (normally the embedding); return the names now
    tied, which the checkpoint may lack. A quantized head (one of `quantized_types`) keeps its own tensors."""
    tied: set[str] = set()
    for target, source in tied_weight_pairs(model).items():
        if target in present and source not in present:
            target, source = source, target
        if target in present or source not in present:
            continue
        parent_name, _, attribute = target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, quantized_types):
            continue
        setattr(parent, attribute, model.get_parameter(source))
        tied.add(target)
    return tied


def check_config_shapes(model: nn.Module, tensors: dict[str, torch.Tensor], origin: dict[str, Path]) -> None:
    """Raise the error validate gives when config.json's sizes contradict the stored float tensors; `model` is
    the empty model built from that config, before its quantized linears are installed."""
    stored = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    problem = config_shape_error(model.config, expected_tensor_shapes(model), stored, {name: file.name for name, file in origin.items()})
    if problem is not None:
        raise problem


def load_checkpoint_state(model: nn.Module, directory: Path, tensors: dict[str, torch.Tensor], origin: dict[str, Path],
                          quantized_types: tuple[type, ...]) -> None:
    """Load a checkpoint's tensors into `model`, whose quantized linears are already installed: tied weights the
    file holds once are tied, and tensors that do not fit, are missing or have no place give one-line errors."""
    tied = tie_missing(model, set(tensors), quantized_types)
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise QtoolError(f"{directory}: tensors do not fit {type(model).__name__}: {detail}", "the config.json does not match the weights") from None
    missing = missing_tensors_error(type(model).__name__, sorted(set(result.missing_keys) - tied))
    if missing is not None:
        raise missing
    unexpected = sorted(key for key in result.unexpected_keys if not key.endswith(IGNORED_UNEXPECTED_SUFFIXES))
    if unexpected:
        shown = ", ".join(f"{key} ({origin[key].name if key in origin else '?'})" for key in unexpected[:5])
        raise QtoolError(f"{directory}: tensor(s) that {type(model).__name__} has no place for: {shown}", "the config.json does not match the weights")


def load_quantized_model(
    path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16, backend: str = "auto"
) -> nn.Module:
    """A GPTQ checkpoint directory (qtool, GPTQModel, AutoGPTQ; gptq or gptq_v2) as its transformers model with
    QuantLinear modules, float tensors in `dtype`, on `device`, in eval mode. Each QuantLinear's matmul goes
    through `backend` (auto, torch, triton; see qtool.kernels.registry), whose layer form is built here, once."""
    check_backend_name(backend)
    directory = Path(path)
    if not directory.is_dir():
        raise QtoolError(f"{directory} is not a directory", "pass a GPTQ checkpoint directory")
    quant = read_gptq_config(directory)
    if quant is None:
        raise QtoolError(f"{directory} declares no GPTQ quantization", "add quantization_config to config.json, or load it as a float model")
    files = checkpoint_weight_files(directory)
    tensors, origin = read_checkpoint_tensors(files)
    if not any(key.endswith(".qweight") for key in tensors):
        raise QtoolError(f"{directory}: {quant.source} declares GPTQ but no tensor ends in .qweight", "point at the quantized checkpoint")
    model = empty_model(directory, dtype, "GPTQ")
    check_config_shapes(model, tensors, origin)
    _install_quant_linears(model, tensors, origin, quant)
    load_checkpoint_state(model, directory, tensors, origin, (QuantLinear,))
    model = model.to(device).eval()
    set_model_backend(model, backend)
    return model
