"""Checkpoints of a fine-tuning run, in a folder beside the output (OUT-checkpoints/step-NNNNNN): the trainable
weights (safetensors), the optimizer, the scheduler, the RNG states and the step (the data position: the batch
order is a function of the seed and the epoch), each written atomically. A resumed run reloads all of it and goes
on to the same result as a run that never stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qtool.config.finetune_schema import SCHEDULE_FIELDS, FinetuneConfig
from qtool.core.errors import QtoolError
from qtool.core.output_dir import atomic_output_dir
from qtool.core.output_marker import is_qtool_output

STEP_PREFIX = "step-"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "finetune_config.json"


def checkpoints_dir(output: Path) -> Path:
    return Path(output).parent / f"{Path(output).name}-checkpoints"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(directory: Path, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any, config: FinetuneConfig) -> Path:
    """Write step `step`'s checkpoint, then remove the older ones (qtool-written only)."""
    target = directory / f"{STEP_PREFIX}{step:06d}"
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with atomic_output_dir(target, force=True, what="finetune checkpoint") as staging:
        save_file(trainable_state(model), str(staging / TRAINABLE_FILE))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}, staging / STATE_FILE)
        (staging / CONFIG_FILE).write_text(config.to_json() + "\n")
    for older in step_dirs(directory):
        if older != target and is_qtool_output(older):
            shutil.rmtree(older, ignore_errors=True)
    return target


def step_dirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit())


def latest_checkpoint(directory: Path) -> Path | None:
    found = [p for p in step_dirs(directory) if (p / STATE_FILE).is_file() and (p / TRAINABLE_FILE).is_file()]
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, config: FinetuneConfig) -> int:
    """Restore everything save_checkpoint wrote into the model, optimizer and scheduler; return the step."""
    saved = json.loads((path / CONFIG_FILE).read_text())
    changed = [name for name in (*SCHEDULE_FIELDS, "method", "rank", "target_modules") if saved.get(name) != getattr(config, name)]
    if changed:
        name = changed[0]
        raise QtoolError(f"--resume: the checkpoint {path} was written with {name} = {saved.get(name)!r}, and this run has {getattr(config, name)!r}",
                         "resume with the settings of the interrupted run, or start over with --force")
    weights = load_file(str(path / TRAINABLE_FILE))
    expected = trainable_state(model)
    if set(weights) != set(expected):
        raise QtoolError(f"--resume: the checkpoint {path} holds other trainable tensors than this model", "resume with the same model and method")
    model.load_state_dict(weights, strict=False)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])
