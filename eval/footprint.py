"""What a model costs on disk: bytes of its weight files and bits per weight, read from file headers only
(safetensors headers, GGUF tensor tables), never from the loaded model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtool.runtime.sources import PICKLE_SUFFIXES, ModelSource

SAFETENSORS_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "BOOL": 8}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
SAFETENSORS_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


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
        stored_bits += sum(tensors[prefix + part].bits for part in GPTQ_PARTS if prefix + part in tensors)
        g_idx = tensors.get(prefix + "g_idx")
        # qweight is [in * bits / 32, out] int32; g_idx (one entry per input column) gives `in` directly.
        in_features = g_idx.numel if g_idx is not None else qweight.shape[0] * 32 // bits
        weights += in_features * qweight.shape[1]
    return stored_bits / weights if weights else None


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
    """Size and bits per weight of the model as stored: GPTQ checkpoints count their quantized linears, float
    checkpoints the dtype of their tensors, GGUF files every tensor they hold."""
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
    bits_per_weight, label = float_bits_per_weight(tensors)
    return Footprint(size, bits_per_weight, label)
