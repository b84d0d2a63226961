"""validate/exl2.py and exl2_config.py, as `qtool validate` runs them on EXL2 checkpoints through the Typer app:
checkpoints qtool writes (and ExLlamaV2's file layout) pass with exit 0; each way of breaking one (a tensor deleted
or added, q_groups that do not fit q_weight, a q_perm that is no permutation, a quantization_config out of range)
gives exit 1 and an error at the tensor or key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qtool.cli.main import app
from qtool.checkpoints.exl2_checkpoint import save_exl2_model
from qtool.formats.exl2 import Exl2Weight

runner = CliRunner()
QUANT = "config.json:quantization_config"
# A linear with a fixed layout the corruptions below are worked out on: 96 inputs as 32 rows at 8 bits (8 packed
# rows of q_weight) then 64 rows at 4 bits (8 packed rows): q_groups = [8, 0, 4, 8].
Q0 = "model.layers.0.self_attn.q_proj"
Q0_LAYOUT = [(8, 32), (4, 64)]
LAYOUTS = {96: [(6, 32), (4, 64)], 160: [(5, 64), (3, 96)]}


def exl2_weights(model: torch.nn.Module, seed: int, include_head: bool = False, layouts=None) -> dict[str, Exl2Weight]:
    """Random EXL2 weights for the linears of `model`; layouts maps in_features to [(bits, rows), ...]."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (name == "lm_head" and not include_head):
            continue
        layout = Q0_LAYOUT if name == Q0 else (layouts or LAYOUTS)[module.in_features]
        weights[name] = Exl2Weight(
            codes=torch.cat([torch.randint(0, 1 << b, (r, module.out_features), generator=gen) for b, r in layout]).to(torch.int32),
            qscale=torch.randint(1, 17, (len(layout), module.out_features), generator=gen, dtype=torch.int32),
            scale_max=(torch.rand(len(layout), generator=gen) * 0.04 + 0.01).half(),
            group_bits=tuple(b for b, _ in layout),
            group_sizes=tuple(r for _, r in layout),
            perm=torch.randperm(module.in_features, generator=gen),
        )
    return weights


@pytest.fixture
def exl2_dir(tmp_path, make_tiny_llama) -> Path:
    model = make_tiny_llama(seed=1)
    return save_exl2_model(tmp_path / "exl2", model, exl2_weights(model, seed=2))


def report(directory: Path) -> tuple[int, dict]:
    result = runner.invoke(app, ["validate", str(directory), "--json"])
    return result.exit_code, json.loads(result.stdout)


def found(data: dict, level: str) -> list[tuple[str, str]]:
    return [(f["where"], f["message"]) for f in data["findings"] if f["level"] == level]


def edit_tensors(directory: Path, change) -> None:
    """Rewrite model.safetensors with `change` applied to its dict of tensors (a valid file, new contents)."""
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_quantization_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"].update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def q_groups_with_widths(*widths: int):
    """q_groups of Q0 with new widths over the same first rows."""
    def change(tensors):
        groups = tensors[f"{Q0}.q_groups"].clone()
        groups[0::2] = torch.tensor(widths, dtype=groups.dtype)
        tensors[f"{Q0}.q_groups"] = groups
    return change


# ---------------------------------------------------------------- good checkpoints


@pytest.mark.parametrize(("include_head", "shard_bytes"), [(False, None), (True, 60_000)])
def test_checkpoint_qtool_writes_is_clean(tmp_path, make_tiny_llama, include_head, shard_bytes):
    model = make_tiny_llama(seed=3)
    weights = exl2_weights(model, seed=4, include_head=include_head)
    out = save_exl2_model(tmp_path / "q", model, weights, **({"max_shard_size_bytes": shard_bytes} if shard_bytes else {}))
    code, data = report(out)
    assert code == 0, data["findings"]
    assert data["ok"] is True and data["kind"] == "checkpoint"
    assert found(data, "error") == [] and found(data, "warning") == []
    assert data["summary"]["quantized_layers"] == len(weights)
    assert (data["summary"]["files"] > 1) == bool(shard_bytes)
    body = [w for n, w in weights.items() if n != "lm_head"]
    expected = sum(w.storage_bits() for w in body) / sum(w.in_features * w.out_features for w in body)
    assert data["summary"]["stored_bits_per_weight"] == pytest.approx(expected, rel=1e-12)


def test_table_output(exl2_dir):
    result = runner.invoke(app, ["validate", str(exl2_dir)])
    assert result.exit_code == 0
    assert "checkpoint" in result.stdout and "ok" in result.stdout


def test_uniform_8_bit_stores_more_than_8_bits_and_passes(tmp_path, make_tiny_llama):
    """qtool writes the bits its linears store: past 8.0 for 8-bit codes, whose scales come on top."""
    model = make_tiny_llama(seed=5)
    out = save_exl2_model(tmp_path / "q8", model, exl2_weights(model, seed=6, layouts={96: [(8, 96)], 160: [(8, 160)]}))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] > 8.0
    code, data = report(out)
    assert code == 0 and found(data, "error") == []


def test_files_as_exllamav2_writes_them(exl2_dir):
    """No q_perm, the weights in output.safetensors: only the file name draws a warning."""
    tensors = {k: v for k, v in load_file(str(exl2_dir / "model.safetensors")).items() if not k.endswith(".q_perm")}
    (exl2_dir / "model.safetensors").unlink()
    save_file(tensors, str(exl2_dir / "output.safetensors"))
    code, data = report(exl2_dir)
    assert code == 0 and found(data, "error") == []
    assert [where for where, _ in found(data, "warning")] == ["output.safetensors"]


# ---------------------------------------------------------------- broken tensors


@pytest.mark.parametrize("suffix", ["q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups"])
def test_deleted_tensor_is_named(exl2_dir, suffix):
    edit_tensors(exl2_dir, lambda t: t.pop(f"{Q0}.{suffix}"))
    code, data = report(exl2_dir)
    assert code == 1
    assert f"{Q0}.{suffix}" in [where for where, _ in found(data, "error")]


@pytest.mark.parametrize("extra", ["weight", "qzeros"])
def test_tensor_that_does_not_belong_is_named(exl2_dir, extra):
    edit_tensors(exl2_dir, lambda t: t.update({f"{Q0}.{extra}": torch.zeros(96, 96, dtype=torch.float16)}))
    code, data = report(exl2_dir)
    assert code == 1
    assert [where for where, _ in found(data, "error")] == [f"{Q0}.{extra}"]


@pytest.mark.parametrize(
    ("widths", "reason"),
    [
        ((4, 4), "128 input rows"),  # 8 packed rows at 4 bits are 64 rows, + 64: 128 rows but q_invperm holds 96
        ((6, 4), "6-bit"),  # 8 packed rows are 256 bits: no whole number of 6-bit rows
        ((4, 8), "increase"),  # ExLlamaV2 reads groups from the widest to the narrowest
    ],
    ids=["rows-do-not-add-up", "not-whole-rows", "widths-increase"],
)
def test_q_groups_that_do_not_fit_q_weight(exl2_dir, widths, reason):
    edit_tensors(exl2_dir, q_groups_with_widths(*widths))
    code, data = report(exl2_dir)
    assert code == 1
    errors = found(data, "error")
    assert [where for where, _ in errors] == [f"{Q0}.q_groups"]
    assert reason in errors[0][1]


def test_q_scale_of_the_wrong_group_count(exl2_dir):
    edit_tensors(exl2_dir, lambda t: t.update({f"{Q0}.q_scale": t[f"{Q0}.q_scale"][:1].clone()}))
    code, data = report(exl2_dir)
    assert code == 1
    assert [where for where, _ in found(data, "error")] == [f"{Q0}.q_scale"]


def test_q_perm_that_is_not_a_permutation(exl2_dir):
    def repeat_a_row(tensors):
        perm = tensors[f"{Q0}.q_perm"].clone()
        perm[1] = perm[0]
        tensors[f"{Q0}.q_perm"] = perm

    edit_tensors(exl2_dir, repeat_a_row)
    code, data = report(exl2_dir)
    assert code == 1
    assert [where for where, _ in found(data, "error")] == [f"{Q0}.q_perm"]


def test_q_perm_that_is_not_the_inverse_of_q_invperm(exl2_dir):
    # q_invperm itself is a permutation: q_perm, another one, no longer undoes it
    edit_tensors(exl2_dir, lambda t: t.update({f"{Q0}.q_perm": t[f"{Q0}.q_invperm"].clone()}))
    code, data = report(exl2_dir)
    assert code == 1
    assert [where for where, _ in found(data, "error")] == [f"{Q0}.q_perm"]


def test_q_invperm_out_of_range(exl2_dir):
    def out_of_range(tensors):
        invperm = tensors[f"{Q0}.q_invperm"].clone()
        invperm[5] = 96
        tensors[f"{Q0}.q_invperm"] = invperm

    edit_tensors(exl2_dir, out_of_range)
    code, data = report(exl2_dir)
    assert code == 1
    assert [where for where, _ in found(data, "error")] == [f"{Q0}.q_invperm"]


def test_q_scale_max_in_float32_is_a_warning(exl2_dir):
    edit_tensors(exl2_dir, lambda t: t.update({f"{Q0}.q_scale_max": t[f"{Q0}.q_scale_max"].float()}))
    code, data = report(exl2_dir)
    assert code == 0
    assert [where for where, _ in found(data, "warning")] == [f"{Q0}.q_scale_max"]


def test_exl2_tensors_without_quantization_config(exl2_dir):
    config = json.loads((exl2_dir / "config.json").read_text())
    del config["quantization_config"]
    (exl2_dir / "config.json").write_text(json.dumps(config))
    code, data = report(exl2_dir)
    assert code == 1
    assert [where for where, _ in found(data, "error")] == ["config.json"]


# ---------------------------------------------------------------- broken quantization_config


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"bits": 9.0}, "bits"),
        ({"bits": 1.5}, "bits"),
        ({"bits": "4.0"}, "bits"),
        ({"head_bits": 7}, "head_bits"),
        ({"version": 3}, "version"),
    ],
    ids=["bits-above", "bits-below", "bits-string", "head-bits-7", "version-not-a-string"],
)
def test_bad_quantization_config(exl2_dir, change, key):
    edit_quantization_config(exl2_dir, **change)
    code, data = report(exl2_dir)
    assert code == 1
    assert [where for where, _ in found(data, "error")] == [f"{QUANT}.{key}"]


def test_bits_out_of_range_in_the_table(exl2_dir):
    edit_quantization_config(exl2_dir, bits=9.5)
    result = runner.invoke(app, ["validate", str(exl2_dir)])
    assert result.exit_code == 1
    assert "errors found" in result.stdout and "9.5 is out of range" in result.stdout


def test_head_bits_that_the_tensors_contradict_is_a_warning(exl2_dir):
    edit_quantization_config(exl2_dir, head_bits=6)  # the head of exl2_dir stays float
    code, data = report(exl2_dir)
    assert code == 0
    assert [where for where, _ in found(data, "warning")] == [f"{QUANT}.head_bits"]
