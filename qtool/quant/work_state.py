"""The saved state of an unfinished quantization run, so that a restart with the same arguments continues from
the last finished layer and ends with a checkpoint bit-identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qtool.formats.quantized_weight import QuantizedWeight

STATE_FILE = "job.json"
HIDDEN_FILE = "hidden.safetensors"


def job_fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


@dataclass
class WorkState:
    """A folder beside the output: job.json (fingerprint, steps done), one file of results per finished step
    (a layer quantized or measured), and the hidden states that feed the next step."""

    path: Path
    fingerprint: str
    completed_layers: int = 0

    @staticmethod
    def folder_for(output: Path) -> Path:
        return output.parent / f".{output.name}.qtool-partial"

    @classmethod
    def open(cls, output: Path, fingerprint: str) -> "WorkState":
        """Resume a matching unfinished run, or start afresh (discarding state left by different arguments)."""
        path = cls.folder_for(output)
        state_file = path / STATE_FILE
        if state_file.exists():
            try:
                saved = json.loads(state_file.read_text())
            except json.JSONDecodeError:
                saved = {}
            if saved.get("fingerprint") == fingerprint and (path / HIDDEN_FILE).exists():
                return cls(path, fingerprint, int(saved.get("completed_layers", 0)))
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        state = cls(path, fingerprint, 0)
        state._write_state()
        return state

    def _write_state(self) -> None:
        data = {"fingerprint": self.fingerprint, "completed_layers": self.completed_layers}
        _write_atomically(self.path / STATE_FILE, lambda p: p.write_text(json.dumps(data)))

    def layer_file(self, index: int) -> Path:
        return self.path / f"layer-{index:04d}.safetensors"

    def save_step(self, index: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str], next_hidden: list[torch.Tensor] | None) -> None:
        """Write the result of step `index` (a layer's tensors and string metadata); with `next_hidden` (the
        inputs of the next step) also record every step up to `index` as done. The files are written before
        job.json moves on, so an interruption at any point leaves a consistent state; steps written without
        hidden states are redone on resume."""
        tensors = {name: t.contiguous() for name, t in tensors.items()}
        _write_atomically(self.layer_file(index), lambda p: save_file(tensors, str(p), metadata=metadata))
        if next_hidden is None:
            return
        hidden = {f"batch.{i}": h.contiguous() for i, h in enumerate(next_hidden)}
        _write_atomically(self.path / HIDDEN_FILE, lambda p: save_file(hidden, str(p)))
        self.completed_layers = index + 1
        self._write_state()

    def load_step(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from safetensors import safe_open

        with safe_open(str(self.layer_file(index)), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(self.layer_file(index))), metadata

    def save_layer(self, index: int, quantized: dict[str, QuantizedWeight], next_hidden: list[torch.Tensor] | None) -> None:
        """save_step for a layer of GPTQ weights."""
        tensors: dict[str, torch.Tensor] = {}
        metadata: dict[str, str] = {}
        for name, qw in quantized.items():
            tensors[f"{name}.codes"] = qw.codes.to(torch.uint8 if qw.bits <= 8 else torch.int32)
            tensors[f"{name}.scales"] = qw.scales
            tensors[f"{name}.zeros"] = qw.zeros.to(torch.int32)
            tensors[f"{name}.g_idx"] = qw.g_idx.to(torch.int32)
            metadata[name] = json.dumps({"bits": qw.bits, "group_size": qw.group_size})
        self.save_step(index, tensors, metadata, next_hidden)

    def load_layer(self, index: int) -> dict[str, QuantizedWeight]:
        tensors, metadata = self.load_step(index)
        quantized = {}
        for name, fields in metadata.items():
            facts = json.loads(fields)
            quantized[name] = QuantizedWeight(
                codes=tensors[f"{name}.codes"].to(torch.int32),
                scales=tensors[f"{name}.scales"],
                zeros=tensors[f"{name}.zeros"],
                g_idx=tensors[f"{name}.g_idx"],
                bits=facts["bits"],
                group_size=facts["group_size"],
            )
        return quantized

    def load_hidden(self) -> list[torch.Tensor]:
        tensors = load_file(str(self.path / HIDDEN_FILE))
        return [tensors[f"batch.{i}"] for i in range(len(tensors))]

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
