"""The header of a GGUF file (metadata and tensor table) and each tensor's bytes, read without materialising
the large arrays. gguf-py's GGUFReader builds a numpy view per element of every array, which for a 49k-token
vocabulary with its merges takes seconds; a model load needs only the scalars and the tensor table.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key-value count; the
key-value pairs (string key, u32 type, value; strings are u64 length + UTF-8; arrays are u32 element type, u64
count, elements); per tensor: name, u32 dims, u64 per dim (innermost first), u32 ggml type, u64 offset into
the data section, which starts at the next multiple of `general.alignment` (32 when absent)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
# fixed-size value types: struct format per type id
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# ggml tensors have at most 4 dimensions (GGML_MAX_DIMS)
MAX_DIMS = 4
# the fewest bytes a key-value pair (empty key, u32 type, one-byte value) and a tensor entry (empty name, u32
# dims, u32 type, u64 offset) take: a count needing more than the file holds is refused before any loop runs
MIN_KV_BYTES, MIN_TENSOR_BYTES = 8 + 4 + 1, 8 + 4 + 4 + 8


class GgufFormatError(ValueError):
    pass


@dataclass(frozen=True)
class ArrayValue:
    """A metadata array, kept as its element type and length (its elements are not read)."""

    element_type: int
    length: int


@dataclass(frozen=True)
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # torch order: outermost first
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int


@dataclass(frozen=True)
class GgufHeader:
    path: Path
    version: int
    metadata: dict[str, Any]  # scalars and strings as values, arrays as ArrayValue
    tensors: tuple[GgufTensor, ...]
    mapped: np.ndarray  # the whole file, uint8, read-only memory map

    def tensor_bytes(self, tensor: GgufTensor) -> np.ndarray:
        """The tensor's stored bytes as uint8 [*outer dims, bytes per row], the shape gguf-py's dequantize takes."""
        return self.mapped[tensor.offset : tensor.offset + tensor.nbytes].reshape(*tensor.shape[:-1], -1)


class _Cursor:
    def __init__(self, buffer: memoryview, path: Path):
        self.buffer, self.position, self.path = buffer, 0, path

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.position + size > len(self.buffer):
            raise GgufFormatError(f"the header ends early, at byte {self.position}")
        value = struct.unpack_from(fmt, self.buffer, self.position)[0]
        self.position += size
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.position + length > len(self.buffer):
            raise GgufFormatError("a string runs past the end of the file")
        text = bytes(self.buffer[self.position : self.position + length]).decode("utf-8", errors="replace")
        self.position += length
        return text

    def skip_values(self, value_type: int, count: int) -> None:
        if value_type in SCALAR_FORMATS:
            self.position += struct.calcsize(SCALAR_FORMATS[value_type]) * count
        elif value_type == STRING:
            for _ in range(count):
                length = self.unpack("<Q")
                self.position += length
        else:
            raise GgufFormatError(f"arrays of metadata type {value_type} are not supported")
        if self.position > len(self.buffer):
            raise GgufFormatError(f"an array of {count} elements runs past the end of the file")

    def value(self, value_type: int) -> Any:
        if value_type in SCALAR_FORMATS:
            return self.unpack(SCALAR_FORMATS[value_type])
        if value_type == STRING:
            return self.string()
        if value_type == ARRAY:
            element_type, length = self.unpack("<I"), self.unpack("<Q")
            self.skip_values(element_type, length)
            return ArrayValue(element_type, length)
        raise GgufFormatError(f"unknown metadata value type {value_type}")


def stored_nbytes(ggml_type: int, shape: tuple[int, ...], path: Path, name: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError) as exc:
        raise GgufFormatError(f"tensor {name} has ggml type {ggml_type}, unknown to the installed gguf package") from exc
    if shape and shape[-1] % block_size:
        raise GgufFormatError(f"tensor {name} rows of {shape[-1]} do not fill blocks of {block_size}")
    return prod(shape) // block_size * type_size


def read_gguf_header(path: Path) -> GgufHeader:
    if path.stat().st_size < len(MAGIC):
        raise GgufFormatError("not a GGUF file (shorter than the GGUF magic)")
    with open(path, "rb") as handle:
        mapped = np.memmap(handle, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(mapped), path)
    if bytes(mapped[:4]) != MAGIC:
        raise GgufFormatError("not a GGUF file (no GGUF magic)")
    cursor.position = 4
    version = cursor.unpack("<I")
    if version not in SUPPORTED_VERSIONS:
        raise GgufFormatError(f"GGUF version {version} is not supported (only 2 and 3)")
    tensor_count, kv_count = cursor.unpack("<Q"), cursor.unpack("<Q")
    left = len(mapped) - cursor.position
    if kv_count * MIN_KV_BYTES > left or tensor_count * MIN_TENSOR_BYTES > left:
        raise GgufFormatError(f"the header counts {kv_count} metadata keys and {tensor_count} tensors, more than the file's {len(mapped)} bytes can hold")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"))
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.unpack("<I")
        if n_dims > MAX_DIMS:
            raise GgufFormatError(f"tensor {name} has {n_dims} dimensions (GGUF allows at most {MAX_DIMS})")
        dims = [cursor.unpack("<Q") for _ in range(n_dims)]
        infos.append((name, tuple(reversed(dims)), cursor.unpack("<I"), cursor.unpack("<Q")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GgufFormatError(f"general.alignment is {alignment!r}, not a power of two")
    data_start = -(-cursor.position // alignment) * alignment
    tensors = []
    expected = 0  # llama.cpp's rule: each tensor starts where the previous one ends, rounded up to the alignment
    for name, shape, ggml_type, offset in infos:
        nbytes = stored_nbytes(ggml_type, shape, path, name)
        if offset != expected:
            raise GgufFormatError(f"tensor {name} starts at data offset {offset}, expected {expected} (tensors overlap or leave a gap)")
        if data_start + offset + nbytes > len(mapped):
            raise GgufFormatError(f"tensor {name} runs past the end of the file (truncated download?)")
        tensors.append(GgufTensor(name, shape, ggml_type, data_start + offset, nbytes))
        expected = -(-(offset + nbytes) // alignment) * alignment
    # The data section ends with the last tensor (and its padding, which writers may keep or drop). More bytes mean
    # the table lost entries: a tensor count cut by one starts the data section earlier, so every tensor would be
    # read from the wrong bytes and the model would load with shifted weights.
    if len(mapped) > data_start + expected:
        raise GgufFormatError(
            f"{len(mapped) - data_start - expected} bytes follow the last of the {len(tensors)} tensors the header lists: "
            "its tensor table does not cover the file's data (a corrupted tensor count?)"
        )
    return GgufHeader(path, version, metadata, tuple(tensors), mapped)
