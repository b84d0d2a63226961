"""`qtool validate` on a GPTQ checkpoint: every quantized layer complete, shapes and dtypes as bits and group
size (and GPTQModel's `dynamic` overrides) imply, and the values loaders trust (scales, g_idx, zero points) possible."""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import torch

from qtool.config.schema import QuantConfig
from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, error, has_errors, info, warning
from qtool.formats.bitpack import unpack_columns
from qtool.formats.gptq import GPTQ_TENSOR_SUFFIXES, PACK_ALIGNMENT, check_gptq_scales, expected_gptq_shapes, num_groups, unpack_qzeros
from qtool.formats.gptq_config import parse_gptq_config
from qtool.formats.safetensors_header import TensorHeader
from qtool.validate.checkpoint_tensors import FLOAT_DTYPES, REEXPORT, TensorReader
from qtool.validate.directory_configs import DirectoryConfigs
from qtool.validate.report import ValidationReport, finding_from_error

DTYPE_NAMES = {torch.float16: "F16", torch.int32: "I32"}


def group_gptq_tensors(tensors: dict[str, TensorHeader]) -> dict[str, dict[str, TensorHeader]]:
    """Layer prefix -> {suffix: header} for every tensor named <layer>.<qweight|qzeros|scales|g_idx|bias>;
    bias only joins a layer that has GPTQ tensors."""
    layers: dict[str, dict[str, TensorHeader]] = defaultdict(dict)
    for name, tensor in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix in GPTQ_TENSOR_SUFFIXES:
            layers[prefix][suffix] = tensor
    for prefix, parts in layers.items():
        if f"{prefix}.bias" in tensors:
            parts["bias"] = tensors[f"{prefix}.bias"]
    return dict(layers)


def _pick(candidates: dict[str, int], groups_of: dict[int, int], groups: int | None) -> int | None:
    """The width most tensors agree on; on a tie, the one GPTQ can pack, then the one consistent with the
    number of groups."""
    counts = Counter(candidates.values())
    best = max(counts.values())
    top = [value for value, count in counts.items() if count == best]
    for keep in (lambda v: v % PACK_ALIGNMENT == 0, lambda v: groups is not None and groups_of.get(v) == groups):
        if len(top) > 1:
            top = [v for v in top if keep(v)] or top
    return top[0] if len(top) == 1 else None


def _layer_features(prefix: str, parts: dict[str, TensorHeader], config: QuantConfig) -> tuple[int | None, int | None, list[Finding]]:
    """in_features and out_features as the tensors imply them, or a finding when they disagree."""
    bits, group_size = config.bits, config.group_size
    qweight, qzeros, scales, g_idx = (parts[s] for s in GPTQ_TENSOR_SUFFIXES)
    shapes_2d = all(len(t.shape) == 2 for t in (qweight, qzeros, scales))
    if not shapes_2d or len(g_idx.shape) != 1:
        shown = ", ".join(f"{s} {list(parts[s].shape)}" for s in GPTQ_TENSOR_SUFFIXES)
        return None, None, [error(prefix, f"GPTQ tensors have the wrong number of dimensions ({shown})", "qweight, qzeros, scales are 2-D and g_idx 1-D: " + REEXPORT)]
    groups = scales.shape[0]
    in_candidates = {"qweight": qweight.shape[0] * 32 // bits, "g_idx": g_idx.shape[0]}
    groups_of = {k: num_groups(k, group_size) for k in in_candidates.values()}
    in_features = _pick(in_candidates, groups_of, groups)
    out_candidates = {"qweight": qweight.shape[1], "scales": scales.shape[1], "qzeros": qzeros.shape[1] * 32 // bits}
    out_features = _pick(out_candidates, {}, None)
    found = []
    if in_features is None:
        found.append(error(
            prefix,
            f"qweight has {qweight.shape[0]} rows ({in_candidates['qweight']} input columns at {bits} bits) but g_idx has {g_idx.shape[0]} entries",
            REEXPORT,
        ))
    if out_features is None:
        found.append(error(prefix, f"qweight, scales and qzeros disagree on the output width ({out_candidates})", REEXPORT))
    return in_features, out_features, found


def _check_shapes(prefix: str, parts: dict[str, TensorHeader], in_features: int, out_features: int, config: QuantConfig) -> list[Finding]:
    found = []
    if in_features % PACK_ALIGNMENT or out_features % PACK_ALIGNMENT:
        found.append(error(prefix, f"shape {in_features} in x {out_features} out cannot be GPTQ-packed (widths must be multiples of {PACK_ALIGNMENT})", REEXPORT))
        return found
    expected = expected_gptq_shapes(in_features, out_features, config.bits, config.group_size)
    rule = f"bits {config.bits}, group size {config.group_size}, {in_features} in x {out_features} out"
    for suffix, (shape, dtype) in expected.items():
        tensor = parts[suffix]
        if tensor.shape != tuple(shape):
            found.append(error(tensor.name, f"shape {list(tensor.shape)} but {rule} imply {list(shape)}", REEXPORT))
        found += _check_dtype(tensor, suffix, DTYPE_NAMES[dtype])
    bias = parts.get("bias")
    if bias is not None and bias.shape != (out_features,):
        found.append(error(bias.name, f"shape {list(bias.shape)} but the layer has {out_features} outputs", REEXPORT))
    return found


def _check_dtype(tensor: TensorHeader, suffix: str, expected: str) -> list[Finding]:
    """GPTQ writes scales as F16 and the rest as I32; loaders also read other float scales and I64 g_idx
    (older files), which GPTQ kernels do not take directly."""
    if tensor.dtype == expected or (suffix == "g_idx" and tensor.dtype == "I64"):
        return []
    if suffix == "scales" and tensor.dtype in FLOAT_DTYPES:
        return [warning(tensor.name, f"dtype {tensor.dtype}: GPTQ stores scales as F16", "qtool converts them on load; other GPTQ loaders may not")]
    return [error(tensor.name, f"dtype {tensor.dtype} but GPTQ stores {suffix} as {expected}", REEXPORT)]


def _check_scales(tensor: TensorHeader, scales: torch.Tensor) -> list[Finding]:
    """The loaders' own scale check (formats.gptq.check_gptq_scales), its error as a finding."""
    try:
        check_gptq_scales(scales, tensor.name, tensor.file)
    except QtoolError as exc:
        return [finding_from_error(exc, tensor.name)]
    return []


def _check_g_idx(name: str, g_idx: torch.Tensor, config: QuantConfig) -> list[Finding]:
    in_features = g_idx.numel()
    group_size = in_features if config.group_size == -1 else config.group_size
    groups = num_groups(in_features, config.group_size)
    g_idx = g_idx.to(torch.int64)
    low, high = int(g_idx.min()), int(g_idx.max())
    if low < 0 or high >= groups:
        return [error(name, f"values must lie in [0, {groups}) but range over [{low}, {high}]", REEXPORT)]
    natural = torch.arange(in_features) // group_size
    if not config.desc_act:
        if not torch.equal(g_idx, natural):
            return [warning(name, "is not arange(in_features) // group_size although desc_act is false", "set desc_act true if the columns were quantized in activation order")]
        return []
    if not torch.equal(torch.bincount(g_idx, minlength=groups), torch.bincount(natural, minlength=groups)):
        return [warning(name, f"groups do not each hold {group_size} columns (the last one the rest)", "act order permutes columns but keeps group sizes: " + REEXPORT)]
    return []


def _check_zeros(name: str, qzeros: torch.Tensor, out_features: int, config: QuantConfig) -> list[Finding]:
    found: list[Finding] = []
    maxq = 2**config.bits - 1
    if config.checkpoint_format == "gptq":
        # v1 stores zero - 1, so an all-ones field would be a zero of 2**bits: GPTQModel writes a zero of 0 that
        # way (wrapped, with a borrow from the next field) and undoes it on load; AutoGPTQ-era kernels read 2**bits.
        wrapped = unpack_columns(qzeros, config.bits, out_features) == maxq
        if wrapped.any():
            found.append(warning(
                name,
                f"{int(wrapped.sum())} zero points are stored as {maxq} in the v1 format: {maxq + 1}, beyond the {config.bits}-bit range, or a wrapped 0 depending on the loader",
                "re-save with checkpoint_format gptq_v2 (it stores the zero itself); if the file already does, set checkpoint_format gptq_v2",
            ))
    if config.sym:
        centre = 2 ** (config.bits - 1)
        off = unpack_qzeros(qzeros, config.bits, out_features, config.checkpoint_format) != centre
        if off.any():
            found.append(warning(name, f"sym is true but {int(off.sum())} of {off.numel()} zero points are not {centre}", "check sym and checkpoint_format in quantization_config"))
    return found


# A module name -> its (bits, group_size), or None where the checkpoint leaves it unquantized (GPTQModel's
# `dynamic` overrides).
LayerSettings = Callable[[str], "tuple[int, int] | None"]


def check_gptq_tensors(
    directory: Path, tensors: dict[str, TensorHeader], readable_files: set[str], config: QuantConfig, layer_settings: LayerSettings | None = None
) -> tuple[list[Finding], int]:
    """Findings for every quantized layer, and the number of layers found. Loads only scales, qzeros and g_idx
    of layers whose headers are right."""
    found: list[Finding] = []
    layers = group_gptq_tensors(tensors)
    to_check: list[tuple[str, dict[str, TensorHeader], QuantConfig]] = []
    for prefix, parts in sorted(layers.items()):
        if "qweight" not in parts:
            orphans = ", ".join(s for s in GPTQ_TENSOR_SUFFIXES if s in parts)
            found.append(error(prefix, f"orphan tensors: {orphans} without qweight", "remove them, or restore the layer's qweight"))
            continue
        missing = [s for s in GPTQ_TENSOR_SUFFIXES if s not in parts]
        if missing:
            found.append(error(prefix, f"quantized layer is missing {', '.join(missing)}", "a GPTQ layer needs qweight, qzeros, scales and g_idx: " + REEXPORT))
            continue
        if f"{prefix}.weight" in tensors:
            found.append(warning(f"{prefix}.weight", "is stored next to the layer's qweight: loaders will report an unexpected key", "remove the float weight"))
        layer_config = config
        if layer_settings is not None:
            settings = layer_settings(prefix)
            if settings is None:
                found.append(error(prefix, "holds GPTQ tensors but quantization_config.dynamic leaves it unquantized", "fix the dynamic patterns or re-export"))
                continue
            layer_config = dataclasses.replace(config, bits=settings[0], group_size=settings[1])
        in_features, out_features, feature_findings = _layer_features(prefix, parts, layer_config)
        found += feature_findings
        if in_features is None or out_features is None:
            continue
        shape_findings = _check_shapes(prefix, parts, in_features, out_features, layer_config)
        found += shape_findings
        if not has_errors(shape_findings) and all(parts[s].file in readable_files for s in ("qzeros", "scales", "g_idx")):
            to_check.append((prefix, parts, layer_config))
    with ExitStack() as stack:
        value = TensorReader(directory, readable_files, stack)
        for prefix, parts, layer_config in to_check:
            found += _check_scales(parts["scales"], value(parts["scales"]))
            found += _check_g_idx(parts["g_idx"].name, value(parts["g_idx"]), layer_config)
            found += _check_zeros(parts["qzeros"].name, value(parts["qzeros"]), parts["scales"].shape[1], layer_config)
    return found, sum(1 for parts in layers.values() if "qweight" in parts)


def dynamic_settings(quant_data: Any, where: str) -> tuple[LayerSettings | None, list[Finding]]:
    """Per-module bits and group size from GPTQModel's `dynamic` overrides, read as qtool's loader reads them."""
    if not isinstance(quant_data, dict) or not quant_data.get("dynamic"):
        return None, []
    try:
        parsed = parse_gptq_config(quant_data, where)
    except QtoolError as exc:
        return None, [error(f"{where}.dynamic", exc.message, exc.hint or "")]
    return (parsed.settings_for if parsed is not None else None), []


def add_gptq_findings(report: ValidationReport, path: Path, configs: DirectoryConfigs, quant_config: QuantConfig | None,
                      tensors: dict[str, TensorHeader], readable: set[str]) -> None:
    """The GPTQ layers' findings, with `dynamic`'s per-module bits and group size, and the summary; the layers are
    only checked against a usable quantization_config."""
    layer_settings, dynamic_findings = dynamic_settings(configs.quant_data, configs.quant_where)
    report.findings += dynamic_findings
    if quant_config is not None and not has_errors(dynamic_findings):
        layer_findings, layer_count = check_gptq_tensors(path, tensors, readable, quant_config, layer_settings)
        report.findings += layer_findings
        report.summary.update(quantized_layers=layer_count, bits=quant_config.bits, group_size=quant_config.group_size,
                              sym=quant_config.sym, desc_act=quant_config.desc_act, checkpoint_format=quant_config.checkpoint_format)
        if layer_count == 0 and tensors:
            report.findings.append(error("tensors", f"{configs.quant_where} declares GPTQ but no tensor ends in .qweight", "point at the quantized checkpoint, or remove quantization_config"))
        else:
            group = "per channel" if quant_config.group_size == -1 else f"group size {quant_config.group_size}"
            report.findings.append(info(
                "summary",
                f"GPTQ {quant_config.bits}-bit, {group}, {quant_config.checkpoint_format} format: {layer_count} quantized layers, "
                f"{report.summary['tensors']} tensors in {report.summary['files']} file(s)",
            ))
