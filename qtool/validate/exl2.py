"""`qtool validate` on an EXL2 checkpoint: every linear's tensors (complete, dtypes, q_groups' layout, shapes,
permutations, scales) and its quantization_config against what they store."""

from __future__ import annotations

from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import torch

from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, error, has_errors, info, warning
from qtool.formats.exl2 import (
    COLUMN_ALIGNMENT,
    EXL2_TENSOR_SUFFIXES,
    OPTIONAL_SUFFIXES,
    check_exl2_layout,
    check_exl2_scale_max,
    expected_exl2_shapes,
    group_layout_from_tensors,
)
from qtool.formats.safetensors_header import TensorHeader
from qtool.validate.checkpoint_tensors import FLOAT_DTYPES, REEXPORT, TensorReader
from qtool.validate.directory_configs import DirectoryConfigs
from qtool.validate.exl2_config import check_exl2_quantization_config, exl2_stored
from qtool.validate.report import ValidationReport, finding_from_error

EXL2_LINEAR_SUFFIXES = EXL2_TENSOR_SUFFIXES + OPTIONAL_SUFFIXES + ("bias",)
# The dtypes ExLlamaV2 writes (exl2_format.expected_exl2_shapes); qtool's reader also takes the index tensors in
# any integer dtype and q_scale_max in any float dtype, which ExLlamaV2's kernels do not take as they are.
EXL2_DTYPES = {"q_weight": "I32", "q_invperm": "I32", "q_perm": "I32", "q_scale": "I32", "q_scale_max": "F16", "q_groups": "I16"}
INTEGER_DTYPES = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
CONVERTED_ON_LOAD = {"q_invperm": INTEGER_DTYPES, "q_perm": INTEGER_DTYPES, "q_groups": INTEGER_DTYPES, "q_scale_max": FLOAT_DTYPES}


def group_exl2_tensors(tensors: dict[str, TensorHeader]) -> dict[str, dict[str, TensorHeader]]:
    """Linear prefix -> {suffix: header} for every tensor named <linear>.<q_weight|q_invperm|q_perm|q_scale|
    q_scale_max|q_groups>; a linear that holds a q_weight also gets its other tensors (bias, or ones that do not
    belong there)."""
    layers: dict[str, dict[str, TensorHeader]] = defaultdict(dict)
    for name, tensor in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix in EXL2_TENSOR_SUFFIXES + OPTIONAL_SUFFIXES:
            layers[prefix][suffix] = tensor
    for name, tensor in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if "q_weight" in layers.get(prefix, {}):
            layers[prefix].setdefault(suffix, tensor)
    return dict(layers)


def check_exl2_tensors(directory: Path, tensors: dict[str, TensorHeader], readable_files: set[str]) -> tuple[list[Finding], int]:
    """Findings for every EXL2 linear, and the number of linears holding a q_weight. Reads only q_groups,
    q_invperm, q_perm and q_scale_max, of linears whose headers are right."""
    layers = group_exl2_tensors(tensors)
    found: list[Finding] = []
    with ExitStack() as stack:
        read = TensorReader(directory, readable_files, stack)
        for prefix, parts in sorted(layers.items()):
            found += _check_exl2_linear(prefix, parts, read)
    return found, sum(1 for parts in layers.values() if "q_weight" in parts)


def _check_exl2_linear(prefix: str, parts: dict[str, TensorHeader], read: TensorReader) -> list[Finding]:
    missing = _exl2_missing(prefix, parts)
    dtype_findings = [f for suffix, tensor in parts.items() if suffix in EXL2_DTYPES for f in _exl2_dtype(tensor, suffix)]
    found = missing + _exl2_extras(parts) + dtype_findings
    if missing:
        return found
    layout, layout_findings = _exl2_layout(prefix, parts, read)
    found += layout_findings
    if layout is None:
        return found
    shape_findings = _exl2_shapes(parts, *layout)
    found += shape_findings
    values = [parts[s] for s in ("q_invperm", "q_perm", "q_scale_max") if s in parts]
    if not has_errors(shape_findings + dtype_findings) and read.can_read(*values):
        found += _exl2_values(parts, read)
    return found


def _exl2_missing(prefix: str, parts: dict[str, TensorHeader]) -> list[Finding]:
    if "q_weight" not in parts:
        held = ", ".join(sorted(parts))
        return [error(f"{prefix}.q_weight", f"is missing: {prefix} holds {held} but no q_weight", "restore the linear's q_weight, or remove its other EXL2 tensors")]
    needed = f"an EXL2 linear needs {', '.join(EXL2_TENSOR_SUFFIXES)}: the checkpoint is incomplete: re-export it"
    return [error(f"{prefix}.{suffix}", "is missing", needed) for suffix in EXL2_TENSOR_SUFFIXES if suffix not in parts]


def _exl2_extras(parts: dict[str, TensorHeader]) -> list[Finding]:
    """Tensors of a quantized linear that no EXL2 loader has a place for (a float weight left next to q_weight)."""
    valid = ", ".join(EXL2_LINEAR_SUFFIXES)
    return [
        error(tensor.name, "does not belong to an EXL2 linear: loaders report it as unexpected", f"an EXL2 linear holds {valid}: remove it")
        for suffix, tensor in parts.items()
        if suffix not in EXL2_LINEAR_SUFFIXES
    ]


def _exl2_dtype(tensor: TensorHeader, suffix: str) -> list[Finding]:
    expected = EXL2_DTYPES[suffix]
    if tensor.dtype == expected:
        return []
    if tensor.dtype in CONVERTED_ON_LOAD.get(suffix, ()):
        return [warning(tensor.name, f"dtype {tensor.dtype}: ExLlamaV2 stores {suffix} as {expected}", "qtool converts it on load; ExLlamaV2 may not")]
    return [error(tensor.name, f"dtype {tensor.dtype} but EXL2 stores {suffix} as {expected}", REEXPORT)]


def _without_name(message: str, *names: str) -> str:
    """A QtoolError message of exl2_format without the tensor or linear name it starts with."""
    for name in names:
        if message.startswith(name):
            return message.removeprefix(name).lstrip(":. ")
    return message


def _exl2_layout(prefix: str, parts: dict[str, TensorHeader], read: TensorReader) -> tuple[tuple[tuple[int, ...], tuple[int, ...]] | None, list[Finding]]:
    """(bits, rows) of each group as q_groups describes them over q_weight's packed rows, checked as ExLlamaV2's
    kernels need them (widths 8..2 never increasing, groups of a multiple of 32 rows); None with the finding
    when they cannot be."""
    q_weight, q_groups = parts["q_weight"], parts["q_groups"]
    if len(q_weight.shape) != 2:
        return None, [error(q_weight.name, f"shape {list(q_weight.shape)} is not 2-D", "q_weight is [packed rows, outputs]: " + REEXPORT)]
    columns = q_weight.shape[1]
    if columns == 0 or columns % COLUMN_ALIGNMENT:
        return None, [error(q_weight.name, f"has {columns} columns", f"EXL2 pads the outputs to a positive multiple of {COLUMN_ALIGNMENT}: " + REEXPORT)]
    if q_groups.dtype not in INTEGER_DTYPES or not read.can_read(q_groups):
        return None, []  # the dtype's or the file's finding says why
    try:
        bits, sizes = group_layout_from_tensors(read(q_groups), q_weight.shape[0], prefix)
        check_exl2_layout(sum(sizes), columns, bits, sizes, prefix)
    except QtoolError as exc:
        return None, [error(q_groups.name, _without_name(exc.message, q_groups.name, prefix), exc.hint or REEXPORT)]
    return (bits, sizes), []


def _layout_text(bits: tuple[int, ...], sizes: tuple[int, ...]) -> str:
    """e.g. "32 rows at 6 bits, 64 rows at 4 bits" (consecutive groups of one width together)."""
    runs: list[list[int]] = []
    for b, size in zip(bits, sizes):
        if runs and runs[-1][0] == b:
            runs[-1][1] += size
        else:
            runs.append([b, size])
    return ", ".join(f"{size} rows at {b} bits" for b, size in runs)


def _exl2_shapes(parts: dict[str, TensorHeader], bits: tuple[int, ...], sizes: tuple[int, ...]) -> list[Finding]:
    """Every tensor's shape against the group layout: q_invperm and q_perm hold the input rows q_groups
    describes, q_scale and q_scale_max one row or value per group, a bias one value per output."""
    q_weight, q_groups = parts["q_weight"], parts["q_groups"]
    in_features, columns = sum(sizes), q_weight.shape[1]
    expected = expected_exl2_shapes(in_features, columns, bits, sizes)
    found = []
    invperm = parts["q_invperm"]
    if invperm.shape != expected["q_invperm"][0]:
        found.append(error(
            q_groups.name,
            f"describes {in_features} input rows ({_layout_text(bits, sizes)}) over q_weight's {q_weight.shape[0]} packed rows, "
            f"but {invperm.name} has shape {list(invperm.shape)}",
            "q_groups, q_weight and q_invperm disagree: " + REEXPORT,
        ))
        expected["q_perm"] = (invperm.shape, None)  # q_perm must still agree with q_invperm
        del expected["q_invperm"]
    rule = f"q_groups ({_layout_text(bits, sizes)}) and q_weight {list(q_weight.shape)}"
    for suffix, (shape, _) in expected.items():
        tensor = parts.get(suffix)
        if tensor is not None and tensor.shape != tuple(shape):
            found.append(error(tensor.name, f"shape {list(tensor.shape)} but {rule} imply {list(shape)}", REEXPORT))
    return found + _exl2_bias(parts.get("bias"), columns)


def _exl2_bias(bias: TensorHeader | None, columns: int) -> list[Finding]:
    """The bias holds the true output width, which q_weight pads to the next multiple of 32."""
    if bias is None:
        return []
    low = columns - COLUMN_ALIGNMENT + 1
    if len(bias.shape) != 1 or not low <= bias.shape[0] <= columns:
        return [error(bias.name, f"shape {list(bias.shape)} but q_weight's {columns} columns hold {low} to {columns} outputs (padded to a multiple of {COLUMN_ALIGNMENT})", REEXPORT)]
    if bias.dtype not in FLOAT_DTYPES:
        return [error(bias.name, f"dtype {bias.dtype}: a bias is a float tensor", REEXPORT)]
    return []


def _exl2_values(parts: dict[str, TensorHeader], read: TensorReader) -> list[Finding]:
    """q_invperm and q_perm are permutations of the input rows and inverse to each other; q_scale_max finite
    and positive (qtool's reader and ExLlamaV2's scales need both)."""
    invperm, perm = parts["q_invperm"], parts.get("q_perm")
    invperm_values = read(invperm)
    found = _permutation_findings(invperm, invperm_values)
    if perm is not None:
        perm_values = read(perm)
        found += _permutation_findings(perm, perm_values)
        if not found:
            inverse = torch.argsort(invperm_values.to(torch.int64))
            if not torch.equal(perm_values.to(torch.int64), inverse):
                found.append(error(perm.name, f"is not the inverse of {invperm.name}", "stored row k holds input row q_perm[k] and q_invperm[q_perm[k]] = k: " + REEXPORT))
    scale_max = parts["q_scale_max"]
    try:
        check_exl2_scale_max(read(scale_max), scale_max.name, scale_max.file)  # the loaders' own check
    except QtoolError as exc:
        found.append(finding_from_error(exc, scale_max.name))
    return found


def _permutation_findings(tensor: TensorHeader, values: torch.Tensor) -> list[Finding]:
    size = values.numel()
    fix = f"{tensor.name.rpartition('.')[2]} must hold each of the {size} input rows 0..{size - 1} once: " + REEXPORT
    rows = values.to(torch.int64).reshape(-1)
    outside = (rows < 0) | (rows >= size)
    if outside.any():
        first = int(outside.nonzero()[0])
        return [error(tensor.name, f"{int(outside.sum())} value(s) lie outside 0..{size - 1} (first at {first}: {int(rows[first])})", fix)]
    counts = torch.bincount(rows, minlength=size)
    if (counts != 1).any():
        repeated = int((counts > 1).nonzero()[0])
        return [error(tensor.name, f"is not a permutation: row {repeated} appears {int(counts[repeated])} times and {int((counts == 0).sum())} row(s) never", fix)]
    return []


def add_exl2_findings(report: ValidationReport, path: Path, configs: DirectoryConfigs, tensors: dict[str, TensorHeader], readable: set[str]) -> None:
    """The EXL2 linears' findings, the quantization_config against what they store, and the summary."""
    data, where = configs.quant_data, configs.quant_where
    tensor_findings, layer_count = check_exl2_tensors(path, tensors, readable)
    # Broken tensors cannot be counted: the config is then checked on its own (bits 2.0..8.0, head_bits 0/6/8).
    stored = exl2_stored(tensors) if layer_count and not has_errors(tensor_findings) else None
    report.findings += check_exl2_quantization_config(data, where, stored) + tensor_findings
    report.summary.update(quantized_layers=layer_count, bits=data.get("bits"), head_bits=data.get("head_bits"), version=data.get("version"))
    if layer_count == 0 and tensors:
        report.findings.append(error("tensors", f"{where} declares EXL2 but no tensor ends in .q_weight", "point at the quantized checkpoint, or remove quantization_config"))
        return
    if stored is None:
        return
    report.summary.update(stored_bits_per_weight=stored.bits_per_weight, head_code_bits=stored.head_code_bits)
    head = "float head" if stored.head_code_bits is None else f"{round(stored.head_code_bits, 2):g}-bit head"
    report.findings.append(info(
        "summary",
        f"EXL2 {stored.bits_per_weight:.2f} bpw stored (config: {data.get('bits')}), {head}: {layer_count} quantized layers, "
        f"{report.summary['tensors']} tensors in {report.summary['files']} file(s)",
    ))
