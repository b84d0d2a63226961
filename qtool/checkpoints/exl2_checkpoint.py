"""Whole EXL2 checkpoints: write a model plus its EXL2 linears as the Hugging Face directory ExLlamaV2 loads
(config.json with quantization_config quant_method "exl2", measurement.json beside), and load one back with
Exl2Linear modules."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from qtool.core.errors import QtoolError
from qtool.checkpoints.gptq_checkpoint import (
    DEFAULT_MAX_SHARD_SIZE_BYTES,
    check_config_shapes,
    checkpoint_weight_files,
    empty_model,
    load_checkpoint_state,
    model_config_dict,
    quantized_linear_check,
    read_checkpoint_tensors,
    state_items,
    write_model_files,
)
from qtool.formats.exl2 import EXL2_TENSOR_SUFFIXES, OPTIONAL_SUFFIXES, Exl2Weight, check_exl2_scale_max, exl2_tensors_from_weight, group_layout_from_tensors, weight_from_exl2_tensors
from qtool.core.json_file import read_json_file
from qtool.formats.gptq_config import CONFIG_FILE, RESTORE_FILE, qtool_version
from qtool.core.output_dir import atomic_output_dir
from qtool.kernels.exl2_linear import Exl2Linear, check_exl2_backend

MEASUREMENT_FILE = "measurement.json"
EXL2_LAYOUT_VERSION = "0.3.2"  # the ExLlamaV2 release whose layout qtool writes (its converter writes its version)
HEAD_NAMES = ("lm_head",)


# ---- config ----


@dataclass(frozen=True)
class Exl2Bits:
    """What the quantization_config counts of one EXL2 linear: taken as the weight is packed, so that weights read
    one layer at a time are read once."""

    name: str
    storage_bits: int
    code_bits: int
    weights: int  # in_features x out_features

    @classmethod
    def of(cls, name: str, w: Exl2Weight) -> "Exl2Bits":
        return cls(name, w.storage_bits(), w.code_bits(), w.in_features * w.out_features)


def _is_head(name: str) -> bool:
    return name.rpartition(".")[2] in HEAD_NAMES


def _checked_user_fields(user: dict[str, Any] | None) -> dict[str, Any]:
    user = dict(user or {})
    method = str(user.pop("quant_method", "exl2")).lower()
    if method != "exl2":
        raise QtoolError(f"quantization_config.quant_method {method!r} cannot be saved as an EXL2 checkpoint", "use quant_method exl2")
    try:
        json.dumps(user)
    except (TypeError, ValueError) as exc:
        raise QtoolError(f"quantization_config cannot be written as JSON: {exc}", "pass plain numbers, strings, lists and dicts") from exc
    return user


def build_exl2_config(quantized: Mapping[str, Exl2Weight], user: dict[str, Any] | None = None) -> dict[str, Any]:
    """quantization_config as ExLlamaV2's converter writes it (quant_method, version, bits, head_bits,
    calibration) plus who wrote it. bits defaults to the measured bits per weight of the linears other than the
    head; head_bits to the head's mean code width, 0 when the head stays float."""
    if not quantized:
        raise QtoolError("no EXL2 linears to save", "quantize at least one linear before saving an EXL2 checkpoint")
    return exl2_config_from_bits([Exl2Bits.of(name, w) for name, w in quantized.items()], user)


def exl2_config_from_bits(counted: list[Exl2Bits], user: dict[str, Any] | None = None) -> dict[str, Any]:
    """build_exl2_config from each linear's counts."""
    if not counted:
        raise QtoolError("no EXL2 linears to save", "quantize at least one linear before saving an EXL2 checkpoint")
    user = _checked_user_fields(user)
    body = [c for c in counted if not _is_head(c.name)] or counted
    bits = sum(c.storage_bits for c in body) / sum(c.weights for c in body)
    heads = [c for c in counted if _is_head(c.name)]
    head_bits = round(sum(c.code_bits for c in heads) / sum(c.weights for c in heads)) if heads else 0
    config: dict[str, Any] = {
        "quant_method": "exl2",
        "version": EXL2_LAYOUT_VERSION,
        "bits": round(bits, 2),
        "head_bits": head_bits,
        "calibration": {"rows": None, "length": None, "dataset": None},
    }
    config.update(user)
    config["quant_method"] = "exl2"
    config["quantized_by"] = f"qtool:{qtool_version()}"
    return config


def read_exl2_config(directory: Path) -> dict[str, Any] | None:
    """config.json's quantization_config when it declares quant_method exl2, else None."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        return None
    section = read_json_file(path, RESTORE_FILE).get("quantization_config")
    if isinstance(section, dict) and str(section.get("quant_method", "")).lower() == "exl2":
        return section
    return None


def is_exl2_checkpoint(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and read_exl2_config(path) is not None


# ---- saving ----


def exl2_checkpoint_items(model: nn.Module, quantized: Mapping[str, Exl2Weight], float_tensor: Callable[[str], torch.Tensor] | None = None,
                          seen: Callable[[str, Exl2Weight], None] | None = None) -> tuple[Iterator[tuple[str, torch.Tensor]], bool]:
    """Every tensor to write in the model's order, one at a time (float ones as float16, each EXL2 linear's weight
    replaced by its EXL2 tensors, read from `quantized` once, checked against its linear and shown to `seen`), and
    whether the written config must untie the embeddings. `float_tensor` gives the float tensors a streamed model
    holds on the meta device."""
    check = quantized_linear_check(model, quantized.keys())

    def packed(name: str) -> dict[str, torch.Tensor]:
        w = quantized[name]
        check(name, w.out_features, w.in_features)
        if seen is not None:
            seen(name, w)
        return exl2_tensors_from_weight(w, name)

    return state_items(model, set(quantized), packed, float_tensor)


def exl2_checkpoint_tensors(model: nn.Module, quantized: Mapping[str, Exl2Weight]) -> tuple[dict[str, torch.Tensor], bool]:
    """exl2_checkpoint_items as one dict."""
    items, untie = exl2_checkpoint_items(model, quantized)
    return dict(items), untie


def write_exl2_checkpoint(
    directory: Path,
    model: nn.Module,
    quantized: Mapping[str, Exl2Weight],
    quantization_config: dict[str, Any] | None = None,
    tokenizer: Any = None,
    measurement: dict[str, Any] | None = None,
    max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE_BYTES,
    float_tensor: Callable[[str], torch.Tensor] | None = None,
) -> None:
    """Write the checkpoint's files into an existing, empty directory (not atomic: see save_exl2_model), shard by
    shard: `quantized` may read each weight when asked (each is asked for once), and the config's bits are
    counted as the weights are packed, config.json written after them."""
    directory = Path(directory)
    if not quantized:
        raise QtoolError("no EXL2 linears to save", "quantize at least one linear before saving an EXL2 checkpoint")
    _checked_user_fields(quantization_config)  # before any tensor is read
    counted: list[Exl2Bits] = []
    tensors, untie = exl2_checkpoint_items(model, quantized, float_tensor, seen=lambda name, w: counted.append(Exl2Bits.of(name, w)))
    write_model_files(directory, model, tensors, lambda: model_config_dict(model, exl2_config_from_bits(counted, quantization_config), untie),
                      tokenizer, max_shard_size_bytes)
    if measurement is not None:
        (directory / MEASUREMENT_FILE).write_text(json.dumps(measurement, indent=2) + "\n")


def save_exl2_model(
    output: Path,
    model: nn.Module,
    quantized: Mapping[str, Exl2Weight],
    quantization_config: dict[str, Any] | None = None,
    tokenizer: Any = None,
    measurement: dict[str, Any] | None = None,
    max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE_BYTES,
    force: bool = False,
    float_tensor: Callable[[str], torch.Tensor] | None = None,
) -> Path:
    """Write an EXL2 checkpoint directory at `output`, atomically (an existing one only with force)."""
    output = Path(output)
    with atomic_output_dir(output, force, what="exl2 checkpoint") as staging:
        write_exl2_checkpoint(staging, model, quantized, quantization_config, tokenizer, measurement, max_shard_size_bytes, float_tensor)
    return output


def read_measurement(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / MEASUREMENT_FILE
    if not path.exists():
        return None
    return read_json_file(path, "re-create it with a new measurement pass")


# ---- loading ----


def _install_exl2_linears(model: nn.Module, tensors: dict[str, torch.Tensor], origin: dict[str, Path]) -> list[str]:
    """Replace each nn.Linear with a .q_weight in the checkpoint by an empty Exl2Linear of the stored group
    layout, after checking its tensors; add q_perm where the file has none (ExLlamaV2 does not write it)."""
    names = sorted(key.removesuffix(".q_weight") for key in tensors if key.endswith(".q_weight"))
    for name in names:
        file = origin[f"{name}.q_weight"].name
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise QtoolError(f"{file}: tensor {name}.q_weight names no module of {type(model).__name__}", "the config.json does not match the weights") from None
        if not isinstance(module, nn.Linear):
            raise QtoolError(f"{file}: {name} is a {type(module).__name__}, not a Linear", "qtool loads EXL2-quantized nn.Linear layers only")
        parts = {suffix: tensors[f"{name}.{suffix}"] for suffix in EXL2_TENSOR_SUFFIXES + OPTIONAL_SUFFIXES if f"{name}.{suffix}" in tensors}
        if "q_scale_max" in parts:  # the same words as validate's finding, which names the tensor's own file
            check_exl2_scale_max(parts["q_scale_max"], f"{name}.q_scale_max", origin[f"{name}.q_scale_max"].name)
        try:
            weight = weight_from_exl2_tensors(parts, module.out_features, name)  # every check of the reader
        except QtoolError as exc:
            raise QtoolError(f"{file}: {exc.message}", exc.hint) from None
        if weight.in_features != module.in_features:
            raise QtoolError(f"{file}: {name} stores {weight.in_features} input rows but the linear has {module.in_features}", "the config.json does not match the weights")
        if "q_perm" not in parts:
            tensors[f"{name}.q_perm"] = weight.perm.to(torch.int32)
        bits, sizes = group_layout_from_tensors(parts["q_groups"], parts["q_weight"].shape[0], name)
        has_bias = f"{name}.bias" in tensors
        replacement = Exl2Linear(module.in_features, module.out_features, bits, sizes, bias=has_bias)
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attribute, replacement)
    return names


def load_exl2_model(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16, backend: str = "auto") -> nn.Module:
    """An EXL2 checkpoint directory (qtool's or ExLlamaV2's) as its transformers model with Exl2Linear modules
    whose matmuls use `backend` (auto, torch, triton), float tensors in `dtype`, on `device`, in eval mode."""
    check_exl2_backend(backend)
    directory = Path(path)
    if not directory.is_dir():
        raise QtoolError(f"{directory} is not a directory", "pass an EXL2 checkpoint directory")
    if read_exl2_config(directory) is None:
        raise QtoolError(f"{directory} declares no EXL2 quantization", "config.json needs quantization_config with quant_method exl2")
    tensors, origin = read_checkpoint_tensors(checkpoint_weight_files(directory))
    if not any(key.endswith(".q_weight") for key in tensors):
        raise QtoolError(f"{directory}: config.json declares EXL2 but no tensor ends in .q_weight", "point at the quantized checkpoint")
    model = empty_model(directory, dtype, "EXL2")
    check_config_shapes(model, tensors, origin)
    _install_exl2_linears(model, tensors, origin)
    load_checkpoint_state(model, directory, tensors, origin, (Exl2Linear,))
    from qtool.kernels.exl2_linear import set_exl2_model_backend

    model = model.to(device).eval()
    set_exl2_model_backend(model, backend)  # on the model's device: forms are built where they will run
    return model


def exl2_weights_of(model: nn.Module) -> dict[str, Exl2Weight]:
    """Every Exl2Linear of a loaded model as its unpacked weight."""
    return {name: module.exl2_weight() for name, module in model.named_modules() if isinstance(module, Exl2Linear)}
