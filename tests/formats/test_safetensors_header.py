"""formats/safetensors_header.py: the headers it parses agree with what the safetensors library reads from a file
transformers-style code writes."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qtool.formats.safetensors_header import read_file_header


def test_headers_agree_with_the_safetensors_library(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=gen).half(),
        "b": torch.randint(0, 9, (7,), dtype=torch.int32, generator=gen),
        "c": torch.randn(2, 2, 2, generator=gen, dtype=torch.float64),
        "d": torch.zeros(0, 4),
        "e": torch.ones(4, dtype=torch.bfloat16),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    header, findings = read_file_header(path)
    assert findings == [] and header.readable
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(header.tensors)
        for name in handle.keys():
            piece = handle.get_slice(name)
            assert list(header.tensors[name].shape) == piece.get_shape()
            assert header.tensors[name].dtype == piece.get_dtype()
            assert header.tensors[name].numel == tensors[name].numel()
