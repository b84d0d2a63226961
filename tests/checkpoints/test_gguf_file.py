"""qtool's GGUF header reader against gguf-py's GGUFReader (an independent reading of the same bytes), and its
answers to damaged files."""

from __future__ import annotations

import numpy as np
import pytest

import struct

from qtool.core.errors import QtoolError
from qtool.checkpoints.gguf_file import ArrayValue, GgufFormatError, read_gguf_header
from qtool.checkpoints.sources import load_model


def write_mixed_gguf(path):
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(1)
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_uint32("llama.block_count", 3)
    writer.add_float32("llama.rope.freq_base", 12345.5)
    writer.add_string("general.name", "tiny ünïcode")
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc", "<|x|>"] * 50)
    writer.add_array("tokenizer.ggml.token_type", [1, 2, 3] * 7)
    writer.add_tensor("blk.0.ffn_up.weight", quantize(rng.standard_normal((6, 64)).astype(np.float32), GGMLQuantizationType.Q4_1), raw_dtype=GGMLQuantizationType.Q4_1)
    writer.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(33).astype(np.float32))
    writer.add_tensor("token_embd.weight", rng.standard_normal((5, 3, 32)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_same_as_gguf_py(path):
    from gguf import GGUFReader

    ours = read_gguf_header(path)
    reader = GGUFReader(str(path))
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.metadata[key]
        if isinstance(value, ArrayValue):
            assert value.length == len(field.data), key
        else:
            assert value == pytest.approx(field.contents()), key
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for tensor, theirs in zip(ours.tensors, reader.tensors):
        assert tensor.ggml_type == int(theirs.tensor_type)
        assert tensor.offset == theirs.data_offset and tensor.nbytes == theirs.n_bytes, tensor.name
        assert tensor.shape == tuple(int(d) for d in reversed(theirs.shape))
        assert np.array_equal(ours.tensor_bytes(tensor).reshape(-1), np.asarray(theirs.data).view(np.uint8).reshape(-1))


def test_header_matches_gguf_py(tmp_path):
    assert_same_as_gguf_py(write_mixed_gguf(tmp_path / "mixed.gguf"))


@pytest.mark.slow
def test_smollm2_header_matches_gguf_py(smollm2_path):
    assert_same_as_gguf_py(smollm2_path)


def test_damaged_files_are_refused_with_the_file_named(tmp_path):
    good = write_mixed_gguf(tmp_path / "good.gguf").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[: len(good) - 40])
    with pytest.raises(GgufFormatError, match="runs past the end"):
        read_gguf_header(truncated)
    cut_header = tmp_path / "cut.gguf"
    cut_header.write_bytes(good[:60])
    with pytest.raises(GgufFormatError):
        read_gguf_header(cut_header)
    not_gguf = tmp_path / "other.gguf"
    not_gguf.write_bytes(b"GGML" + good[4:])
    with pytest.raises(QtoolError, match="other.gguf.*no GGUF magic"):
        load_model(str(not_gguf), with_tokenizer=False)


def test_a_tensor_table_that_does_not_cover_the_data_is_refused(tmp_path):
    """A tensor count cut by one drops the last entry and starts the data section one entry earlier: every tensor
    would be read from shifted bytes. The bytes left after the last listed tensor give it away; a writer's padding
    after the last tensor (up to the alignment) does not."""
    good = write_mixed_gguf(tmp_path / "good.gguf").read_bytes()
    (count,) = struct.unpack_from("<Q", good, 8)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[:8] + struct.pack("<Q", count - 1) + good[16:])
    with pytest.raises(GgufFormatError, match=f"follow the last of the {count - 1} tensors"):
        read_gguf_header(cut)
    appended = tmp_path / "appended.gguf"
    appended.write_bytes(good + bytes(32))
    with pytest.raises(GgufFormatError, match="32 bytes follow"):
        read_gguf_header(appended)

    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "odd.gguf"), arch="llama")
    writer.add_tensor("output_norm.weight", np.random.default_rng(2).standard_normal(33).astype(np.float32))  # 132 bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    padded = (tmp_path / "odd.gguf").read_bytes()  # gguf-py pads the last tensor to the alignment too
    last = read_gguf_header(tmp_path / "odd.gguf").tensors[-1]
    assert len(padded) > last.offset + last.nbytes
    unpadded = tmp_path / "unpadded.gguf"
    unpadded.write_bytes(padded[: last.offset + last.nbytes])
    assert read_gguf_header(unpadded).tensors == (last,)
