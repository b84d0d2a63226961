"""The valid inputs the fuzz tests start from, by kind: where the original lives, which of its files a mutation
replaces, and a fresh copy of it per example (mutations never touch the session's originals)."""

from __future__ import annotations

import json
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

# A config every command accepts and that runs in well under a second on the tiny model: RTN, no calibration pass.
CONFIG_DATA = {
    "schema_version": 1,
    "method": "rtn",
    "bits": 4,
    "group_size": 32,
    "sym": True,
    "damp_percent": 0.01,
    "output_format": "gptq",
    "calibration": {"source": "TEXT", "samples": 1, "seqlen": 8, "seed": 0},
}


@dataclass(frozen=True)
class Kind:
    """One kind of input file: `model` is the path commands get (relative to a workspace), `target` the file
    mutations replace, `source` the original copied into the workspace as `copy_as`."""

    name: str
    source: Path
    copy_as: str
    model: str
    target: str


@dataclass(frozen=True)
class Originals:
    root: Path
    float_dir: Path
    text: Path
    kinds: dict[str, Kind]

    @classmethod
    def write(cls, root: Path, float_dir: Path, gptq_dir: Path, exl2_dir: Path, gguf_file: Path, text: Path) -> "Originals":
        configs = root / "configs"
        configs.mkdir()
        data = json.loads(json.dumps(CONFIG_DATA).replace("TEXT", str(text)))
        (configs / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        (configs / "config.json").write_text(json.dumps(data, indent=2))
        (configs / "config.toml").write_text(toml_text(data))
        assert tomllib.loads((configs / "config.toml").read_text()) == data
        kinds = [
            Kind("float-safetensors", float_dir, "model", "model", "model/model.safetensors"),
            Kind("gptq-safetensors", gptq_dir, "model", "model", "model/model.safetensors"),
            Kind("exl2-safetensors", exl2_dir, "model", "model", "model/model.safetensors"),
            Kind("gptq-config-json", gptq_dir, "model", "model", "model/config.json"),
            Kind("gptq-quantize-config-json", gptq_dir, "model", "model", "model/quantize_config.json"),
            Kind("exl2-config-json", exl2_dir, "model", "model", "model/config.json"),
            Kind("float-config-json", float_dir, "model", "model", "model/config.json"),
            Kind("gguf", gguf_file.parent, "gguf", f"gguf/{gguf_file.name}", f"gguf/{gguf_file.name}"),
            Kind("config-yaml", configs, "configs", "configs/config.yaml", "configs/config.yaml"),
            Kind("config-json", configs, "configs", "configs/config.json", "configs/config.json"),
            Kind("config-toml", configs, "configs", "configs/config.toml", "configs/config.toml"),
        ]
        return cls(root, float_dir, text, {kind.name: kind for kind in kinds})

    def original_bytes(self, kind: str) -> bytes:
        k = self.kinds[kind]
        return (k.source / Path(k.target).relative_to(k.copy_as)).read_bytes()

    def workspace(self, kind: str, directory: Path, content: bytes) -> Path:
        """Copy the kind's original into `directory` with its target file replaced by `content`; returns the
        path commands are given."""
        k = self.kinds[kind]
        shutil.copytree(k.source, directory / k.copy_as)
        (directory / k.target).write_bytes(content)
        return directory / k.model


def toml_text(data: dict) -> str:
    """TOML of a flat config with one sub-table (no TOML writer in the standard library)."""
    scalars = "".join(f"{key} = {json.dumps(value)}\n" for key, value in data.items() if not isinstance(value, dict))
    tables = "".join(f"\n[{key}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in value.items()) for key, value in data.items() if isinstance(value, dict))
    return scalars + tables
