"""What a model costs on disk: bytes of its weight files and bits per weight, read from file headers only
(safetensors headers, GGUF tensor tables), never from the loaded model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

from qtool.core.errors import QtoolError
from qtool.checkpoints.exl2_checkpoint import HEAD_NAMES
from qtool.formats.exl2 import SCALE_BITS, WORD_BITS
from qtool.formats.gptq import GPTQ_TENSOR_SUFFIXES
from qtool.checkpoints.sources import PICKLE_SUFFIXES, ModelSource

SAFETENSORS_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "BOOL": 8}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
SAFETENSORS_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Bits ExLlamaV2 counts per group besides its 4-bit scales (qparams.py total_bits): a float16 q_scale_max and a
# (bits, first row) pair of int16 in q_groups; and per input row a 32-bit q_invperm entry.
EXL2_SCALE_MAX_BITS = 16
EXL2_GROUP_ENTRY_BITS = 32
EXL2_INVPERM_BITS = 32


@dataclass
class Footprint:
    size_bytes: int  # all weight files
    bits_per_weight: float | None  # None when the format does not say (pickled weights)
    format: str  # e.g. "float16", "gptq 4-bit g128", "gguf Q4_1"


@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F16, I32, ...

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def bits(self) -> int:
        return self.numel * SAFETENSORS_BITS[self.dtype]


class TensorShape(Protocol):
    """What the EXL2 counts read of a tensor's header: TensorInfo here, TensorHeader in `qtool validate`."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def numel(self) -> int: ...


Headers = Mapping[str, TensorShape]


def safetensors_tensors(files: list[Path]) -> dict[str, TensorInfo]:
    """Name → shape and dtype of every tensor of the files, from their headers (no tensor data is read)."""
    from safetensors import safe_open

    tensors: dict[str, TensorInfo] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                tensors[name] = TensorInfo(tuple(view.get_shape()), view.get_dtype())
    return tensors


def gptq_bits_per_weight(tensors: dict[str, TensorInfo], bits: int) -> float | None:
    """Stored bits of every quantized linear (packed codes, zeros, scales, g_idx) over the number of weights
    those linears hold; None when no GPTQ linear is found."""
    stored_bits = 0
    weights = 0
    for name, qweight in tensors.items():
        if not name.endswith(".qweight"):
            continue
        prefix = name[: -len("qweight")]
        stored_bits += sum(tensors[prefix + part].bits for part in GPTQ_TENSOR_SUFFIXES if prefix + part in tensors)
        g_idx = tensors.get(prefix + "g_idx")
        # qweight is [in * bits / 32, out] int32; g_idx (one entry per input column) gives `in` directly.
        in_features = g_idx.numel if g_idx is not None else qweight.shape[0] * 32 // bits
        weights += in_features * qweight.shape[1]
    return stored_bits / weights if weights else None


def _exl2_header(tensors: Headers, name: str) -> TensorShape:
    if name not in tensors:
        raise QtoolError(f"EXL2 tensor {name} is missing", "run `qtool validate` on the checkpoint")
    return tensors[name]


def exl2_linear_bits(tensors: Headers, prefix: str) -> tuple[int, int]:
    """(stored bits, weights) of the EXL2 linear `prefix` (ending in "."), counted as Exl2Weight.storage_bits
    counts them: codes, a 4-bit scale per group and output, q_scale_max and q_groups per group, q_invperm per
    input row. q_weight's rows give the code bits of a column (rows x 32) whatever the group widths.

    Outputs are padded to a multiple of 32 in q_weight and q_scale; a bias gives the true width, without one
    the padded width is counted (the headers do not hold it)."""
    q_weight = _exl2_header(tensors, prefix + "q_weight")
    in_features = _exl2_header(tensors, prefix + "q_invperm").numel
    groups = _exl2_header(tensors, prefix + "q_scale_max").numel
    bias = tensors.get(prefix + "bias")
    out_features = bias.numel if bias is not None else q_weight.shape[1]
    code_bits = q_weight.shape[0] * WORD_BITS * out_features
    group_bits = groups * (out_features * SCALE_BITS + EXL2_SCALE_MAX_BITS + EXL2_GROUP_ENTRY_BITS)
    return code_bits + group_bits + in_features * EXL2_INVPERM_BITS, in_features * out_features


def exl2_code_width(tensors: Headers, prefix: str) -> float:
    """Mean bits of one code of the EXL2 linear: packed rows x 32 over input rows (ExLlamaV2's head_bits)."""
    return _exl2_header(tensors, prefix + "q_weight").shape[0] * WORD_BITS / _exl2_header(tensors, prefix + "q_invperm").numel


def exl2_linear_prefixes(tensors: Headers) -> tuple[list[str], list[str]]:
    """(body, head) prefixes, each ending in ".", of the linears holding a q_weight."""
    prefixes = sorted(name.removesuffix("q_weight") for name in tensors if name.endswith(".q_weight"))
    head = [p for p in prefixes if p[:-1].rpartition(".")[2] in HEAD_NAMES]
    return [p for p in prefixes if p not in head], head


def exl2_bits_per_weight(tensors: Headers) -> float | None:
    """Stored bits over weights of the EXL2 linears other than the head, as ExLlamaV2 states a model's bpw (and
    qtool's writer its quantization_config bits): a quantized head is left out, or counted alone when it is
    the only EXL2 linear. None when no linear holds a q_weight."""
    body, head = exl2_linear_prefixes(tensors)
    counted = [exl2_linear_bits(tensors, prefix) for prefix in body or head]
    weights = sum(w for _, w in counted)
    return sum(b for b, _ in counted) / weights if weights else None


def exl2_head_code_bits(tensors: Headers) -> float | None:
    """Mean code width of the quantized head (ExLlamaV2's head_bits); None when the head stays float."""
    _, head = exl2_linear_prefixes(tensors)
    return sum(exl2_code_width(tensors, p) for p in head) / len(head) if head else None


def exl2_label(tensors: Headers, bits_per_weight: float | None) -> str:
    """e.g. "exl2 4.02 bpw, 6-bit head" or "exl2 4.02 bpw, float head"."""
    if bits_per_weight is None:
        return "exl2 (no quantized linears)"
    head_bits = exl2_head_code_bits(tensors)
    head = "float head" if head_bits is None else f"{round(head_bits, 2):g}-bit head"
    return f"exl2 {bits_per_weight:.2f} bpw, {head}"


def float_bits_per_weight(tensors: dict[str, TensorInfo]) -> tuple[float | None, str]:
    floats = [info for info in tensors.values() if info.dtype in FLOAT_DTYPES]
    count = sum(info.numel for info in floats)
    if not count:
        return None, "unknown"
    names = sorted({info.dtype for info in floats})
    return sum(info.bits for info in floats) / count, "+".join(SAFETENSORS_NAMES.get(n, n) for n in names)


def gguf_footprint(path: Path) -> Footprint:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    elements = sum(int(t.n_elements) for t in reader.tensors)
    stored = sum(int(t.n_bytes) * 8 for t in reader.tensors)
    by_type: dict[str, int] = {}
    for tensor in reader.tensors:
        by_type[tensor.tensor_type.name] = by_type.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
    main_type = max(by_type, key=by_type.get) if by_type else "?"
    return Footprint(path.stat().st_size, stored / elements if elements else None, f"gguf {main_type}")


def model_footprint(source: ModelSource, quantization_config: dict[str, Any] | None) -> Footprint:
    """Size and bits per weight of the model as stored: GPTQ checkpoints count their quantized linears, EXL2
    checkpoints theirs but the head, float checkpoints the dtype of their tensors, GGUF files every tensor they
    hold."""
    if source.kind == "gguf":
        return gguf_footprint(source.path / source.gguf_file)
    files = sorted(source.path.glob("*.safetensors"))
    if not files:
        pickles = [p for p in sorted(source.path.iterdir()) if p.suffix in PICKLE_SUFFIXES]
        return Footprint(sum(p.stat().st_size for p in pickles), None, "pickled weights")
    size = sum(p.stat().st_size for p in files)
    tensors = safetensors_tensors(files)
    if quantization_config and quantization_config.get("quant_method") == "gptq":
        bits = int(quantization_config.get("bits", 4))
        group = quantization_config.get("group_size", -1)
        label = f"gptq {bits}-bit " + (f"g{group}" if group not in (-1, None) else "per-channel")
        return Footprint(size, gptq_bits_per_weight(tensors, bits), label)
    if quantization_config and quantization_config.get("quant_method") == "exl2":
        bits_per_weight = exl2_bits_per_weight(tensors)
        return Footprint(size, bits_per_weight, exl2_label(tensors, bits_per_weight))
    bits_per_weight, label = float_bits_per_weight(tensors)
    return Footprint(size, bits_per_weight, label)
