"""`qtool validate` end to end: valid config files and checkpoints pass, and each way of breaking one gives its
one-line finding and exit code (0 clean or warnings, 1 errors, 2 unreadable PATH)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from qtool.cli.main import app

runner = CliRunner()

HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 96, 160, 320, 2
# The quantized linears of the test checkpoint: (in_features, out_features). 96 and 160 are not multiples of 64,
# so group size 64 leaves a partial last group.
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "mlp.down_proj": (INTERMEDIATE, HIDDEN)}
Q0 = "model.layers.0.self_attn.q_proj"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def pack_bitstream_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent GPTQ packing with Python integers: each row is one little-endian bit stream of 32-bit words."""
    rows = []
    for row in values.tolist():
        stream = 0
        for j, v in enumerate(row):
            stream |= int(v) << (bits * j)
        words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(len(row) * bits // 32)]
        rows.append([w - 2**32 if w >= 2**31 else w for w in words])
    return torch.tensor(rows, dtype=torch.int32)


def gptq_layer(in_features: int, out_features: int, bits: int, group_size: int, sym: bool, fmt: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    maxq = 2**bits - 1
    if sym:
        zeros = torch.full((groups, out_features), 2 ** (bits - 1))
    else:
        zeros = torch.randint(1, maxq + 1, (groups, out_features), generator=gen)
    stored = zeros - 1 if fmt == "gptq" else zeros
    step = in_features if group_size == -1 else group_size
    return {
        "qweight": torch.randint(-(2**31), 2**31 - 1, (in_features * bits // 32, out_features), dtype=torch.int32, generator=gen),
        "qzeros": pack_bitstream_rows(stored, bits),
        "scales": (torch.rand(groups, out_features, generator=gen) * 0.1 + 0.001).half(),
        "g_idx": (torch.arange(in_features) // step).to(torch.int32),
    }


def hf_config(quantization_config: dict | None) -> dict:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
    ).to_dict()
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    return config


def write_checkpoint(directory: Path, bits: int = 4, group_size: int = 64, sym: bool = True, fmt: str = "gptq",
                     desc_act: bool = False, sharded: bool = True) -> Path:
    """A small GPTQ checkpoint written tensor by tensor: two shards and an index, or one model.safetensors."""
    gen = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    shards[0]["model.embed_tokens.weight"] = torch.randn(VOCAB, HIDDEN, generator=gen).half()
    for layer in range(LAYERS):
        target = shards[layer]
        target[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.float16)
        for linear, (k, n) in LINEARS.items():
            for suffix, tensor in gptq_layer(k, n, bits, group_size, sym, fmt, gen).items():
                target[f"model.layers.{layer}.{linear}.{suffix}"] = tensor
    shards[1]["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.float16)
    shards[1]["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=gen).half()
    if sharded:
        weight_map = {}
        for file, tensors in zip((SHARD1, SHARD2), shards):
            save_file(tensors, str(directory / file))
            weight_map.update({name: file for name in tensors})
        (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file({**shards[0], **shards[1]}, str(directory / "model.safetensors"))
    quantization = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act,
                    "checkpoint_format": fmt, "damp_percent": 0.01}
    (directory / "config.json").write_text(json.dumps(hf_config(quantization)))
    return directory


def float_model_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor a LlamaForCausalLM of hf_config() loads from its files (validate reports one missing)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**hf_config(None)))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def write_float_model(directory: Path) -> Path:
    gen = torch.Generator().manual_seed(1)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in float_model_shapes().items()}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_config(None)))
    return directory


def edit_tensors(path: Path, change) -> None:
    """Load one shard, let `change` edit its dict of tensors, write it back (a valid file with new contents)."""
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def edit_config(directory: Path, change, file: str = "config.json") -> None:
    data = json.loads((directory / file).read_text())
    change(data)
    (directory / file).write_text(json.dumps(data))


def invoke(*args: str):
    return runner.invoke(app, ["validate", *map(str, args)])


def report(*args: str) -> tuple[int, dict]:
    result = invoke(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


def lines(data: dict, level: str) -> list[str]:
    return [f"{f['where']}: {f['message']}" for f in data["findings"] if f["level"] == level]


def fixes(data: dict, level: str = "error") -> list[str]:
    return [f["fix"] for f in data["findings"] if f["level"] == level]


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "ckpt")


# ---------------------------------------------------------------- good inputs


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_valid_checkpoint_every_bit_width_and_format(tmp_path, bits, fmt):
    directory = write_checkpoint(tmp_path / "ckpt", bits=bits, fmt=fmt, sym=False, sharded=bits % 2 == 0)
    code, data = report(directory)
    assert code == 0, data["findings"]
    assert data["ok"] is True and data["kind"] == "checkpoint"
    assert lines(data, "error") == [] and lines(data, "warning") == []
    assert data["summary"]["quantized_layers"] == LAYERS * len(LINEARS)
    assert data["summary"]["bits"] == bits


@pytest.mark.parametrize("group_size", [-1, 32, 128])
def test_valid_checkpoint_group_sizes(tmp_path, group_size):
    code, data = report(write_checkpoint(tmp_path / "ckpt", group_size=group_size))
    assert code == 0 and lines(data, "error") == [] and lines(data, "warning") == []


def test_valid_desc_act_checkpoint_with_permuted_g_idx(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", desc_act=True, sharded=False)

    def permute(tensors):
        for name in list(tensors):
            if name.endswith(".g_idx"):
                tensors[name] = tensors[name][torch.randperm(tensors[name].numel(), generator=torch.Generator().manual_seed(3))]

    edit_tensors(directory / "model.safetensors", permute)
    code, data = report(directory)
    assert code == 0 and lines(data, "warning") == []


def test_table_output_for_clean_checkpoint(checkpoint):
    result = invoke(checkpoint)
    assert result.exit_code == 0
    assert "checkpoint" in result.stdout and "ok" in result.stdout


def test_table_output_for_errors(checkpoint):
    edit_config(checkpoint, lambda c: c["quantization_config"].update(bits=5))
    result = invoke(checkpoint)
    assert result.exit_code == 1
    assert "errors found" in result.stdout and "5 is not valid" in result.stdout


def test_float_model_summary(tmp_path):
    code, data = report(write_float_model(tmp_path / "float"))
    assert code == 0 and data["kind"] == "float_model"
    expected_params = sum(math.prod(shape) for shape in float_model_shapes().values())
    assert data["summary"]["params"] == expected_params
    assert any(f"{expected_params:,} parameters" in line for line in lines(data, "info"))


def test_good_config_file_and_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bits: 3\ngroup_size: 64\ncalibration:\n  samples: 16\n")
    code, data = report(path)
    assert code == 0 and data["kind"] == "config" and data["ok"]
    assert data["summary"]["bits"] == 3 and data["summary"]["calibration"]["samples"] == 16
    code, data = report("gptq-8bit-channel")
    assert code == 0 and data["summary"]["group_size"] == -1


# ---------------------------------------------------------------- broken safetensors files and index


def test_truncated_shard(checkpoint):
    data = (checkpoint / SHARD2).read_bytes()
    (checkpoint / SHARD2).write_bytes(data[:-100])
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    last = max((name for name in header if name != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    end = header[last]["data_offsets"][1]
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"{SHARD2}: is truncated: 1 tensor(s) end beyond its {end - 100} data bytes (first: {last}, ends at {end})"]


def test_garbage_header(checkpoint):
    raw = bytearray((checkpoint / SHARD1).read_bytes())
    raw[8:20] = b"\x00garbage!!{{"
    (checkpoint / SHARD1).write_bytes(bytes(raw))
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"{SHARD1}: header is not valid JSON (Expecting value)"]


def test_header_length_beyond_file(checkpoint):
    raw = bytearray((checkpoint / SHARD1).read_bytes())
    raw[:8] = struct.pack("<Q", 10**9)
    (checkpoint / SHARD1).write_bytes(bytes(raw))
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"{SHARD1}: header length 1000000000 goes beyond the file size ({len(raw)} bytes)"]


def test_file_shorter_than_header_length(checkpoint):
    (checkpoint / SHARD1).write_bytes(b"\x01\x02\x03")
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"{SHARD1}: is 3 bytes, shorter than the 8-byte header length"]


def _rewrite_header(path: Path, change) -> None:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (length - len(text))  # keep the data offsets valid: same header length
    assert len(text) == length
    path.write_bytes(raw[:8] + text + raw[8 + length :])


def test_dtype_shape_byte_length_mismatch(checkpoint):
    _rewrite_header(checkpoint / SHARD1, lambda h: h[f"{Q0}.scales"].update(dtype="F32"))
    code, found = report(checkpoint)
    assert code == 1
    # 2 groups x 96 outputs: 192 float32 values need 768 bytes, the data holds 384 (float16)
    assert f"{Q0}.scales: shape [2, 96] of F32 needs 768 bytes but its data offsets in {SHARD1} span 384" in lines(found, "error")


def test_trailing_bytes_after_last_tensor(checkpoint):
    with (checkpoint / SHARD2).open("ab") as handle:
        handle.write(b"\x00" * 16)
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"{SHARD2}: has 16 bytes after the last tensor"]


def test_overlapping_data_offsets(checkpoint):
    def overlap(header):
        entry = header["model.norm.weight"]
        entry["data_offsets"] = [entry["data_offsets"][0] - 2, entry["data_offsets"][1] - 2]

    _rewrite_header(checkpoint / SHARD2, overlap)
    code, found = report(checkpoint)
    assert code == 1
    assert any(line.startswith("model.norm.weight: data offsets in") and line.endswith("overlaps the previous tensor") for line in lines(found, "error"))


def test_missing_shard(checkpoint):
    (checkpoint / SHARD2).unlink()
    code, found = report(checkpoint)
    assert code == 1
    count = sum(1 for v in json.loads((checkpoint / INDEX).read_text())["weight_map"].values() if v == SHARD2)
    assert lines(found, "error") == [f"{SHARD2}: is listed in {INDEX} ({count} tensors) but missing"]


def test_index_lists_missing_tensor(checkpoint):
    edit_config(checkpoint, lambda i: i["weight_map"].update({"model.layers.1.mlp.up_proj.weight": SHARD2}), INDEX)
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"model.layers.1.mlp.up_proj.weight: is listed in {INDEX} under {SHARD2} but {SHARD2} does not hold it"]


def test_tensor_not_in_index(checkpoint):
    edit_config(checkpoint, lambda i: i["weight_map"].pop("model.norm.weight"), INDEX)
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"model.norm.weight: is in {SHARD2} but not listed in {INDEX}"]


def test_tensor_under_wrong_shard_in_index(checkpoint):
    edit_config(checkpoint, lambda i: i["weight_map"].update({"model.norm.weight": SHARD1}), INDEX)
    code, found = report(checkpoint)
    assert code == 1
    assert sorted(lines(found, "error")) == sorted([
        f"model.norm.weight: is listed in {INDEX} under {SHARD1} but {SHARD1} does not hold it",
        f"model.norm.weight: is in {SHARD2} but listed under {SHARD1} in {INDEX}",
    ])


def test_index_not_json(checkpoint):
    (checkpoint / INDEX).write_text("{ nope")
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error")[0].startswith(f"{INDEX}: is not valid JSON")


def test_unlisted_extra_shard_is_a_warning(checkpoint):
    save_file({"extra": torch.zeros(2)}, str(checkpoint / "stray.safetensors"))
    code, found = report(checkpoint)
    assert code == 0
    assert lines(found, "warning") == [f"stray.safetensors: is not listed in {INDEX}: loaders ignore it"]


def test_several_files_without_index(checkpoint):
    (checkpoint / INDEX).unlink()
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"{SHARD1}, {SHARD2}: several safetensors files but no {INDEX}"]


def test_tensor_stored_twice(checkpoint):
    edit_tensors(checkpoint / SHARD2, lambda t: t.update({"model.norm.weight.copy": t["model.norm.weight"].clone()}))
    edit_tensors(checkpoint / SHARD1, lambda t: t.update({"model.norm.weight": torch.ones(HIDDEN, dtype=torch.float16)}))
    code, found = report(checkpoint)
    assert code == 1
    assert f"model.norm.weight: is stored twice, in {SHARD1} and {SHARD2}" in lines(found, "error")


# ---------------------------------------------------------------- broken GPTQ tensors


def test_wrong_qweight_rows(checkpoint):
    edit_tensors(checkpoint / SHARD1, lambda t: t.update({f"{Q0}.qweight": torch.zeros(13, HIDDEN, dtype=torch.int32)}))
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"{Q0}.qweight: shape [13, 96] but bits 4, group size 64, 96 in x 96 out imply [12, 96]"]


def test_wrong_qzeros_width(checkpoint):
    edit_tensors(checkpoint / SHARD1, lambda t: t.update({f"{Q0}.qzeros": t[f"{Q0}.qzeros"][:, :-1].contiguous()}))
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"{Q0}.qzeros: shape [2, 11] but bits 4, group size 64, 96 in x 96 out imply [2, 12]"]


def test_scales_integer_dtype(checkpoint):
    edit_tensors(checkpoint / SHARD1, lambda t: t.update({f"{Q0}.scales": torch.ones(2, HIDDEN, dtype=torch.int16)}))
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"{Q0}.scales: dtype I16 but GPTQ stores scales as F16"]


def test_scales_float32_is_a_warning(checkpoint):
    edit_tensors(checkpoint / SHARD1, lambda t: t.update({f"{Q0}.scales": t[f"{Q0}.scales"].float()}))
    code, found = report(checkpoint)
    assert code == 0
    assert lines(found, "warning") == [f"{Q0}.scales: dtype F32: GPTQ stores scales as F16"]


def test_qweight_wrong_dtype(checkpoint):
    edit_tensors(checkpoint / SHARD1, lambda t: t.update({f"{Q0}.qweight": t[f"{Q0}.qweight"].float()}))
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"{Q0}.qweight: dtype F32 but GPTQ stores qweight as I32"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (-0.5, f"1 of 192 scales in {SHARD1} are zero or negative (first at [1, 5], value -0.5)"),
        (0.0, f"1 of 192 scales in {SHARD1} are zero or negative (first at [1, 5], value 0)"),
        (float("nan"), f"1 of 192 scales in {SHARD1} are NaN or infinite (first at [1, 5])"),
        (float("inf"), f"1 of 192 scales in {SHARD1} are NaN or infinite (first at [1, 5])"),
    ],
    ids=["negative", "zero", "nan", "inf"],
)
def test_bad_scale_values(checkpoint, value, expected):
    def poison(tensors):
        tensors[f"{Q0}.scales"][1, 5] = value

    edit_tensors(checkpoint / SHARD1, poison)
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"{Q0}.scales: {expected}"]


def test_g_idx_out_of_range(checkpoint):
    def poison(tensors):
        tensors[f"{Q0}.g_idx"][7] = 2

    edit_tensors(checkpoint / SHARD1, poison)
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"{Q0}.g_idx: values must lie in [0, 2) but range over [0, 2]"]


def test_g_idx_length_wrong(checkpoint):
    edit_tensors(checkpoint / SHARD1, lambda t: t.update({f"{Q0}.g_idx": t[f"{Q0}.g_idx"][:-32].contiguous()}))
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"{Q0}.g_idx: shape [64] but bits 4, group size 64, 96 in x 96 out imply [96]"]


def test_qweight_and_g_idx_disagree_without_tie_break(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", group_size=-1)
    edit_tensors(directory / SHARD1, lambda t: t.update({f"{Q0}.g_idx": torch.zeros(64, dtype=torch.int32)}))
    code, found = report(directory)
    assert code == 1
    assert lines(found, "error") == [f"{Q0}: qweight has 12 rows (96 input columns at 4 bits) but g_idx has 64 entries"]


def test_g_idx_not_natural_order_without_desc_act_is_a_warning(checkpoint):
    def swap(tensors):
        g = tensors[f"{Q0}.g_idx"]
        g[0], g[95] = 1, 0

    edit_tensors(checkpoint / SHARD1, swap)
    code, found = report(checkpoint)
    assert code == 0
    assert lines(found, "warning") == [f"{Q0}.g_idx: is not arange(in_features) // group_size although desc_act is false"]


def test_desc_act_g_idx_with_wrong_group_sizes_is_a_warning(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", desc_act=True)
    edit_tensors(directory / SHARD1, lambda t: t.update({f"{Q0}.g_idx": torch.zeros(HIDDEN, dtype=torch.int32)}))
    code, found = report(directory)
    assert code == 0
    assert lines(found, "warning") == [f"{Q0}.g_idx: groups do not each hold 64 columns (the last one the rest)"]


def test_missing_qzeros(checkpoint):
    edit_tensors(checkpoint / SHARD1, lambda t: t.pop(f"{Q0}.qzeros"))
    edit_config(checkpoint, lambda i: i["weight_map"].pop(f"{Q0}.qzeros"), INDEX)
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [f"{Q0}: quantized layer is missing qzeros"]


def test_orphan_scales(checkpoint):
    orphan = "model.layers.1.mlp.up_proj.scales"
    edit_tensors(checkpoint / SHARD2, lambda t: t.update({orphan: torch.ones(2, HIDDEN, dtype=torch.float16)}))
    edit_config(checkpoint, lambda i: i["weight_map"].update({orphan: SHARD2}), INDEX)
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == ["model.layers.1.mlp.up_proj: orphan tensors: scales without qweight"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_zero_point_stored_all_ones_is_a_warning(tmp_path, bits):
    directory = write_checkpoint(tmp_path / "ckpt", bits=bits, sym=False)

    def poison(tensors):
        # the lowest bits of the first word hold output 0's stored zero: all ones is zero 2**bits in v1
        tensors[f"{Q0}.qzeros"][0, 0] |= 2**bits - 1

    edit_tensors(directory / SHARD1, poison)
    code, found = report(directory)
    assert code == 0
    assert lines(found, "warning") == [
        f"{Q0}.qzeros: 1 zero points are stored as {2**bits - 1} in the v1 format: {2**bits}, beyond the {bits}-bit range, or a wrapped 0 depending on the loader"
    ]


def test_v2_zeros_labelled_v1_break_sym(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", fmt="gptq_v2")
    edit_config(directory, lambda c: c["quantization_config"].update(checkpoint_format="gptq"))
    code, found = report(directory)
    assert code == 0
    assert len(lines(found, "warning")) == LAYERS * len(LINEARS)
    assert f"{Q0}.qzeros: sym is true but 192 of 192 zero points are not 8" in lines(found, "warning")


def test_float_weight_next_to_qweight_is_a_warning(checkpoint):
    edit_tensors(checkpoint / SHARD1, lambda t: t.update({f"{Q0}.weight": torch.zeros(HIDDEN, HIDDEN, dtype=torch.float16)}))
    edit_config(checkpoint, lambda i: i["weight_map"].update({f"{Q0}.weight": SHARD1}), INDEX)
    code, found = report(checkpoint)
    assert code == 0
    assert lines(found, "warning") == [f"{Q0}.weight: is stored next to the layer's qweight: loaders will report an unexpected key"]


def test_quantization_config_without_gptq_tensors(tmp_path):
    directory = write_float_model(tmp_path / "float")
    edit_config(directory, lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128}))
    code, found = report(directory)
    assert code == 1
    assert lines(found, "error") == ["tensors: config.json:quantization_config declares GPTQ but no tensor ends in .qweight"]


def test_gptq_tensors_without_quantization_config(checkpoint):
    edit_config(checkpoint, lambda c: c.pop("quantization_config"))
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == ["config.json: has no quantization_config but 4 layers hold GPTQ tensors (first: model.layers.0.mlp.down_proj)"]


# ---------------------------------------------------------------- broken quantization_config


@pytest.mark.parametrize(
    ("change", "expected", "fix_part"),
    [
        ({"bits": 5}, "config.json:quantization_config.bits: 5 is not valid", "valid: 2, 3, 4, 8"),
        ({"group_size": 0}, "config.json:quantization_config.group_size: 0 is not valid", "use -1 (per channel)"),
        ({"checkpoint_format": "gptq_v3"}, "config.json:quantization_config.checkpoint_format: 'gptq_v3' is not valid", "did you mean 'gptq_v2'?"),
        ({"desc_act": "yes"}, "config.json:quantization_config.desc_act: must be true or false, got 'yes'", "write true or false"),
        ({"sym": 1}, "config.json:quantization_config.sym: must be true or false, got 1", "write true or false"),
        ({"bits": "4"}, "config.json:quantization_config.bits: must be an integer, got '4'", "write a whole number"),
        ({"damp_percent": 1.5}, "config.json:quantization_config.damp_percent: 1.5 is out of range", "(0, 1)"),
        ({"quant_method": "awq"}, "config.json:quantization_config.quant_method: 'awq' is not supported", "GPTQ"),
    ],
    ids=["bits5", "group0", "format-did-you-mean", "desc_act-str", "sym-int", "bits-str", "damp", "awq"],
)
def test_bad_quantization_config(checkpoint, change, expected, fix_part):
    edit_config(checkpoint, lambda c: c["quantization_config"].update(change))
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == [expected]
    assert fix_part in fixes(found)[0]


def test_missing_bits(checkpoint):
    edit_config(checkpoint, lambda c: c["quantization_config"].pop("bits"))
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == ["config.json:quantization_config.bits: is missing"]


def test_static_groups_without_desc_act_in_checkpoint_is_a_warning(checkpoint):
    edit_config(checkpoint, lambda c: c["quantization_config"].update(static_groups=True))
    code, found = report(checkpoint)
    assert code == 0
    assert lines(found, "warning") == ["config.json:quantization_config.static_groups: has no effect without desc_act"]


def test_config_json_invalid(checkpoint):
    (checkpoint / "config.json").write_text('{"model_type": "llama",, }')
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error")[0] == "config.json: is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 24"


def test_config_json_missing(checkpoint):
    (checkpoint / "config.json").unlink()
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error")[0] == "config.json: is missing"


def test_quantize_config_mismatch(checkpoint):
    (checkpoint / "quantize_config.json").write_text(json.dumps({"bits": 8, "group_size": 64, "sym": True, "desc_act": False}))
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == ["quantize_config.json:bits: is 8 but config.json says 4"]


def test_legacy_quantize_config_alone_is_read(checkpoint):
    quantization = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    edit_config(checkpoint, lambda c: c.pop("quantization_config"))
    quantization.pop("quant_method")
    (checkpoint / "quantize_config.json").write_text(json.dumps(quantization))
    code, found = report(checkpoint)
    assert code == 0, found["findings"]
    assert found["summary"]["quantized_layers"] == LAYERS * len(LINEARS)
    edit_config(checkpoint, lambda q: q.update(bits=8), "quantize_config.json")
    code, found = report(checkpoint)
    assert code == 1
    assert f"{Q0}.qweight: shape [12, 96] but bits 8, group size 64, 96 in x 96 out imply [24, 96]" in lines(found, "error")


# ---------------------------------------------------------------- config files


def _config(tmp_path: Path, text: str, suffix: str = ".yaml") -> Path:
    path = tmp_path / f"config{suffix}"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "suffix", "expected", "fix_part"),
    [
        ("bitz: 4\n", ".yaml", "unknown key 'bitz'", "did you mean 'bits'?"),
        ("calibration:\n  sampels: 4\n", ".yaml", "calibration: unknown key 'sampels'", "did you mean 'samples'?"),
        ("bits: four\n", ".yaml", "bits must be an integer, got 'four'", "whole number"),
        ('{"sym": "no"}', ".json", "sym must be true or false, got 'no'", "true or false"),
        ("bits: [4\n", ".yaml", "cannot be parsed", "fix the syntax"),
        ("bits = \n", ".toml", "cannot be parsed", "fix the syntax"),
        ("schema_version: 2\n", ".yaml", "schema_version 2 is not supported", "schema_version 1"),
        ("- 1\n- 2\n", ".yaml", "must be a mapping of keys to values, got list", ""),
    ],
    ids=["unknown-key", "unknown-nested-key", "wrong-type", "json-bool", "yaml-syntax", "toml-syntax", "schema-version", "not-a-mapping"],
)
def test_unreadable_config_contents(tmp_path, text, suffix, expected, fix_part):
    path = _config(tmp_path, text, suffix)
    code, found = report(path)
    assert code == 1
    assert len(lines(found, "error")) == 1
    line = lines(found, "error")[0]
    assert line.startswith(f"{path}: ") and expected in line
    assert fix_part in fixes(found)[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("damp_percent: 1.5\n", "damp_percent: 1.5 is out of range"),
        ("damp_percent: 0\n", "damp_percent: 0.0 is out of range"),
        ("calibration:\n  samples: 0\n", "calibration.samples: 0 is out of range"),
        ("calibration:\n  seqlen: 4\n", "calibration.seqlen: 4 is out of range"),
        ("calibration:\n  source: /nonexistent/text.txt\n", "calibration.source: file /nonexistent/text.txt does not exist"),
        ("bits: 5\n", "bits: 5 is not valid"),
        ("method: gtpq\n", "method: 'gtpq' is not valid"),
        ("group_size: 8\n", "group_size: 8 is not valid"),
    ],
    ids=["damp-high", "damp-zero", "samples-0", "seqlen", "source", "bits", "method", "group8"],
)
def test_config_rule_errors(tmp_path, text, expected):
    code, found = report(_config(tmp_path, text))
    assert code == 1
    assert lines(found, "error") == [expected]


def test_config_method_did_you_mean(tmp_path):
    code, found = report(_config(tmp_path, "method: gtpq\n"))
    assert "did you mean 'gptq'?" in fixes(found)[0]


def test_static_groups_without_desc_act_config_is_a_warning(tmp_path):
    code, found = report(_config(tmp_path, "static_groups: true\n"))
    assert code == 0
    assert lines(found, "warning") == ["static_groups: has no effect without desc_act"]


def test_unknown_preset_exits_2(tmp_path):
    result = invoke("gptq-4bit-g12")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: gptq-4bit-g12 does not exist (did you mean the preset 'gptq-4bit-g128'? pass a model directory, a config file or a preset: ")


def test_nonexistent_path_exits_2(tmp_path):
    result = invoke(tmp_path / "nothing.yaml")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"error: config file {tmp_path / 'nothing.yaml'} does not exist")


def test_file_that_is_neither_config_nor_model_exits_2(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    result = invoke(path)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {path} is neither a config file nor a model directory (pass a .yaml/.json/.toml config, a preset name, or a checkpoint directory)"


def test_directory_that_is_not_a_model_exits_2(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    result = invoke(tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"error: {tmp_path} is not a model directory: no config.json and no *.safetensors")


# ---------------------------------------------------------------- model-aware validation of a config


def test_config_against_float_model_partial_groups_are_info(tmp_path):
    model = write_float_model(tmp_path / "float")
    config = _config(tmp_path, "group_size: 64\ncalibration:\n  samples: 2\n  seqlen: 16\n")
    code, found = report(model, "--config", config, "--device", "cpu")
    assert code == 0, found["findings"]
    infos = lines(found, "info")
    six = "model.layers.*.mlp.gate_proj, model.layers.*.mlp.up_proj, model.layers.*.self_attn.k_proj, model.layers.*.self_attn.o_proj and 2 more"
    assert f"{six} (12 linears): 96 = 1×64 + 32: last group has 32 columns" in infos
    assert "model.layers.*.mlp.down_proj (2 linears): 160 = 2×64 + 32: last group has 32 columns" in infos
    assert any(line.startswith("memory (cpu): estimated peak") for line in infos)
    assert found["summary"]["linears"] == LAYERS * 7  # q, k, v, o, gate, up, down


def test_config_against_float_model_group_larger_than_width_warns(tmp_path):
    model = write_float_model(tmp_path / "float")
    config = _config(tmp_path, "group_size: 128\ncalibration:\n  samples: 2\n  seqlen: 16\n")
    code, found = report(model, "--config", config, "--device", "cpu")
    assert code == 0
    six = "model.layers.*.mlp.gate_proj, model.layers.*.mlp.up_proj, model.layers.*.self_attn.k_proj, model.layers.*.self_attn.o_proj and 2 more"
    assert lines(found, "warning") == [f"{six} (12 linears): group size 128 is larger than the 96 input columns: one group per row"]


def test_config_against_float_model_bad_config(tmp_path):
    model = write_float_model(tmp_path / "float")
    code, found = report(model, "--config", _config(tmp_path, "calibration:\n  samples: 0\n"), "--device", "cpu")
    assert code == 1
    assert lines(found, "error") == ["calibration.samples: 0 is out of range"]


def test_config_with_quantized_checkpoint_is_ignored_with_warning(checkpoint, tmp_path):
    code, found = report(checkpoint, "--config", "gptq-4bit-g128")
    assert code == 0
    assert lines(found, "warning") == ["--config: only applies to float models: this checkpoint is already quantized"]



def test_nonexistent_directory_exits_2(tmp_path):
    result = invoke(tmp_path / "no_model_here")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"error: {tmp_path / 'no_model_here'} does not exist (pass a model directory, a config file or a preset: ")


# ---------------------------------------------------------------- GPTQModel's per-module `dynamic` overrides


def _layer1_q_proj_at_8_bits(directory: Path) -> None:
    eight_bit = gptq_layer(HIDDEN, HIDDEN, 8, 64, True, "gptq", torch.Generator().manual_seed(5))
    edit_tensors(directory / SHARD2, lambda t: t.update({f"model.layers.1.self_attn.q_proj.{k}": v for k, v in eight_bit.items()}))


def test_dynamic_override_gives_a_layer_its_own_bits(checkpoint):
    _layer1_q_proj_at_8_bits(checkpoint)
    code, found = report(checkpoint)
    assert code == 1
    assert "model.layers.1.self_attn.q_proj.qweight: shape [24, 96] but bits 4, group size 64, 96 in x 96 out imply [12, 96]" in lines(found, "error")
    edit_config(checkpoint, lambda c: c["quantization_config"].update(dynamic={r"+:.*layers\.1\.self_attn\..*": {"bits": 8}}))
    code, found = report(checkpoint)
    assert code == 0, found["findings"]
    assert lines(found, "warning") == []


def test_dynamic_exclusion_of_a_quantized_layer(checkpoint):
    edit_config(checkpoint, lambda c: c["quantization_config"].update(dynamic={r"-:.*layers\.0\.mlp\..*": {}}))
    code, found = report(checkpoint)
    assert code == 1
    assert lines(found, "error") == ["model.layers.0.mlp.down_proj: holds GPTQ tensors but quantization_config.dynamic leaves it unquantized"]


def test_missing_config_file_for_a_float_model_exits_2(tmp_path):
    model = write_float_model(tmp_path / "float")
    result = invoke(model, "--config", tmp_path / "absent.yaml")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"error: config file {tmp_path / 'absent.yaml'} does not exist")


def test_broken_config_file_for_a_float_model_is_a_finding(tmp_path):
    model = write_float_model(tmp_path / "float")
    config = _config(tmp_path, "bitz: 4\n")
    code, found = report(model, "--config", config, "--device", "cpu")
    assert code == 1
    assert lines(found, "error") == [f"{config}: unknown key 'bitz'"]


# ---------------------------------------------------------------- float model tensors against its config


def test_float_model_missing_a_tensor(tmp_path):
    directory = write_float_model(tmp_path / "float")
    edit_tensors(directory / "model.safetensors", lambda t: [t.pop(f"model.layers.1.self_attn.{p}_proj.weight") for p in "kv"])
    code, found = report(directory)
    assert code == 1
    assert lines(found, "error") == ["model.layers.1.self_attn.k_proj.weight: LlamaForCausalLM expects this tensor but the weight files lack it (2 missing in all)"]


def test_float_model_config_contradicting_the_tensors(tmp_path):
    directory = write_float_model(tmp_path / "float")
    edit_config(directory, lambda c: c.update(hidden_size=192, head_dim=32))
    code, found = report(directory)
    assert code == 1
    assert lines(found, "error") == [
        "config.json: hidden_size is 192 but model.embed_tokens.weight in model.safetensors has shape [320, 96] "
        "(the config implies [320, 192]; 20 more tensors disagree)"
    ]
