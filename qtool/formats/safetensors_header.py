"""Read safetensors headers without loading tensors, and check files and the shard index for what the
safetensors loader would refuse: truncation, bad headers, sizes that do not match, shards or tensors missing."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from qtool.core.findings import Finding, error, warning
from qtool.core.text_file import read_utf8

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
HEADER_LENGTH_BYTES = 8
# Bytes per element; sub-byte float formats are left out and reported as unchecked.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
}
# dtypes the safetensors library reads whose size is not whole bytes per element: not size-checked here; any
# other dtype the library refuses to load the file
SUB_BYTE_DTYPES = ("F4", "F6_E2M3", "F6_E3M2")


@dataclass(frozen=True)
class TensorHeader:
    name: str
    file: str  # the file's name inside the checkpoint directory
    dtype: str  # safetensors spelling: F16, I32, ...
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class FileHeader:
    file: str
    tensors: dict[str, TensorHeader]
    readable: bool  # False when the safetensors loader would refuse the file
    size: int


def _entry(name: str, entry: object, file: str) -> TensorHeader | None:
    if not isinstance(entry, dict):
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        return None
    if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(isinstance(o, int) and o >= 0 for o in offsets):
        return None
    if offsets[0] > offsets[1]:
        return None
    return TensorHeader(name, file, dtype, tuple(shape), offsets[0], offsets[1])


def read_file_header(path: Path) -> tuple[FileHeader, list[Finding]]:
    """Parse the 8-byte header length and the JSON header of one file, and check every entry against the bytes
    the file holds."""
    file = path.name
    size = path.stat().st_size
    broken = FileHeader(file, {}, readable=False, size=size)
    fix_truncated = "the file is truncated: copy or download it again"
    if size < HEADER_LENGTH_BYTES:
        return broken, [error(file, f"is {size} bytes, shorter than the 8-byte header length", fix_truncated)]
    with path.open("rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(HEADER_LENGTH_BYTES))
        if header_length > size - HEADER_LENGTH_BYTES:
            return broken, [error(file, f"header length {header_length} goes beyond the file size ({size} bytes)", f"{fix_truncated}, or check it is a safetensors file")]
        raw = handle.read(header_length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        return broken, [error(file, f"header is not valid JSON ({reason})", "the file is corrupt: copy or download it again")]
    if not isinstance(header, dict):
        return broken, [error(file, "header is not a JSON object", "the file is corrupt: copy or download it again")]
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return broken, [error(file, "header __metadata__ is not a map of strings", "the file is corrupt: re-save it")]
    findings: list[Finding] = []
    tensors: dict[str, TensorHeader] = {}
    for name, entry in header.items():
        tensor = _entry(name, entry, file)
        if tensor is None:
            findings.append(error(name, f"header entry in {file} is malformed (needs dtype, shape, data_offsets)", "the file is corrupt: re-save it"))
            continue
        tensors[name] = tensor
        itemsize = DTYPE_BYTES.get(tensor.dtype)
        if itemsize is None and tensor.dtype not in SUB_BYTE_DTYPES:
            findings.append(error(name, f"dtype {tensor.dtype!r} in {file} is not a safetensors dtype", "the file is corrupt: re-save it"))
        elif itemsize is None:
            findings.append(warning(name, f"dtype {tensor.dtype} in {file} is not known to qtool: its size is not checked"))
        elif tensor.numel * itemsize != tensor.end - tensor.begin:
            findings.append(error(
                name,
                f"shape {list(tensor.shape)} of {tensor.dtype} needs {tensor.numel * itemsize} bytes but its data offsets in {file} span {tensor.end - tensor.begin}",
                "the header does not match the data: re-save the file",
            ))
    data_size = size - HEADER_LENGTH_BYTES - header_length
    findings += _check_data_layout(file, list(tensors.values()), data_size)
    return FileHeader(file, tensors, readable=not any(f.level.value == "error" for f in findings), size=size), findings


def _check_data_layout(file: str, tensors: list[TensorHeader], data_size: int) -> list[Finding]:
    """Tensors must tile the data region exactly: no gap, no overlap, nothing beyond or after it."""
    beyond = [t for t in tensors if t.end > data_size]
    if beyond:
        first = min(beyond, key=lambda t: t.end)
        return [error(
            file,
            f"is truncated: {len(beyond)} tensor(s) end beyond its {data_size} data bytes (first: {first.name}, ends at {first.end})",
            "copy or download the file again",
        )]
    position = 0
    for tensor in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if tensor.begin != position:
            kind = "overlaps the previous tensor" if tensor.begin < position else f"leaves a gap of {tensor.begin - position} bytes"
            return [error(tensor.name, f"data offsets in {file} start at {tensor.begin}: {kind}", "the file is corrupt: re-save it")]
        position = tensor.end
    if position != data_size:
        return [error(file, f"has {data_size - position} bytes after the last tensor", "the file is corrupt or was appended to: re-save it")]
    return []


def _read_index(directory: Path) -> tuple[dict[str, str] | None, list[Finding]]:
    path = directory / INDEX_NAME
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        return None, [error(INDEX_NAME, f"is not valid JSON: {exc.msg} at line {exc.lineno}", "restore or re-create the index")]
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return None, [error(INDEX_NAME, "has no weight_map of tensor names to shard files", "restore or re-create the index")]
    return weight_map, []


def read_checkpoint_headers(directory: Path) -> tuple[dict[str, TensorHeader], list[FileHeader], list[Finding]]:
    """All tensor headers of a checkpoint directory (through its shard index when there is one), with the
    findings about files, the index and tensors listed twice."""
    findings: list[Finding] = []
    present = sorted(p.name for p in directory.glob("*.safetensors"))
    weight_map: dict[str, str] | None = None
    if (directory / INDEX_NAME).exists():
        weight_map, index_findings = _read_index(directory)
        findings += index_findings
    if weight_map is not None:
        listed = sorted(set(weight_map.values()))
        for shard in listed:
            if shard not in present:
                count = sum(1 for v in weight_map.values() if v == shard)
                findings.append(error(shard, f"is listed in {INDEX_NAME} ({count} tensors) but missing", "copy the missing shard into the directory"))
        for extra in sorted(set(present) - set(listed)):
            findings.append(warning(extra, f"is not listed in {INDEX_NAME}: loaders ignore it", "remove it or add its tensors to weight_map"))
        files = [s for s in listed if s in present]
    else:
        files = present
        if not present:
            findings.append(error("weights", "no *.safetensors file in the directory", "point at a complete checkpoint directory"))
        elif SINGLE_NAME not in present and len(present) > 1:
            findings.append(error(", ".join(present), f"several safetensors files but no {INDEX_NAME}", f"add the shard index or merge them into {SINGLE_NAME}"))
        elif SINGLE_NAME not in present:
            findings.append(warning(present[0], f"transformers looks for {SINGLE_NAME}", f"rename it to {SINGLE_NAME}"))
    headers: list[FileHeader] = []
    tensors: dict[str, TensorHeader] = {}
    for file in files:
        header, file_findings = read_file_header(directory / file)
        headers.append(header)
        findings += file_findings
        for name, tensor in header.tensors.items():
            if name in tensors:
                findings.append(error(name, f"is stored twice, in {tensors[name].file} and {file}", "remove one copy and fix the index"))
            tensors[name] = tensor
    if weight_map is not None:
        findings += _check_index_entries(weight_map, headers)
    return tensors, headers, findings


def _check_index_entries(weight_map: dict[str, str], headers: list[FileHeader]) -> list[Finding]:
    findings: list[Finding] = []
    parsed = {h.file: h for h in headers if h.tensors or h.readable}
    for name, shard in weight_map.items():
        if shard in parsed and name not in parsed[shard].tensors:
            findings.append(error(name, f"is listed in {INDEX_NAME} under {shard} but {shard} does not hold it", "re-save the checkpoint or fix the index"))
    for header in parsed.values():
        for name in header.tensors:
            if weight_map.get(name) != header.file:
                where_listed = f"listed under {weight_map[name]}" if name in weight_map else "not listed"
                findings.append(error(name, f"is in {header.file} but {where_listed} in {INDEX_NAME}", "add it to weight_map or re-save the checkpoint"))
    return findings
