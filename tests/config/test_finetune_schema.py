"""The fine-tuning config: files (a finetune: section or the whole file), flags over the file, and every refusal
as one QtoolError naming the key, the file or the flag."""

from __future__ import annotations

import json

import pytest

from qtool.config.finetune_schema import (
    FinetuneConfig,
    check_fits,
    check_method_for_base,
    read_finetune_config_file,
    resolve_finetune_config,
    validate_finetune_config,
)
from qtool.core.errors import QtoolError
from qtool.core.findings import Level


def errors_of(config: FinetuneConfig) -> list[str]:
    return [f.where for f in validate_finetune_config(config) if f.level is Level.ERROR]


def test_defaults_are_valid():
    assert errors_of(FinetuneConfig()) == []


def test_yaml_section_json_whole_file_and_toml(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("quantize: {bits: 4}\nfinetune:\n  rank: 8\n  target_modules: [q_proj, v_proj]\n  lr: 0.001\n")
    config = read_finetune_config_file(yaml_file)
    assert (config.rank, config.target_modules, config.lr) == (8, ["q_proj", "v_proj"], 0.001)
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"method": "full", "max_steps": 7, "packing": False}))
    config = read_finetune_config_file(json_file)
    assert (config.method, config.max_steps, config.packing) == ("full", 7, False)
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('[finetune]\nseqlen = 128\ntarget_modules = "q_proj, o_proj"\n')
    config = read_finetune_config_file(toml_file)
    assert (config.seqlen, config.target_modules) == (128, ["q_proj", "o_proj"])


def test_unknown_key_suggests_the_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("finetune:\n  rnak: 8\n")
    with pytest.raises(QtoolError) as caught:
        read_finetune_config_file(path)
    assert str(path) in caught.value.message and "'rnak'" in caught.value.message
    assert "did you mean 'rank'" in caught.value.hint


def test_wrong_types_are_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"packing": "yes"}))
    with pytest.raises(QtoolError, match="packing must be true or false"):
        read_finetune_config_file(path)
    with pytest.raises(QtoolError, match="^--target-modules must be a list"):
        resolve_finetune_config(None, {"target_modules": 3})


@pytest.mark.parametrize("changes, where", [
    ({"lr": 0.0}, "lr"),
    ({"lr": 2.0}, "lr"),
    ({"rank": 0}, "rank"),
    ({"method": "lorra"}, "method"),
    ({"dropout": 1.0}, "dropout"),
    ({"seqlen": 4}, "seqlen"),
    ({"batch_tokens": 100, "seqlen": 128}, "batch_tokens"),
    ({"target_modules": []}, "target_modules"),
    ({"schedule": "step"}, "schedule"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"epochs": 0}, "epochs"),
])
def test_ranges_and_choices(changes, where):
    assert errors_of(FinetuneConfig(**changes)) == [where]


def test_rank_matters_only_with_an_adapter():
    assert errors_of(FinetuneConfig(method="full", rank=0, target_modules=[])) == []


def test_method_against_the_base():
    with pytest.raises(QtoolError, match="qlora needs a quantized base"):
        check_method_for_base(FinetuneConfig(method="qlora"), None)
    with pytest.raises(QtoolError, match="this model is gptq"):
        check_method_for_base(FinetuneConfig(method="lora"), "gptq")
    check_method_for_base(FinetuneConfig(method="qlora"), "exl2")
    check_method_for_base(FinetuneConfig(method="full"), None)


def test_flags_override_the_file_and_errors_name_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("finetune:\n  rank: 8\n  lr: 5.0\n")
    with pytest.raises(QtoolError) as caught:
        resolve_finetune_config(path, {"rank": 4})
    assert caught.value.message.startswith(f"{path}: lr")
    config, _ = resolve_finetune_config(path, {"rank": 4, "lr": 0.01})
    assert (config.rank, config.lr) == (4, 0.01)
    with pytest.raises(QtoolError, match=r"^lr: 5.0 is out of range"):
        resolve_finetune_config(None, {"lr": 5.0})


def test_memory_that_cannot_fit_is_refused():
    with pytest.raises(QtoolError, match=r"needs about 2.0 GiB more on cuda:0 .* 1.0 GiB are free") as caught:
        check_fits(2 * 2**30, 2**30, "cuda:0", "weights 1 GiB")
    assert "--batch-tokens" in caught.value.hint
    check_fits(2**30, 2 * 2**30, "cpu", "")
